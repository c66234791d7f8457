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
from emoshield.evaluation.robustness import robustness_report

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


def test_an_interrupted_evaluation_resumes_and_matches_an_uninterrupted_one(tmp_path, monkeypatch, reference):
    total = CountingAttacks(monkeypatch)
    assert comparable(run(tmp_path / "full")) == reference
    batches = total.calls  # 4 batches x (2 attacks x 2 eps + 1 sweep eps) = 20
    assert batches == 20 and len(entries(tmp_path / "full")) == batches

    CountingAttacks(monkeypatch, stop_after=10)  # PGD done at both eps, AutoAttack 0.02 stops at batch 3 of 4
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cp")
    assert len(entries(tmp_path / "cp")) == 10
    resumed = CountingAttacks(monkeypatch)
    lines = []
    report = robustness_report(tiny_model(), *tiny_faces(), CLASSES, ATTACKS, [0.02, 0.05], progress=lines.append,
                               checkpoint_dir=tmp_path / "cp", **SETTINGS)
    assert resumed.calls == batches - 10
    assert comparable(report) == reference  # AutoAttack's per-stage counts included
    assert any(line.startswith("resumed: 10 attack batch(es)") for line in lines)
    # the reported cost is the whole attack's: the batches run before the stop count too
    assert report["attacks"]["autoattack"]["0.02"]["seconds"] > 0


def test_damaged_entries_are_computed_again(tmp_path, monkeypatch, reference):
    run(tmp_path)
    files = entries(tmp_path)
    hostile = [b"", b"{\"format\": \"emoshield.attack-checkpoint/1\"", b"\xff\xfe not json",
               json.dumps({"nested": [[[[]]]] * 1000}).encode()]
    for path, content in zip(files, hostile):
        path.write_bytes(content)
    entry = json.loads(files[4].read_text())  # the right name, a wrong length
    files[4].write_text(json.dumps({**entry, "correct": entry["correct"] + "1"}))
    entry = json.loads(files[5].read_text())  # not bits
    files[5].write_text(json.dumps({**entry, "correct": "é" * len(entry["correct"])}))
    entry = json.loads(files[6].read_text())  # a stage count that is not a number
    files[6].write_text(json.dumps({**entry, "state": {"robust": {"clean": "x"}, "seconds": {}, "images": 1}}))
    # AutoAttack states with other stage lists or no skipped field are refused as a whole
    autoattack = [p for p in files[7:] if "AutoAttack" in json.loads(p.read_text())["name"]]
    entry = json.loads(autoattack[0].read_text())
    entry["state"]["robust"]["extra-stage"] = 1
    autoattack[0].write_text(json.dumps(entry))
    counting = CountingAttacks(monkeypatch)
    assert comparable(run(tmp_path)) == reference
    bad = 4 + 2 + ("AutoAttack" in json.loads(files[6].read_text())["name"]) + 1
    assert counting.calls == bad


def test_entries_of_another_model_images_or_batch_size_are_not_taken(tmp_path, monkeypatch):
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
    run(tmp_path, batch_size=7)
    assert counting.calls == 2 * 5
    counting = CountingAttacks(monkeypatch)
    run(tmp_path, seed=1)  # the attack's settings are in each entry's name
    assert counting.calls == 20


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
