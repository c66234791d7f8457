"""scripts/studies.py: every study behind RESULTS.md with N workers, resumable. Driven here with a
stand-in for `emoshield` that writes what a finished stage leaves (results.json, units/), so the
ordering, the sharing and the failure handling are tested in seconds."""

import importlib.util
import json
import stat
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

FAKE = """#!{python}
import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
work = Path(args[args.index("--work") + 1]) if "--work" in args else None
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({{"stage": out.name, "threads": os.environ.get("OMP_NUM_THREADS"), "args": args}}) + "\\n")
if out.name in os.environ.get("FAKE_FAIL", "").split(","):
    sys.exit(3)
time.sleep(0.2)
(out / "units").mkdir(parents=True, exist_ok=True)
if args[0] == "reproduce":  # two units, each leaving its models under WORK and its numbers under OUT
    weights = args[args.index("--weights") + 1] if "--weights" in args else "scratch"
    if weights.startswith("library:"):  # as emoshield records it: the entry's name and sha256 prefix
        sha = json.loads(Path("results/cloud_pretrain", weights[8:], "entry.json").read_text())["sha256"]
        weights = weights + "@" + sha[:12]
    record = {{"runs": {{"localization": {{"weights": weights}}, "scratch": {{"weights": "scratch"}}}}}}
    (work / "study.json").parent.mkdir(parents=True, exist_ok=True)
    (work / "study.json").write_text("{{}}")
    for unit in ("fold0-seed0", "fold1-seed0"):
        if (out / "units" / f"smallcnn-{{unit}}.json").is_file():
            continue
        for name in ("defended/metrics.json", "localization/metrics.json", "robustness/robustness.json"):
            (work / "smallcnn" / unit / name).parent.mkdir(parents=True, exist_ok=True)
            (work / "smallcnn" / unit / name).write_text("{{}}")
        (out / "units" / f"smallcnn-{{unit}}.json").write_text("{{}}")
        if "--until-unit" in args:  # like emoshield reproduce: a partial report of the units so far
            (out / "results.json").write_text(json.dumps({{"complete": False, "units": {{"smallcnn": {{unit: record}}}}}}))
            sys.exit(0)
    (out / "results.json").write_text(json.dumps({{"complete": True, "units": {{"smallcnn": {{"fold0-seed0": record,
                                                                                        "fold1-seed0": record}}}}}}))
elif "--model" in args:  # a library entry as shipped on another dataset: no units, nothing pending
    assert work is None, "--model and --work together"
    busy = Path(os.environ["FAKE_LOG"] + "." + out.name + ".running")
    assert not busy.exists(), "two workers ran the same library entry's test at once"
    busy.touch()
    time.sleep(0.3)
    busy.unlink()
    entry = args[args.index("--model") + 1].removeprefix("library:")
    meta = json.loads(Path("results/cloud_pretrain", entry, "entry.json").read_text())
    (out / "results.json").write_text(json.dumps({{"units": {{}}, "pending": [],
                                                 "library_entry": {{"name": entry, "sha256": meta["sha256"]}}}}))
else:  # tests every unit whose models are under WORK
    for folder in work.glob("*/fold*-seed*"):
        assert (folder / "robustness" / "robustness.json").is_file(), "cross-dataset before the unit finished"
        (out / "units" / f"{{folder.parent.name}}-{{folder.name}}.json").write_text("{{}}")
    (out / "results.json").write_text("{{}}")
"""


FAKE_BENCH = """import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"stage": out.name, "threads": os.environ.get("OMP_NUM_THREADS"), "bench": True,
                          "beside_solo": (Path(os.environ["FAKE_LOG"]).parent / "running-final").exists()}) + "\\n")
marker = Path(os.environ["FAKE_LOG"] + ".bench-running")
assert not marker.exists(), "two workers ran the same bench stage at once"
marker.touch()
time.sleep(0.3)
marker.unlink()
out.mkdir(parents=True, exist_ok=True)
rows = [{"protocol": p, "defended": {"autoattack@0.01": 0.5}} for p in args[args.index("--protocols") + 1].split(",")]
(out / "summary.json").write_text(json.dumps(rows))
"""


FAKE_LEVERS = """import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
out, work = Path(args[args.index("--out") + 1]), Path(args[args.index("--work") + 1])
work.mkdir(parents=True, exist_ok=True)
seen = Path(os.environ["FAKE_LOG"] + ".levers-" + str(os.getpid()))
seen.touch()
trained = []
for lever in ("a", "b"):  # like bench/cloud_levers.py: one process per lever, the others move on
    try:
        os.close(os.open(work / (lever + ".lock"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        continue
    if not (work / lever).exists():
        deadline = time.time() + 5  # the first lever waits (a while) for a second worker to join
        while lever == "a" and time.time() < deadline and len(list(seen.parent.glob(seen.name.split("-")[0] + "-*"))) < 2:
            time.sleep(0.05)
        (work / lever).touch()
        trained.append(lever)
    os.unlink(work / (lever + ".lock"))
done = [lever for lever in ("a", "b") if (work / lever).exists()]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"stage": out.name, "threads": os.environ.get("OMP_NUM_THREADS"), "trained": trained}) + "\\n")
out.mkdir(parents=True, exist_ok=True)
sys.path.insert(0, os.environ["REAL_BENCH"])
from cloud_levers import LEVERS  # a complete table has the real levers' rows too: the long run's rule reads them
rows = done + (list(LEVERS) if len(done) == 2 else [])
(out / "levers.json").write_text(json.dumps({"epochs": int(args[args.index("--epochs") + 1]), "limit_per_class": None,
                                             "levers": ["a", "b"], "complete": len(done) == 2,
                                             "runs": [{"name": n, "public_test": 0.6} for n in rows]}))
"""


FAKE_FINAL = """import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
arg = lambda flag: args[args.index(flag) + 1]
out = Path(arg("--out")) / arg("--name")
levers = json.loads(Path(arg("--levers")).read_text())
beside = list(Path(os.environ["FAKE_LOG"]).parent.glob("*.bench-running"))
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"stage": out.parent.name, "threads": os.environ.get("OMP_NUM_THREADS"),
                          "ablation_complete": levers["complete"], "beside": len(beside)}) + "\\n")
marker = Path(os.environ["FAKE_LOG"]).parent / "running-final"
marker.touch()
time.sleep(0.5)  # anything started beside it meanwhile leaves its trace
marker.unlink()
sys.path.insert(0, os.environ["REAL_BENCH"])
from cloud_final import recipe_for  # the real rule: what it writes must pass the driver's `done`
from cloud_final import parse_also, RecipeError
try:
    recipe = recipe_for(Path(arg("--levers")), int(arg("--epochs")), float(arg("--margin")),
                        also=parse_also(arg("--also")) if "--also" in args else ())
except RecipeError as error:
    sys.exit(f"cloud_final: {error}")
out.mkdir(parents=True, exist_ok=True)
(out / "recipe.json").write_text(json.dumps(recipe))
public = json.loads(os.environ.get("FAKE_PUBLIC", "{}")).get(arg("--name"), 0.6)  # its best epoch's PublicTest
(out / "metrics.json").write_text(json.dumps({"best_val_score": public, "test_accuracy": 0.5}))
(out / "tta.json").write_text(json.dumps({"limit_per_class": None, "accuracy": {"none": 0.7, "flip": 0.71,
                                                                            "tencrop": 0.72}}))
import hashlib  # each entry its own hash, as real weights would have
(out / "entry.json").write_text(json.dumps({"name": arg("--name"), "sha256": hashlib.sha256(arg("--name").encode()).hexdigest()}))
"""


@pytest.fixture
def studies(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("studies_under_test", ROOT / "scripts" / "studies.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    fake = tmp_path / "emoshield"
    fake.write_text(FAKE.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "defense_ckplus48.py").write_text(FAKE_BENCH)
    (tmp_path / "bench" / "cloud_levers.py").write_text(FAKE_LEVERS)
    (tmp_path / "bench" / "cloud_final.py").write_text(FAKE_FINAL)
    results_md = tmp_path / "results_md.py"
    results_md.write_text("from pathlib import Path\nwith open('RESULTS.md', 'a') as f:\n    f.write('regenerated\\n')\n")
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "EMOSHIELD", fake)
    monkeypatch.setattr(module, "LOGS", tmp_path / "runs" / "studies")
    monkeypatch.setattr(module, "RESULTS_MD", results_md)
    monkeypatch.setattr(module, "IDLE_SECONDS", 0.1)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("REAL_BENCH", str(ROOT / "bench"))
    monkeypatch.setenv("EMOSHIELD_STUDY_WORK", str(tmp_path / "work"))
    return module, tmp_path


def calls(tmp_path: Path) -> list[dict]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_every_stage_runs_after_its_source_and_results_md_is_rewritten(studies, capsys):
    module, tmp = studies
    assert module.main(["--workers", "2", "--threads", "1"]) == 0
    names = [c["stage"] for c in calls(tmp)]
    assert set(names) == {s.out.split("/")[-1] for s in module.STAGES}
    for stage in module.STAGES:  # a cross-dataset stage only after its study (the stand-in asserts it too)
        if stage.source:
            assert names.index(stage.out.split("/")[-1]) > names.index(stage.source)
    assert {c["threads"] for c in calls(tmp) if c["stage"] != "cloud_pretrain"} == {"1"}  # the long run: all
    assert names.count("defense_ckplus48") == 1  # a bench stage (no step locks) runs on one worker at a time
    # work folders (models, checkpoints) outside the checkout, where a fresh checkout on this machine finds them
    assert (tmp / "work" / "ckplus48-subject-v2" / "study.json").is_file() and not (tmp / "runs" / "reproduce").exists()
    # rewritten after every stage run (partial studies show their finished units) and at the end
    assert (tmp / "RESULTS.md").read_text().splitlines() == ["regenerated"] * (len(names) + 1)
    assert all(" done " in line for line in module.status_lines(module.STAGES, {s.name: s for s in module.STAGES}))
    before = len(calls(tmp))
    assert module.main([]) == 0 and len(calls(tmp)) == before  # re-running: nothing left to do
    assert "stages:" in capsys.readouterr().out


def test_each_unit_is_tested_on_the_other_dataset_before_the_next_training(studies):
    module, tmp = studies
    assert module.main(["--workers", "1", "--only", "ckplus48-subject-v2,ckplus48-jaffe,jaffe-subject-v2"]) == 0
    names = [c["stage"] for c in calls(tmp)]
    # unit 0, its cross test, unit 1, its cross test (not the next study's training), then the rest
    assert names[:4] == ["ckplus48-subject-v2", "ckplus48-jaffe"] * 2, names
    assert sorted(p.name for p in (tmp / "results/cross/ckplus48-jaffe/units").iterdir()) == [
        "smallcnn-fold0-seed0.json", "smallcnn-fold1-seed0.json"]


def test_units_whose_models_are_gone_are_named_not_waited_for(studies, capsys):
    module, tmp = studies
    saved = tmp / "results/reproduce/ckplus48-subject-v2/units/smallcnn-fold0-seed0.json"
    saved.parent.mkdir(parents=True)
    saved.write_text("{}")  # an earlier session's unit: its numbers are here, its models are not
    assert module.main(["--workers", "2", "--only", "ckplus48-subject-v2,ckplus48-jaffe"]) == 0
    assert [p.name for p in (tmp / "results/cross/ckplus48-jaffe/units").iterdir()] == ["smallcnn-fold1-seed0.json"]
    lines = module.status_lines(module.STAGES, {s.name: s for s in module.STAGES})
    cross = next(line for line in lines if line.startswith("ckplus48-jaffe"))
    assert "done; models gone, not tested: smallcnn-fold0-seed0 " in cross


def test_a_failing_study_is_tried_twice_and_its_dependents_never_start(studies, monkeypatch, capsys):
    module, tmp = studies
    monkeypatch.setenv("FAKE_FAIL", "jaffe-subject-v2")
    assert module.main(["--workers", "1"]) == 1
    names = [c["stage"] for c in calls(tmp)]
    assert names.count("jaffe-subject-v2") == 2 and "jaffe-ckplus48" not in names
    assert "ckplus48-jaffe" in names and "ckplus48-reference-v2" in names  # the others still ran
    # rewritten after each run that ended well, not after the failed ones nor at the (failed) end
    assert (tmp / "RESULTS.md").read_text().splitlines() == ["regenerated"] * (len(names) - 2)
    assert "failed: jaffe-subject-v2" in capsys.readouterr().err


def test_only_and_status_and_bad_arguments(studies, capsys):
    module, tmp = studies
    assert module.main(["--only", "jaffe-subject-v2", "--workers", "1"]) == 0
    assert {c["stage"] for c in calls(tmp)} == {"jaffe-subject-v2"}  # once per unit (--until-unit), then the report
    capsys.readouterr()
    assert module.main(["--status"]) == 0
    out = capsys.readouterr().out
    assert "jaffe-subject-v2" in out and "waits for ckplus48-subject-v2" in out
    for argv in (["--only", "nope"], ["--workers", "0"]):
        with pytest.raises(SystemExit) as exc:
            module.main(argv)
        assert exc.value.code == 2


def test_a_defense_table_without_autoattack_rows_is_run_again(studies, capsys):
    module, tmp = studies
    summary = tmp / "results/defense_ckplus48/summary.json"
    summary.parent.mkdir(parents=True)
    old_rows = [{"protocol": p, "defended": {"pgd@0.01": 0.9}} for p in ("reference", "subject", "prototype")]
    summary.write_text(json.dumps(old_rows))  # an earlier run's table, before AutoAttack
    by_name = {s.name: s for s in module.STAGES}
    assert not module.done(by_name["defense_ckplus48"], by_name)
    for damaged in ("not json", "{}", "[" * 100_000, json.dumps([{"protocol": "reference", "defended": None}, {"protocol": ["x"]},
                                                  {"protocol": "subject", "defended": "autoattack@0.01"}, 3])):
        summary.write_text(damaged)
        assert not module.done(by_name["defense_ckplus48"], by_name)
        assert any(line.startswith("defense_ckplus48") for line in module.status_lines(module.STAGES, by_name))
    assert module.main(["--only", "defense_ckplus48", "--workers", "2"]) == 0
    assert [c["stage"] for c in calls(tmp)] == ["defense_ckplus48"]
    assert module.done(by_name["defense_ckplus48"], by_name)


def test_the_defense_bench_reads_a_damaged_summary_as_no_rows_and_skips_only_matching_ones(tmp_path):
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("defense_bench", ROOT / "bench" / "defense_ckplus48.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = tmp_path / "summary.json"
    for damaged in (b"", b"\xff\xfe", b"[" * 100_000, b"{}", b'[1, "x", {"protocol": 3}, {"protocol": "subject"}]'):
        path.write_bytes(damaged)
        assert bench._read_summary(path) == []
    assert bench._read_summary(tmp_path / "missing.json") == []
    model = {"backbone": "mobilenet_v2", "input_size": 64, "epochs": 50, "seed": 0, "weights": "imagenet:IMAGENET1K_V1",
             "defense": {"attack_bn": "eval"}}
    row = {"protocol": "reference", "model": model, "defended": {"autoattack@0.01": 0.9}, "undefended": {}}
    path.write_text(json.dumps([row, {"protocol": "subject", "model": model, "defended": {"pgd@0.01": 0.8},
                                      "undefended": {}}]))
    rows = bench._read_summary(path)
    args = argparse.Namespace(backbone="mobilenet_v2", input_size="64", epochs="50", seed="0", weights="imagenet",
                              attack_bn="eval")
    assert bench._finished(rows, "reference", args)
    assert not bench._finished(rows, "subject", args)  # no AutoAttack in its row: run again
    assert not bench._finished(rows, "prototype", args)  # no row
    for change in ({"epochs": "10"}, {"seed": "1"}, {"weights": "scratch"}, {"attack_bn": "train"}, {"input_size": "48"}):
        assert not bench._finished(rows, "reference", argparse.Namespace(**{**vars(args), **change})), change
    # its masking table shows APGD-CE beside PGD at 0.1 where PGD stayed above the floor
    checked = [{**row, "defended": {"clean": 1.0}, "undefended": {"clean": 1.0},
                "seconds_per_epoch": {"defended": 1.0, "undefended": 1.0}, "sanity_flags": [],
                "masking_checks": {"sweep": {"0.03": 0.3, "0.05": 0.2, "0.1": 0.193}, "sweep_apgd": {"0.1": 0.011}}}]
    page = bench._markdown(checked, argparse.Namespace(**vars(args), out="results/defense_ckplus48"))
    assert "| reference | 30.0% | 20.0% | 19.3% (APGD-CE 1.1%) |  | none |" in page


def test_the_lever_ablation_is_shared_by_the_workers_and_done_only_when_complete(studies, capsys):
    module, tmp = studies
    by_name = {s.name: s for s in module.STAGES}
    stage = by_name["cloud_levers"]
    levers = tmp / "results/cloud_levers/levers.json"
    levers.parent.mkdir(parents=True)
    for partial in ('{"epochs": 30, "limit_per_class": null, "complete": false, "runs": [{"name": "a"}]}',
                    '{"epochs": 10, "limit_per_class": null, "complete": true, "runs": []}',  # other epochs
                    '{"epochs": 30, "limit_per_class": 6, "complete": true, "runs": []}',  # a quick slice
                    "[" * 100_000, "not json", '{"epochs": 30, "complete": true, "runs": 3}',
                    # a stale 'complete': a lever it lists has no row
                    '{"epochs": 30, "limit_per_class": null, "complete": true, "levers": ["a", "b"], "runs": [{"name": "a"}]}',
                    # complete by its own list, but a lever bench/cloud_levers.py has now is missing
                    '{"epochs": 30, "limit_per_class": null, "complete": true, "levers": ["a"], "runs": [{"name": "a"}]}'):
        levers.write_text(partial)
        assert not module.done(stage, by_name), partial
    levers.write_text('{"epochs": 30, "limit_per_class": null, "complete": false, "runs": [{"name": "a"}, 7]}')
    line = next(x for x in module.status_lines(module.STAGES, by_name) if x.startswith("cloud_levers"))
    assert "1 lever(s) trained: a " in line
    levers.unlink()
    assert module.main(["--only", "cloud_levers", "--workers", "2", "--threads", "1"]) == 0
    runs = [c for c in calls(tmp) if c["stage"] == "cloud_levers"]
    # both workers ran the bench at once, each trained one lever (the first waited for the second)
    assert sorted(lever for c in runs for lever in c["trained"]) == ["a", "b"]
    assert all(len(c["trained"]) <= 1 for c in runs) and len(runs) >= 2
    assert module.done(stage, by_name) and json.loads(levers.read_text())["complete"] is True


def test_the_long_run_waits_for_the_whole_ablation_and_then_has_every_core(studies, monkeypatch):
    """cloud_final (bench/cloud_final.py) starts only once the lever table is complete, runs as one
    process with every core's threads and nothing beside it, and is done only when its folder holds
    the recipe the table gives, scored (bench/cloud_final.py's own test)."""
    module, tmp = studies
    by_name = {s.name: s for s in module.STAGES}
    final = by_name["cloud_final"]
    monkeypatch.setattr(module, "cores", lambda: 2)
    assert not module.ready(final, by_name)
    line = next(x for x in module.status_lines(module.STAGES, by_name) if x.startswith("cloud_final"))
    assert "waits for cloud_levers" in line
    assert module.main(["--only", "cloud_levers,cloud_final", "--workers", "2", "--threads", "1"]) == 0
    runs = [c for c in calls(tmp) if c["stage"] in ("cloud_levers", "cloud_pretrain")]
    assert runs[-1] == {"stage": "cloud_pretrain", "threads": "2", "ablation_complete": True, "beside": 0}
    assert [c["stage"] for c in runs].count("cloud_pretrain") == 1  # once: a failed start would retry
    assert all(c["threads"] == "1" for c in runs[:-1])
    assert module.done(final, by_name)
    out = tmp / final.out / "fer2013-48px-final"
    recipe = json.loads((out / "recipe.json").read_text())
    for path, stale in ((out / "tta.json", '{"limit_per_class": 6, "accuracy": {"tencrop": 0.5}}'),
                        (out / "tta.json", '{"limit_per_class": null, "accuracy": {"none": 0.5}}'),
                        (out / "tta.json", "["),
                        (out / "recipe.json", json.dumps({**recipe, "epochs": 50})),  # another length
                        (out / "recipe.json", json.dumps({**recipe, "flags": recipe["flags"] + ["--no-amp"]})),
                        (out / "recipe.json", "[" * 100_000)):
        kept = path.read_text()
        path.write_text(stale)
        assert not module.done(final, by_name), stale[:80]
        path.write_text(kept)
    assert module.done(final, by_name)
    history = final.work_dir / "fer2013-48px-final" / "run" / "history.json"
    history.parent.mkdir(parents=True)
    history.write_text(json.dumps([{"epoch": 1}, {"epoch": 2}]))
    (out / "tta.json").unlink()
    line = next(x for x in module.status_lines(module.STAGES, by_name) if x.startswith("cloud_final"))
    assert "trained 2 of 100 epochs" in line
    # only the long run asked for, its ablation not done and not to be run: nothing starts
    (tmp / "results/cloud_levers/levers.json").unlink()
    assert module.main(["--only", "cloud_final"]) == 1
    assert [c["stage"] for c in calls(tmp)].count("cloud_pretrain") == 1


def test_a_solo_stage_waits_for_the_running_ones_and_nothing_starts_beside_it(studies):
    """With the ablation complete and a bench stage running, the other worker does not start the
    long run (solo) beside it; with the long run running, the bench stage waits for it."""
    module, tmp = studies
    assert module.main(["--only", "cloud_levers", "--workers", "2", "--threads", "1"]) == 0
    assert module.main(["--only", "defense_ckplus48,cloud_final", "--workers", "2", "--threads", "1"]) == 0
    runs = [c for c in calls(tmp) if c["stage"] in ("defense_ckplus48", "cloud_pretrain")]
    assert [c["stage"] for c in runs] == ["defense_ckplus48", "cloud_pretrain"] and runs[1]["beside"] == 0
    # the other way round (--only orders the stages): the long run first, the bench waits for it
    (tmp / "results/cloud_pretrain/fer2013-48px-final/tta.json").unlink()
    (tmp / "results/defense_ckplus48/summary.json").unlink()
    assert module.main(["--only", "cloud_final,defense_ckplus48", "--workers", "2", "--threads", "1"]) == 0
    runs = [c for c in calls(tmp) if c["stage"] in ("defense_ckplus48", "cloud_pretrain")][2:]
    assert [c["stage"] for c in runs] == ["cloud_pretrain", "defense_ckplus48"] and runs[1]["beside_solo"] is False


def test_after_the_long_run_the_edge_studies_run_on_its_backbone_with_aligned_faces(studies, monkeypatch, capsys):
    """Issue 18 item 4's stages: the v3 studies take the long run's backbone from its recipe
    (@final), align faces, and start only after it; the library entry's cross-dataset tests take
    --model and no --work; a study's cross stage follows its study."""
    module, tmp = studies
    assert module.main(["--workers", "2", "--threads", "1"]) == 0
    names = [c["stage"] for c in calls(tmp)]
    final_at = names.index("cloud_pretrain")
    for name in ("fer2013-final-ckplus48", "fer2013-final-jaffe", "jaffe-subject-v3", "ckplus48-subject-v3"):
        assert names.index(name) > final_at, name
    assert names.index("jaffe-ckplus48-v3") > names.index("jaffe-subject-v3")
    recipe = json.loads((tmp / "results/cloud_pretrain/fer2013-48px-final/recipe.json").read_text())
    assert names.count("fer2013-final-ckplus48") == names.count("fer2013-final-jaffe") == 1  # one worker each
    for c in calls(tmp):
        if c["stage"].endswith("-v3") and c["args"][0] == "reproduce":  # the stand-in's levers tie: smallcnn
            assert c["args"][c["args"].index("--backbones") + 1] == "smallcnn" and "@final" not in c["args"]
            assert c["args"][c["args"].index("--align") + 1] == "eyes"
            assert c["args"][c["args"].index("--weights") + 1] == "library:fer2013-48px-final"
        if c["stage"].startswith("fer2013-final-"):
            assert "--work" not in c["args"] and c["args"][c["args"].index("--model") + 1] == "library:fer2013-48px-final"
    by_name = {s.name: s for s in module.STAGES}
    library_cross = by_name["fer2013-final-jaffe"]
    v3, v2 = by_name["jaffe-subject-v3"], by_name["jaffe-subject-v2"]
    assert module.done(library_cross, by_name) and module.done(v3, by_name) and module.done(v2, by_name)
    meta = tmp / "results/cloud_pretrain/fer2013-48px-final/entry.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "sha256": "b" * 64}))  # the entry retrained
    assert not module.done(library_cross, by_name)  # its report is of the earlier entry: to run again
    assert not module.done(v3, by_name) and module.done(v2, by_name)  # so is the v3 study's fine-tuning
    # emoshield reproduce would keep those units (they name the entry, not its sha256): one line, no loop
    capsys.readouterr()
    started = len(calls(tmp))
    assert module.Workers([v3], by_name, 1, 1)._run(0, v3) == 2
    said = capsys.readouterr().out.strip()
    assert len(said.splitlines()) == 1 and "holds runs fine-tuned from library:fer2013-48px-final@" in said
    assert len(calls(tmp)) == started  # nothing was started
    report = tmp / v3.out / "results.json"
    for units in ({"smallcnn": {"fold0-seed0": {"runs": {"scratch": {"weights": "scratch"}}}}}, {}, [],
                  {"smallcnn": {"fold0-seed0": {"runs": {"a": {"weights": "library:fer2013-48px-final@" + "b" * 12},
                                                         "b": {"weights": "library:other@" + "b" * 12}}}}}):
        report.write_text(json.dumps({"complete": True, "units": units}))  # no run, or a run of another entry
        assert not module.done(v3, by_name), units
    report.write_text(json.dumps({"complete": True, "units": {"smallcnn": {"fold0-seed0": {
        "runs": {"a": {"weights": "library:fer2013-48px-final@" + "b" * 12}, "s": {"weights": "scratch"}}}}}}))
    assert module.done(v3, by_name) and not module._stale_weights(v3)
    v2_report = tmp / v2.out / "results.json"
    for units in ([], {"smallcnn": 5}, "x"):  # a damaged report of a plain study: not done, no exception
        v2_report.write_text(json.dumps({"complete": True, "units": units}))
        assert not module.done(v2, by_name), units
    status = {line.split()[0]: line for line in module.status_lines(module.STAGES, {s.name: s for s in module.STAGES})}
    assert "--work" not in status["fer2013-final-jaffe"] and "--work" in status["jaffe-subject-v3"]
    # a recipe naming another backbone: the next v3 run takes it (the edited recipe is no longer the
    # scored run's, so the pick is held on the rule's entry to read it)
    monkeypatch.setattr(module, "picked_entry", lambda: "fer2013-48px-final")
    (tmp / "results/cloud_pretrain/fer2013-48px-final/recipe.json").write_text(
        json.dumps({**recipe, "flags": recipe["flags"] + ["--backbone", "widedeepcnn"]}))
    stage = {s.name: s for s in module.STAGES}["jaffe-subject-v3"]
    assert stage.command()[stage.command().index("--backbones") + 1] == "widedeepcnn"
    for damaged in ("[" * 100_000, json.dumps({**recipe, "flags": recipe["flags"] + ["--backbone"]}),
                    json.dumps({**recipe, "flags": ["--backbone", "--lr", "0.1"]}), json.dumps({"flags": [1, 2]}),
                    json.dumps({**recipe, "flags": recipe["flags"] + ["--backbone", 7]}), json.dumps({"flags": "x"})):
        (tmp / "results/cloud_pretrain/fer2013-48px-final/recipe.json").write_text(damaged)
        with pytest.raises(RuntimeError, match="no recipe with a backbone"):
            stage.command()
    workers = module.Workers([stage], {s.name: s for s in module.STAGES}, 1, 1)  # the driver: one line, exit 2
    assert workers._run(0, stage) == 2


def test_the_edge_studies_take_the_long_run_with_the_higher_public_test(studies, monkeypatch):
    """The registered variant (cloud_final_strong: the rule's recipe plus strong augmentation) runs
    after the rule's long run, alone; the v3 stages take the entry whose best epoch has the higher
    PublicTest accuracy. PrivateTest (the test) plays no part, a tie keeps the rule's, and a run
    not yet scored is no candidate."""
    module, tmp = studies
    monkeypatch.setenv("FAKE_PUBLIC", json.dumps({"fer2013-48px-final": 0.70, "fer2013-48px-final-strong": 0.71}))
    by_name = {s.name: s for s in module.STAGES}
    assert by_name["cloud_final_strong"].after == "cloud_final"
    assert module.main(["--workers", "2", "--threads", "1"]) == 0
    finals = [c for c in calls(tmp) if c["stage"] == "cloud_pretrain"]
    assert len(finals) == 2 and all(c["beside"] == 0 and c["ablation_complete"] for c in finals)
    strong = json.loads((tmp / "results/cloud_pretrain/fer2013-48px-final-strong/recipe.json").read_text())
    assert strong["also"] == ["augment-strong"] and strong["flags"][-2:] == ["--augment", "strong"]
    assert strong["taken"] == [] and "augment-strong" not in strong["taken"]
    seen = 0
    for c in calls(tmp):
        if c["stage"].endswith("-v3") and c["args"][0] == "reproduce":
            assert c["args"][c["args"].index("--weights") + 1] == "library:fer2013-48px-final-strong"
            seen += 1
        if c["stage"].startswith("fer2013-final-"):
            assert c["args"][c["args"].index("--model") + 1] == "library:fer2013-48px-final-strong"
            seen += 1
    assert seen >= 4
    assert all(module.done(s, by_name) for s in module.STAGES)
    rule = tmp / "results/cloud_pretrain/fer2013-48px-final"
    (rule / "metrics.json").write_text(json.dumps({"best_val_score": 0.70, "test_accuracy": 0.99}))
    assert module.picked_entry() == "fer2013-48px-final-strong"  # PrivateTest is not read
    (rule / "metrics.json").write_text(json.dumps({"best_val_score": 0.71, "test_accuracy": 0.5}))
    assert module.picked_entry() == "fer2013-48px-final"  # a tie: the rule's recipe
    (rule / "metrics.json").write_text(json.dumps({"best_val_score": 0.60}))
    (tmp / "results/cloud_pretrain/fer2013-48px-final-strong/entry.json").unlink()  # not scored yet
    assert module.picked_entry() == "fer2013-48px-final"
    for damaged in ("[", json.dumps({"best_val_score": True}), json.dumps({"best_val_score": "0.9"})):
        (rule / "metrics.json").write_text(damaged)
        assert module.picked_entry() == "fer2013-48px-final"  # nothing to pick from: the rule's entry
    stage = by_name["fer2013-final-jaffe"]
    assert stage.command()[stage.command().index("--model") + 1] == "library:fer2013-48px-final"


def test_the_v3_stages_read_the_backbone_of_the_picked_run_and_status_names_it(studies, monkeypatch):
    module, tmp = studies
    monkeypatch.setenv("FAKE_PUBLIC", json.dumps({"fer2013-48px-final-strong": 0.71}))
    assert module.main(["--workers", "2", "--threads", "1"]) == 0
    by_name = {s.name: s for s in module.STAGES}
    status = {line.split()[0]: line for line in module.status_lines(module.STAGES, by_name)}
    assert "--model library:fer2013-48px-final-strong " in status["fer2013-final-jaffe"]
    assert "@picked" not in status["jaffe-subject-v3"] and "library:fer2013-48px-final-strong" in status["jaffe-subject-v3"]
    # the cross table of the entry as shipped is checked against the picked entry's hash, not the other's
    assert module.done(by_name["fer2013-final-jaffe"], by_name)
    monkeypatch.setattr(module, "picked_entry", lambda: "fer2013-48px-final")
    assert not module.done(by_name["fer2013-final-jaffe"], by_name)
    monkeypatch.setattr(module, "picked_entry", lambda: "fer2013-48px-final-strong")
    strong = tmp / "results/cloud_pretrain/fer2013-48px-final-strong/recipe.json"
    strong.write_text(json.dumps({**json.loads(strong.read_text()), "flags": ["--backbone", "widedeepcnn"]}))
    stage = by_name["ckplus48-subject-v3"]
    assert stage.command()[stage.command().index("--backbones") + 1] == "widedeepcnn"
    assert stage.command()[stage.command().index("--weights") + 1] == "library:fer2013-48px-final-strong"


def test_a_variant_the_rule_already_is_trains_nothing_and_the_edge_studies_use_the_rule_run(studies):
    """Should the rule take augment-strong itself, cloud_final_strong would be the rule's recipe:
    it counts done without a run, and the v3 stages take the rule's entry (never a stale variant)."""
    module, tmp = studies
    assert module.main(["--only", "cloud_levers", "--workers", "2", "--threads", "1"]) == 0
    levers = tmp / "results/cloud_levers/levers.json"
    table = json.loads(levers.read_text())
    for row in table["runs"]:
        row["public_test"] = 0.7 if row["name"] == "augment-strong" else 0.6
    levers.write_text(json.dumps(table))
    by_name = {s.name: s for s in module.STAGES}
    variant = by_name["cloud_final_strong"]
    assert not module.done(variant, by_name)  # nothing of its own to train, but the rule's run is not done
    assert not module.ready(by_name["jaffe-subject-v3"], by_name)
    assert module.main(["--workers", "2", "--threads", "1"]) == 0
    names = [c["stage"] for c in calls(tmp)]
    assert names.count("cloud_pretrain") == 1  # the rule's run only
    assert names.index("cloud_pretrain") < min(names.index(n) for n in names if n.endswith("-v3"))
    assert module.done(by_name["cloud_final_strong"], by_name)
    assert not (tmp / "results/cloud_pretrain/fer2013-48px-final-strong").exists()
    rule = json.loads((tmp / "results/cloud_pretrain/fer2013-48px-final/recipe.json").read_text())
    assert rule["taken"] == ["augment-strong"] and module.picked_entry() == "fer2013-48px-final"
    for c in calls(tmp):
        if c["stage"].endswith("-v3") and c["args"][0] == "reproduce":
            assert c["args"][c["args"].index("--weights") + 1] == "library:fer2013-48px-final"


def test_status_says_how_far_an_evaluation_in_progress_has_got(studies):
    import os
    import time

    module, tmp = studies
    by_name = {s.name: s for s in module.STAGES}
    study, table = by_name["jaffe-subject-v2"], by_name["defense_ckplus48"]
    entries = study.work_dir / "smallcnn" / "fold2-seed0" / "robustness" / "partial" / "f1"
    entries.mkdir(parents=True)
    for i, (name, eps, images) in enumerate((("FGSM(eps=0.01, seed=0)", "0.01", "0:128"),
                                             ("AutoAttack(eps=0.0313725, steps=100)", "0.0313725", "128:256"))):
        entry = entries / f"{i}.json"
        entry.write_text(json.dumps({"name": f"{name}|eps={eps}|{images}"}))
        os.utime(entry, (time.time() + i, time.time() + i))  # the second is the newest
    bench = table.work_dir / "evaluation-subject-x" / "partial" / "f2"
    bench.mkdir(parents=True)
    (bench / "a.json").write_bytes(b"\xff not json")
    lines = {line.split()[0]: line for line in module.status_lines(module.STAGES, by_name)}
    assert "evaluating smallcnn/fold2-seed0: 2 attack batch(es) kept, last AutoAttack eps 0.0313725 images 128:256" \
        in lines["jaffe-subject-v2"]
    assert "evaluating evaluation-subject-x: 1 attack batch(es) kept, last unreadable" in lines["defense_ckplus48"]
    assert "evaluating" not in lines["ckplus48-subject-v2"]
    library = by_name["fer2013-final-jaffe"]  # a library entry's test keeps its batches in its results folder
    entries = tmp / library.out / "evaluation" / "partial" / "f3"
    entries.mkdir(parents=True)
    (entries / "0.json").write_text(json.dumps({"name": "PGD(eps=0.01, steps=10)|eps=0.01|0:128"}))
    line = next(x for x in module.status_lines(module.STAGES, by_name) if x.startswith("fer2013-final-jaffe"))
    assert "evaluating evaluation: 1 attack batch(es) kept, last PGD eps 0.01 images 0:128" in line


def test_a_worker_goes_back_to_the_first_unfinished_stage_after_each_unit(studies):
    """Stages are in priority order: a study that hands back after one unit (--until-unit) is taken
    up again before any later stage starts (the lever ablation must not take a worker from a
    study with units left)."""
    module, tmp = studies
    assert module.main(["--workers", "1", "--only", "jaffe-subject-v2,defense_ckplus48"]) == 0
    assert [c["stage"] for c in calls(tmp)] == ["jaffe-subject-v2"] * 3 + ["defense_ckplus48"]
