"""A robustness evaluation stopped part-way (SIGKILL, an exception, a full disk) resumes from its
per-batch attack checkpoints and gives exactly the report of an uninterrupted run; entries that
were damaged, or made for another model, images or batch size, are never taken."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import emoshield.attacks.registry as registry
from emoshield.evaluation.robustness import MASKING_FLOOR, robustness_report

CLASSES = ["a", "b", "c", "d", "e"]
ATTACKS = ["pgd", "autoattack"]
SETTINGS = dict(pgd_steps=3, autoattack_steps=4, square_queries=30, batch_size=4, masking_sweep=(0.1,))
MODEL_CODE = """
import torch
def tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 12 * 12, 5))
    with torch.no_grad():
        model[3].weight.mul_(8)
    return model.eval()
def tiny_faces(n=14):
    # random images labelled with the tiny model's own answers: all right clean, some robust
    pixels = torch.randint(0, 256, (n, 3, 12, 12), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        return pixels, tiny_model()(pixels.float() / 255).argmax(1)
"""
namespace: dict = {}
exec(MODEL_CODE, namespace)
tiny_model, tiny_faces = namespace["tiny_model"], namespace["tiny_faces"]


def comparable(report: dict) -> dict:
    """A report without its wall-clock fields."""
    out = json.loads(json.dumps(report))
    for by_eps in out["attacks"].values():
        for entry in by_eps.values():
            entry.pop("seconds")
            entry.pop("stage_seconds", None)
    return out


def run(checkpoint_dir=None, model=None, faces=None, **overrides):
    pixels, labels = faces or tiny_faces()
    return robustness_report(model or tiny_model(), pixels, labels, CLASSES, ATTACKS, [0.02, 0.05],
                             checkpoint_dir=checkpoint_dir, **{**SETTINGS, **overrides})


@pytest.fixture(scope="module")
def reference():
    return comparable(run())


def entries(folder):
    return sorted(folder.rglob("*.json"))


REAL_CORRECT_UNDER = registry.correct_under


class CountingAttacks:
    """Counts attack batches actually computed; raises after `stop_after` of them."""

    def __init__(self, monkeypatch, stop_after=None):
        self.calls, self.stop_after, real = 0, stop_after, REAL_CORRECT_UNDER

        def counted(model, x, y, attack=None, batch_size=256):
            if attack is not None:
                if self.stop_after is not None and self.calls >= self.stop_after:
                    raise KeyboardInterrupt("stopped mid-evaluation")
                self.calls += 1
            return real(model, x, y, attack, batch_size)

        monkeypatch.setattr(registry, "correct_under", counted)


def by_name(folder) -> dict:
    return {json.loads(p.read_text())["name"]: p for p in entries(folder)}


def test_an_interrupted_evaluation_resumes_and_matches_an_uninterrupted_one(tmp_path, monkeypatch, reference):
    total = CountingAttacks(monkeypatch)
    lines = []
    assert comparable(run(tmp_path / "full", progress=lines.append)) == reference
    batches = total.calls  # 4 batches x (2 attacks x 2 eps + 1 sweep eps) = 20
    assert batches == 20 and len(entries(tmp_path / "full")) == batches
    assert not any(line.startswith("resumed") for line in lines)

    CountingAttacks(monkeypatch, stop_after=10)  # PGD done at both eps, AutoAttack 0.02 stops at batch 3 of 4
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cp")
    assert len(entries(tmp_path / "cp")) == 10
    resumed = CountingAttacks(monkeypatch)
    lines = []
    report = run(tmp_path / "cp", progress=lines.append)
    assert resumed.calls == batches - 10
    assert comparable(report) == reference  # AutoAttack's per-stage counts included
    assert any(line.startswith("resumed: 10 attack batch(es)") for line in lines)
    # the reported cost is the whole attack's: the batches run before the stop count too
    saved = [json.loads(p.read_text()) for name, p in by_name(tmp_path / "cp").items()
             if name.startswith("AutoAttack(eps=0.02,")]
    assert len(saved) == 4
    assert report["attacks"]["autoattack"]["0.02"]["seconds"] == pytest.approx(sum(e["seconds"] for e in saved),
                                                                               abs=0.006)


def test_the_masking_sweep_takes_the_same_pgd_from_this_run_without_calling_it_resumed(tmp_path, monkeypatch):
    counting = CountingAttacks(monkeypatch)
    lines = []
    report = run(tmp_path, progress=lines.append, masking_sweep=(0.05,))  # = PGD-3 at eps 0.05, run just before
    assert counting.calls == 16 and not any(line.startswith("resumed") for line in lines)
    assert report["masking_checks"]["sweep"]["0.05"] == report["attacks"]["pgd"]["0.05"]["accuracy"]


def test_damaged_or_foreign_files_in_the_checkpoint_folder_are_computed_again(tmp_path, monkeypatch, reference):
    run(tmp_path)
    files = by_name(tmp_path)
    batches = ["0:4", "4:8", "8:12", "12:14"]

    def path(prefix, batch):
        return next(p for name, p in files.items() if name.startswith(prefix) and name.endswith("|" + batch))

    def edit(prefix, batch, change):
        entry = json.loads(path(prefix, batch).read_text())
        change(entry)
        path(prefix, batch).write_text(json.dumps(entry))

    for batch, content in zip(batches, [b"", b'{"format": "emoshield.attack-checkpoint/1"', b"\xff\xfe not json",
                                         b"[" * 200_000]):  # deeper than the JSON parser's recursion limit
        path("PGD(eps=0.02,", batch).write_bytes(content)
    edit("PGD(eps=0.05,", "0:4", lambda e: e.update(correct=e["correct"] + "1"))  # another length
    edit("PGD(eps=0.05,", "4:8", lambda e: e.update(correct="é" * len(e["correct"])))  # not bits
    edit("PGD(eps=0.05,", "8:12", lambda e: e.update(seconds=float("nan")))
    edit("PGD(eps=0.05,", "12:14", lambda e: e.update(padding="x" * (1 << 20)))  # too big to be ours
    edit("AutoAttack(eps=0.02,", "0:4", lambda e: e["state"]["robust"].update(clean="x"))
    edit("AutoAttack(eps=0.02,", "4:8", lambda e: e["state"]["robust"].update({"extra-stage": 1}))
    edit("AutoAttack(eps=0.02,", "8:12", lambda e: e["state"]["robust"].update(clean=float("inf")))
    edit("AutoAttack(eps=0.02,", "12:14", lambda e: e["state"]["robust"].update({"apgd-ce": 10 ** 6}))  # rises
    link, fifo, folder = (path("AutoAttack(eps=0.05,", b) for b in batches[:3])
    link.unlink()
    link.symlink_to("/dev/zero")
    fifo.unlink()
    os.mkfifo(fifo)
    folder.unlink()
    folder.mkdir()  # also where this run's write of that entry must fail, alone
    counting = CountingAttacks(monkeypatch)
    lines = []
    assert comparable(run(tmp_path, progress=lines.append)) == reference
    assert counting.calls == 15  # all but the untouched AutoAttack eps 0.05 batch 12:14
    assert [line for line in lines if "checkpoint" in line and "not written" in line][:1] and \
        not any("checkpoints off" in line for line in lines)
    # the link was read as "no entry" (never followed) and replaced by this run's entry; the folder stays
    assert not link.is_symlink() and json.loads(link.read_text())["name"].startswith("AutoAttack(eps=0.05,")
    assert folder.is_dir()


def test_entries_of_another_model_tta_mode_images_or_settings_are_not_taken(tmp_path, monkeypatch):
    from emoshield.models.tta import ViewAverage

    run(tmp_path)
    model = tiny_model()
    with torch.no_grad():
        model[0].bias[0] += 1e-3
    counting = CountingAttacks(monkeypatch)
    run(tmp_path, model=model)
    assert counting.calls == 20
    pixels, labels = tiny_faces()
    pixels[0, 0, 0, 0] ^= 1
    counting = CountingAttacks(monkeypatch)
    run(tmp_path, faces=(pixels, labels))
    assert counting.calls == 20
    counting = CountingAttacks(monkeypatch)
    run(tmp_path, batch_size=7)  # each entry names its images' range
    assert counting.calls == 2 * 5
    counting = CountingAttacks(monkeypatch)
    run(tmp_path, seed=1)  # the attack's settings are in each entry's name
    assert counting.calls == 20
    # the same weights behind another test-time augmentation are another model
    run(tmp_path, model=ViewAverage(tiny_model(), "flip"))
    counting = CountingAttacks(monkeypatch)
    report = run(tmp_path, model=ViewAverage(tiny_model(), "tencrop"))
    followup = "sweep_apgd" in report["masking_checks"]  # PGD-3 left > 10% at 0.1: APGD-CE ran there too
    assert followup == (report["masking_checks"]["sweep"]["0.1"] > MASKING_FLOOR)
    assert counting.calls == 20 + 4 * followup


SCRIPT = MODEL_CODE + textwrap.dedent("""
    import json, sys
    from emoshield.evaluation.robustness import robustness_report
    report = robustness_report(tiny_model(), *tiny_faces({n}), {classes!r}, {attacks!r}, [0.02, 0.05],
                               checkpoint_dir=sys.argv[1], progress=print, **{settings!r})
    for by_eps in report["attacks"].values():
        for entry in by_eps.values():
            entry.pop("seconds"); entry.pop("stage_seconds", None)
    print("REPORT " + json.dumps(report))
""")


def child(tmp_path, n, *, limit_bytes=None, timeout=240):
    script = tmp_path / "evaluate.py"
    script.write_text(SCRIPT.format(n=n, classes=CLASSES, attacks=ATTACKS, settings=SETTINGS))

    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "cp")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=limit if limit_bytes is not None else None)


def test_sigkill_mid_evaluation_then_the_same_command_finishes_it(tmp_path):
    n = 40  # 10 batches per attack and eps
    proc = child(tmp_path, n)
    deadline = time.monotonic() + 120
    while len(entries(tmp_path / "cp")) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    kept = len(entries(tmp_path / "cp"))
    assert proc.returncode == -signal.SIGKILL and 3 <= kept < 50, (proc.returncode, kept)
    again = child(tmp_path, n)
    out, _ = again.communicate(timeout=240)
    assert again.returncode == 0, out
    assert f"resumed: {kept} attack batch(es)" in out
    report = json.loads(out.split("REPORT ", 1)[1])
    assert report == comparable(run(faces=tiny_faces(n)))


def test_a_full_disk_turns_checkpoints_off_and_the_evaluation_still_finishes(tmp_path, reference):
    proc = child(tmp_path, 14, limit_bytes=64)  # every entry is larger than 64 bytes
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert out.count("attack checkpoints off") == 1
    assert json.loads(out.split("REPORT ", 1)[1]) == reference
    assert entries(tmp_path / "cp") == []
