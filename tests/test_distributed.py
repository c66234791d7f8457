"""Data-parallel training under torchrun: 2 gloo processes on 127.0.0.1 compute what one process
computes on the same global batch, write files once, and resume after being killed."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

from tests.conftest import FIVE, free_port

# --augment standard: smooth warps. (Strong augmentation's erased patches are constant, so max-pool
# ties there can break differently under float rounding and a rare step routes a gradient elsewhere.)
TRAIN = ["train", "--dataset", "ckplus48", "--classes", FIVE, "--protocol", "subject", "--limit-per-class", "12",
         "--backbone", "smallcnn", "--input-size", "32", "--batch-size", "16", "--augment", "standard", "--quiet"]


def emoshield(out, epochs, data_root, processes=1, extra=(), wait=True):
    args = [*TRAIN, "--data-root", str(data_root), "--epochs", str(epochs), "--out", str(out), *extra]
    # MKL_CBWR=COMPATIBLE: on Intel CPUs with AVX-512 (not on AMD, where MKL takes its AVX2 path) MKL's
    # float32 GEMM sums in an order that depends on the batch's size, so a batch of 2n and two of n
    # differ in the last bits; FGSM's sign() turns that into other adversarial pixels (train loss
    # 1.6116 vs 1.6105 after 1 defended epoch, 2026-12-08, Xeon with AMX). The reproducible code path
    # leaves what these tests check, the sharding, as the only difference between 1 and 2 processes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"}
    if processes == 1:
        command = [sys.executable, "-m", "emoshield", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "emoshield", *args]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(folder):
    tensors = load_file(str(folder / "checkpoint.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith("model.") and v.dtype == np.float32}


def relative_distance(a, b):
    """||a - b|| / ||a|| over all weight tensors."""
    return float(np.sqrt(sum(((a[k].astype(np.float64) - b[k]) ** 2).sum() for k in a)
                         / sum((a[k].astype(np.float64) ** 2).sum() for k in a)))


def test_two_gloo_processes_match_one_process_and_resume(tmp_path, data_root):
    # contiguous layout: torch's channels_last CPU BatchNorm (the default layout's) sums in float32,
    # ~20x further from float64 than its contiguous kernel, while synced BatchNorm sums in float64
    exact = ["--memory-format", "contiguous"]
    one = tmp_path / "one"
    emoshield(one, 2, data_root, extra=exact)
    two = tmp_path / "two"
    proc = emoshield(two, 2, data_root, processes=2, extra=exact)
    assert "data parallel over 2 processes (gloo): global batch 16, 8 per process" in proc.stderr
    assert proc.stdout.count("test accuracy") == 1  # rank 0 alone reports and writes
    run = json.loads((two / "run.json").read_text())
    assert run["processes"] == 2 and json.loads((one / "run.json").read_text())["processes"] == 1

    # loss curves and final weights: the same up to float rounding (synced BatchNorm, shard-weighted
    # gradient all-reduce, the single process's augmentation stream). Measured: equal to 1e-5 for two
    # epochs, then ~1e-3 apart (relative weight distance) once a rounding difference flips a ReLU/max-pool tie (border-repeated
    # warps make flat regions); per-shard BatchNorm statistics instead put the weights ~10% apart.
    h1, h2 = (json.loads((f / "history.json").read_text()) for f in (one, two))
    assert len(h1) == len(h2) == 2
    assert abs(h1[0]["train_loss"] - h2[0]["train_loss"]) < 1e-4
    for a, b in zip(h1, h2):
        assert abs(a["train_loss"] - b["train_loss"]) < 5e-3 and abs(a["val_loss"] - b["val_loss"]) < 5e-3
    w1, w2 = weights(one), weights(two)
    assert w1.keys() == w2.keys()
    assert relative_distance(w1, w2) < 1e-2
    m1, m2 = (json.loads((f / "metrics.json").read_text()) for f in (one, two))
    assert abs(m1["test_accuracy"] - m2["test_accuracy"]) <= 1 / m1["num_images"]

    # killed after its first checkpoint, restarted with --resume: ends where the uninterrupted run
    # ends (in the default channels_last layout)
    two = tmp_path / "two-channels-last"
    emoshield(two, 2, data_root, processes=2)
    w2, m2 = weights(two), json.loads((two / "metrics.json").read_text())
    for attempt in range(3):  # the run may (rarely) outpace the kill: then interrupt a fresh one
        resumed = tmp_path / f"resumed-{attempt}"
        proc = emoshield(resumed, 2, data_root, processes=2, wait=False)
        deadline = time.time() + 120
        while time.time() < deadline and not (resumed / "checkpoint.safetensors").is_file():  # written atomically
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # a preempted job: torchrun stops its workers (own sessions)
        proc.wait()
        time.sleep(1)
        if not (resumed / "metrics.json").exists():
            break
    proc = emoshield(resumed, 2, data_root, processes=2, extra=["--resume"])
    assert "resuming from epoch" in proc.stderr  # it really resumed: never passes on a finished run
    w3 = weights(resumed)
    assert relative_distance(w2, w3) < 1e-4
    assert json.loads((resumed / "metrics.json").read_text())["test_accuracy"] == m2["test_accuracy"]


def test_two_gloo_processes_match_one_process_in_defended_training(tmp_path, data_root):
    """Defended training (FGSM + R+FGSM examples made with the current model every batch) under
    torchrun: each rank draws R+FGSM's random start for the whole global batch and keeps its rows
    (LinfAttack.shard), so 2 processes train on the adversarial images 1 process makes. Before
    that fix every rank drew the noise of rows 0..n for its own shard."""
    defended = ["--memory-format", "contiguous", "--defense", "fgsm:0.5,rfgsm:0.5", "--eps", "0.03"]
    one, two = tmp_path / "one", tmp_path / "two"
    emoshield(one, 1, data_root, extra=defended)
    proc = emoshield(two, 1, data_root, processes=2, extra=defended)
    assert "data parallel over 2 processes (gloo)" in proc.stderr
    h1, h2 = (json.loads((f / "history.json").read_text()) for f in (one, two))
    assert json.loads((two / "metrics.json").read_text())["defense"]["methods"] == {"fgsm": 0.5, "rfgsm": 0.5}
    for key in ("train_loss", "val_loss", "val_rfgsm_accuracy"):
        assert abs(h1[0][key] - h2[0][key]) < 1e-4, (key, h1[0][key], h2[0][key])
    assert relative_distance(weights(one), weights(two)) < 1e-4



LEAVE = """
import json, sys, time
from datetime import timedelta
from pathlib import Path
import torch.distributed as dist
from emoshield.training import distributed
dist.init_process_group("gloo", timeout=timedelta(seconds=1))  # the wait must not depend on this timeout
context = distributed.init_distributed("cpu")
if context.rank == 0:
    time.sleep(3)  # rank 0 evaluates and writes after training; the others wait for it
arrived = time.time()
distributed.shutdown_distributed()
record = json.dumps({"rank": context.rank, "arrived": arrived, "left": time.time()})
# one file per rank: they leave together, so prints to the shared stdout pipe interleave
(Path(sys.argv[1]) / f"rank{context.rank}.json").write_text(record)
"""


def test_ranks_leave_the_process_group_together(tmp_path):
    """A rank that tore down its gloo connections while rank 0 still evaluated was seen to abort
    (SIGABRT) under load: after a finished command every rank waits for the others before leaving,
    longer than the default group's timeout (here 1 s; gloo's default is 30 min, NCCL's 10)."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = {r["rank"]: r for r in (json.loads(f.read_text()) for f in tmp_path.glob("rank*.json"))}
    assert set(ranks) == {0, 1}
    assert ranks[1]["left"] >= ranks[0]["arrived"]


def test_the_cli_waits_for_its_peers_only_after_a_finished_command(tmp_path, monkeypatch):
    """After an error a rank leaves at once: a failed peer may never reach the barrier (torchrun
    stops the other workers once one fails)."""
    from emoshield import cli
    from emoshield.training import distributed

    calls = []
    monkeypatch.setattr(distributed, "shutdown_distributed", lambda together=True: calls.append(together))
    assert cli.main(["cloud", "list", "--library", str(tmp_path)]) == 0
    assert cli.main(["bundle", "inspect", str(tmp_path / "missing")]) == 2
    assert calls == [True, False]


def test_a_rank_whose_peers_vanished_still_leaves_the_group_with_one_line(monkeypatch, capsys):
    """The wait to leave fails (a peer died or hung): one warning line, and the group is still
    destroyed (a gloo group alive at exit can abort the process)."""
    import torch.distributed as dist

    from emoshield.training import distributed

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    monkeypatch.setattr(distributed, "_CONTEXT", distributed.DistContext(0, 2, 0, "gloo", leave_group=None))

    def vanished(group=None):
        raise RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234\nlong C++ trace")

    monkeypatch.setattr(dist, "barrier", vanished)
    distributed.shutdown_distributed()
    err = capsys.readouterr().err
    assert err == "emoshield: warning: rank 0 left without its peers: [gloo] Connection closed by peer [127.0.0.1]:1234\n"
    assert not dist.is_initialized() and distributed._CONTEXT is None
    distributed.shutdown_distributed(together=False)  # a second call (or one after an error): nothing to do
