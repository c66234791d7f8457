"""bench/cloud_final.py: the recipe of issue 18's long run is chosen from the lever ablation by a
fixed rule on PublicTest (never PrivateTest), and the run trains, resumes and is scored once."""

import importlib.util
import json
import statistics
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT

LEVERS = ["baseline", "wider", "schedule-2x", "augment-strong", "spatial-head", "deeper", "mixup",
          "baseline-seed1", "cutmix", "label-smoothing", "adamw", "float32", "baseline-seed2"]


@pytest.fixture(scope="module")
def final():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("cloud_final_under_test", ROOT / "bench" / "cloud_final.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table(public: dict[str, float], **extra) -> dict:
    """A lever table as bench/cloud_levers.py writes it (only what the recipe reads, plus a
    PrivateTest figure, the same for every lever: it must not matter)."""
    return {"epochs": 30, "limit_per_class": None, "levers": LEVERS, "complete": True, "pending": [],
            "runs": [{"name": n, "public_test": v, "private_test": 0.5} for n, v in public.items()], **extra}


def parsed(flags: list[str]):
    from emoshield.cli import build_parser

    return build_parser().parse_args(["cloud", "pretrain", *flags, "--epochs", "100", "--name", "x"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.55, 0.75), min_size=len(LEVERS), max_size=len(LEVERS)), st.sampled_from([0.0, 0.8, 2.0]))
def test_the_recipe_takes_exactly_the_levers_that_beat_the_baseline_on_publictest(final, scores, margin):
    rows = {r["name"]: r for r in table(dict(zip(LEVERS, scores)))["runs"]}
    recipe = final.choose(rows, margin)
    gains = {n: 100 * (rows[n]["public_test"] - rows["baseline"]["public_test"]) for n in LEVERS[1:]}
    taken = set(recipe["taken"])
    assert all(gains[n] > margin for n in taken)
    seeds = ["baseline-seed1", "baseline-seed2"]
    assert not {"schedule-2x", *seeds} & taken  # the length is --epochs; other seeds measure noise
    for seed in seeds:
        assert ("OVER the" in recipe["reasons"][seed]) is (abs(gains[seed]) > margin)
    spread = [rows[n]["public_test"] for n in ("baseline", *seeds)]
    assert recipe["seed_spread_points"] == pytest.approx(100 * statistics.stdev(spread))
    assert not {"mixup", "cutmix"} <= taken
    if {"mixup", "cutmix"} & taken:  # the one of the two with the higher PublicTest
        assert gains[(taken & {"mixup", "cutmix"}).pop()] == max(gains["mixup"], gains["cutmix"])
    for n in set(LEVERS[1:]) - taken - {"schedule-2x", *seeds}:  # every winner is taken, save the weaker mix
        assert gains[n] <= margin or (n in ("mixup", "cutmix") and {"mixup", "cutmix"} & taken)
    args, base = parsed(recipe["flags"]), parsed(final.BASELINE)
    assert args.backbone == {frozenset(): "smallcnn", frozenset({"wider"}): "widecnn", frozenset({"deeper"}): "deepcnn",
                             frozenset({"wider", "deeper"}): "widedeepcnn"}[frozenset(taken & {"wider", "deeper"})]
    assert args.amp is ("float32" not in taken)
    assert args.mix == next((m for m in ("mixup", "cutmix") if m in taken), "none")
    assert (args.augment == "strong") is ("augment-strong" in taken)
    assert (args.optimizer == "adamw") is ("adamw" in taken)
    assert (args.label_smoothing > 0) is ("label-smoothing" in taken)
    assert (args.pooling == "grid:3") is ("spatial-head" in taken)
    if not taken:
        assert vars(args) == vars(base)
    assert set(recipe["reasons"]) == set(LEVERS[1:])


def test_an_ablation_in_progress_gives_a_dry_run_but_no_training(final, tmp_path, capsys):
    path = tmp_path / "levers.json"
    partial = table({"baseline": 0.674, "wider": 0.70, "mixup": 0.675}, complete=False)
    for r in partial["runs"]:
        r["precision"] = "float32" if r["name"] == "mixup" else "bfloat16"
    path.write_text(json.dumps(partial))
    assert final.main(["--levers", str(path), "--dry-run"]) == 0
    page = capsys.readouterr().out
    assert "| wider | +2.60 | yes |" in page and "| deeper |  | no | not measured |" in page
    assert "| mixup | +0.10 | no | +0.10 <= 0.8 points (trained in float32, the baseline in bfloat16) |" in page
    assert "Expected time" not in page  # the rows have no pace
    for r in partial["runs"]:
        r["seconds_per_epoch"] = {"baseline": 100.0, "wider": 220.0, "mixup": 100.0}[r["name"]]
    path.write_text(json.dumps(partial))
    assert final.main(["--levers", str(path), "--dry-run", "--epochs", "90"]) == 0
    assert "Expected time: ~5.5 h at the ablation's pace (220 s/epoch" in capsys.readouterr().out
    # on every core: bench/backbone_cost.py's measured SmallCNN step, times the same slowdown (2.2x), +5%
    cost = tmp_path / "backbone_cost.json"
    measured = {"batch_size": 64, "input_size": 48,
                "rows": [{"backbone": "smallcnn", "threads": 1, "epoch_step_seconds": 120.0},
                         {"backbone": "smallcnn", "threads": 2, "epoch_step_seconds": 60.0},
                         {"backbone": "smallcnn", "threads": True, "epoch_step_seconds": 1.0},
                         {"backbone": "widecnn", "threads": 2, "epoch_step_seconds": 130.0}]}
    cost.write_text(json.dumps(measured))
    assert final.measured_pace(cost) == (2, {"smallcnn": 60.0, "widecnn": 130.0})
    recipe = final.recipe_for(path, 90, 0.8, partial=True)  # takes wider: widecnn's own step, timed, +5%
    assert "On 2 threads at the step cost `bench/backbone_cost.py` measured (bench/results/backbone_cost.json): " \
           "~3.4 h (136 s/epoch: widecnn's training steps, 130 s," in final.recipe_markdown(recipe, "x", final.measured_pace(cost))
    no_widecnn = (2, {"smallcnn": 60.0})  # a backbone not timed: SmallCNN's step times the lever's slowdown (2.2x)
    assert "~3.5 h (139 s/epoch: SmallCNN's training steps, 60 s, times the same slowdowns" in \
           final.recipe_markdown(recipe, "x", no_widecnn)
    row = {"backbone": "smallcnn", "threads": 2, "epoch_step_seconds": 60}
    for damaged in ("", "[", "[]", '{"rows": 3}', json.dumps({**measured, "rows": [{"backbone": "smallcnn", "threads": 2}]}),
                    json.dumps({**measured, "rows": [{**row, "threads": "2"}]}),
                    json.dumps({**measured, "rows": [{**row, "threads": 0}]}),
                    json.dumps({**measured, "rows": [{**row, "epoch_step_seconds": -1}]}),
                    json.dumps({**measured, "rows": [{**row, "epoch_step_seconds": 10 ** 400}]}),
                    json.dumps({**measured, "batch_size": 128}), json.dumps({**measured, "input_size": 64}),
                    json.dumps({"rows": measured["rows"]})):  # another recipe's step, or of no stated one
        cost.write_text(damaged)
        assert final.measured_pace(cost) is None, damaged
        assert "threads at the step cost" not in final.recipe_markdown(recipe, "x", final.measured_pace(cost))
    assert final.measured_pace(tmp_path / "none.json") is None
    assert "--backbone widecnn" in page and "PrivateTest was not looked at" in page
    assert final.main(["--levers", str(path), "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cloud_final: ") and "not complete (still to train: schedule-2x, " in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_a_run_trained_before_named_levers_says_so_and_is_kept_when_their_rows_agree(final, tmp_path, capsys):
    """--pending LEVER,...: the long run may start before those rows are in (only those); its
    recipe.md names them. Once they are in and the rule gives the same flags, re-running keeps the
    scored run and rewrites its recipe from the whole table; other flags would start anew."""
    path, work, out = tmp_path / "levers.json", tmp_path / "w", tmp_path / "o"
    scores = dict.fromkeys(LEVERS, 0.6)
    path.write_text(json.dumps(table({n: v for n, v in scores.items() if n not in ("float32", "baseline-seed2")},
                                     complete=False)))
    for pending in ("float32", "float32,nonsense", "baseline", ""):  # a row still missing, or not a lever
        assert final.main(["--levers", str(path), "--pending", pending, "--work", str(work), "--out", str(out)]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not out.exists()
    early = final.recipe_for(path, 100, 0.8, pending=("float32", "baseline-seed2"))
    assert early["pending"] == ["float32", "baseline-seed2"] and early["flags"] == final.BASELINE
    page = final.recipe_markdown(early, "x")
    assert "| float32 |  | no | not measured yet: the run starts without its row (--pending) |" in page
    assert "Trained before the ablation's float32, baseline-seed2 rows (`--pending`)" in page
    final.record(work / "x", out / "x", early, "x")  # what a run leaves once trained and scored:
    (out / "x" / "tta.json").write_text(json.dumps({"accuracy": {"one_crop": 0.6, "tencrop": 0.61},
                                                    "limit_per_class": None}))
    (out / "x" / "entry.json").write_text(json.dumps({"sha256": "0" * 64}))
    path.write_text(json.dumps(table(scores)))  # the rows came in and took nothing: the same run
    args = ["--levers", str(path), "--name", "x", "--work", str(work), "--out", str(out)]
    assert final.main([*args, "--pending", "float32,baseline-seed2"]) == 0  # measured rows win over --pending
    assert "recipe.md rewritten" in capsys.readouterr().out
    whole = json.loads((out / "x" / "recipe.json").read_text())
    assert whole["pending"] == [] and whole == json.loads((work / "x" / "recipe.json").read_text())
    assert "--pending" not in (out / "x" / "recipe.md").read_text()
    assert final.main(args) == 0 and "nothing to do" in capsys.readouterr().out
    path.write_text(json.dumps(table(scores | {"float32": 0.62})))  # float32 won: another recipe
    later = final.recipe_for(path, 100, 0.8)
    assert not final.scored(out / "x", later)
    (work / "x" / "run").mkdir()
    final.record(work / "x", out / "x", early, "x")  # (as it was before the rows came in)
    final.prepare(work / "x", out / "x", later, "x")  # trains anew: the early run moved aside
    assert not (work / "x" / "run").exists() and len(list((work / "x").glob("run.superseded-*"))) == 1
    assert json.loads((work / "x" / "recipe.json").read_text())["flags"] == later["flags"] != early["flags"]
    assert not (out / "x" / "tta.json").exists()  # the early run's figures are not the new one's
    (work / "x" / "run").mkdir()
    with pytest.raises(final.RecipeError, match="begun with another recipe"):  # without --pending: refused
        final.prepare(work / "x", out / "x", early, "x")
    from emoshield.reproduce import step_lock

    with step_lock(work / "x") as mine:  # a run in progress: a second process starts nothing
        assert mine and final.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "another process is training" in err and len(err.splitlines()) == 1


def test_a_registered_variant_adds_its_levers_to_the_rule_recipe(final, tmp_path, capsys):
    """--also LEVER: the rule's recipe plus that lever's flags whatever the ablation said (here
    augment-strong lost on PublicTest); its recipe.md says it was added and registered. A lever the
    rule took (the variant would be the rule's recipe), a non-lever and an unknown name are one line."""
    path = tmp_path / "levers.json"
    path.write_text(json.dumps(table(dict.fromkeys(LEVERS, 0.6) | {"wider": 0.62, "augment-strong": 0.58})))
    rows = {r["name"]: r for r in table(dict.fromkeys(LEVERS, 0.6) | {"wider": 0.62, "augment-strong": 0.58})["runs"]}
    rule, variant = final.choose(rows, 0.8), final.choose(rows, 0.8, ("augment-strong",))
    assert rule["taken"] == variant["taken"] == ["wider"] and variant["also"] == ["augment-strong"]
    args = parsed(variant["flags"])
    assert args.augment == "strong" and args.backbone == "widecnn"
    assert vars(args) == vars(parsed(rule["flags"] + ["--augment", "strong"]))
    assert final.main(["--levers", str(path), "--dry-run", "--also", "augment-strong", "--name", "v"]) == 0
    page = capsys.readouterr().out
    assert "| augment-strong | -2.00 | added |" in page and "registered beside the rule's recipe" in page
    for also, said in (("wider", "the rule took it already"), ("baseline-seed1", "not a lever with flags"),
                       ("schedule-2x", "not a lever with flags"), ("sharpen", "not a lever with flags"),
                       ("augment-strong,\u00e9", "not a lever with flags"), ("mixup,cutmix", "changes what cutmix")):
        assert final.main(["--levers", str(path), "--also", also, "--name", "variant", "--work", str(tmp_path / "w"),
                           "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cloud_final: --also ") and said in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as stop:  # the default name is the rule's run: a variant must not replace it
        final.main(["--levers", str(path), "--also", "augment-strong", "--work", str(tmp_path / "w")])
    assert stop.value.code == 2 and "its own --name" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    with pytest.raises(final.SameAsRule):
        final.choose(rows, 0.8, ("wider",))
    assert final.parse_also("a,,b,a") == ("a", "b") and final.parse_also("") == ()
    with pytest.raises(SystemExit) as stop:  # a reason belongs to a variant
        final.main(["--levers", str(path), "--why", "because", "--name", "v", "--work", str(tmp_path / "w")])
    assert stop.value.code == 2 and "needs --also" in capsys.readouterr().err


def test_a_variant_registered_later_says_why_and_keeps_its_reason_on_a_re_run(final, tmp_path, capsys):
    """--why: a variant registered after other runs' results says so in its own words, not in the
    first variant's ("before either long run's result"); re-running without --why keeps them."""
    path, work, out = tmp_path / "levers.json", tmp_path / "w", tmp_path / "o"
    path.write_text(json.dumps(table(dict.fromkeys(LEVERS, 0.6))))
    reason = "Registered on 2026-12-07, after\n both long runs' results: width and depth over a long schedule."
    assert final.main(["--levers", str(path), "--dry-run", "--also", "wider,deeper", "--name", "v",
                       "--why", reason]) == 0
    page = capsys.readouterr().out
    assert "Why (`--why`): Registered on 2026-12-07, after both long runs' results" in page
    assert "before either long run's result" not in page
    recipe = final.recipe_for(path, 100, 0.8, also=("wider", "deeper")) | {"why": " ".join(reason.split())}
    final.record(work / "v", out / "v", recipe, "v")  # what the run's first start leaves
    assert final.main(["--levers", str(path), "--dry-run", "--also", "wider,deeper", "--name", "v",
                       "--work", str(work)]) == 0
    assert "Why (`--why`): Registered on 2026-12-07" in capsys.readouterr().out
    # its work folder lost (a wiped cache): the committed results' recipe keeps the reason
    assert final.main(["--levers", str(path), "--dry-run", "--also", "wider,deeper", "--name", "v",
                       "--work", str(tmp_path / "fresh"), "--out", str(out)]) == 0
    assert "Why (`--why`): Registered on 2026-12-07" in capsys.readouterr().out
    for foreign in (5, ["a"], {"x": 1}, None, ""):  # a recorded reason that is no text is not written
        final.record(work / "v", out / "v", recipe | {"why": foreign}, "v")
        assert final.main(["--levers", str(path), "--dry-run", "--also", "wider,deeper", "--name", "v",
                           "--work", str(work)]) == 0
        page = capsys.readouterr().out
        assert "Why (`--why`)" not in page and "before either long run's result" in page
    assert final.main(["--levers", str(path), "--dry-run", "--also", "wider,deeper", "--name", "v",
                       "--why", "Gr\u00fc\u00dfe \u8868\u60c5 \U0001f600"]) == 0  # non-ASCII is kept as written
    assert "Why (`--why`): Gr\u00fc\u00dfe \u8868\u60c5 \U0001f600" in capsys.readouterr().out


def test_a_variant_never_undoes_a_lever_the_rule_took(final):
    """An --also lever that changes what a taken lever changes would silently undo it (argparse keeps
    the last flag): refused, save wider and deeper, whose backbones combine into WideDeepCNN."""
    def rows(public):
        return {r["name"]: r for r in table(dict.fromkeys(LEVERS, 0.6) | public)["runs"]}

    with_deeper = final.choose(rows({"deeper": 0.62}), 0.8, ("wider",))
    assert with_deeper["taken"] == ["deeper"] and parsed(with_deeper["flags"]).backbone == "widedeepcnn"
    assert "(with deeper: widedeepcnn)" in with_deeper["reasons"]["wider"]
    assert with_deeper["flags"].count("--backbone") == 1  # the command names the merged backbone only
    both_added = final.choose(rows({}), 0.8, ("wider", "deeper", "augment-strong"))
    assert both_added["flags"].count("--backbone") == 1 and parsed(both_added["flags"]).backbone == "widedeepcnn"
    assert vars(parsed(both_added["flags"])) == vars(parsed(final.BASELINE + ["--augment", "strong",
                                                                            "--backbone", "widedeepcnn"]))
    for public, also, clash in (({"cutmix": 0.62}, "mixup", "cutmix"), ({"mixup": 0.62}, "cutmix", "mixup"),
                                ({"adamw": 0.62}, "augment-strong,mixup,cutmix", "cutmix")):
        with pytest.raises(final.RecipeError, match=f"changes what {clash} changes"):
            final.choose(rows(public), 0.8, final.parse_also(also))
    both = final.choose(rows({"adamw": 0.62}), 0.8, ("augment-strong", "float32"))
    args = parsed(both["flags"])
    assert args.optimizer == "adamw" and args.augment == "strong" and args.amp is False


@pytest.mark.parametrize("content", [
    b"", b"{", b"[" * 100_000, b"\xff\xfe", b"[]", b'{"runs": 3}', b'{"runs": [{"name": 1}]}',
    json.dumps(table({"wider": 0.7})).encode(),  # no baseline
    json.dumps(table({"baseline": "0.6"})).encode(), json.dumps(table({"baseline": True})).encode(),
    json.dumps(table({"baseline": 67.4})).encode(),  # a percentage where a fraction belongs
    json.dumps(table({"baseline": float("nan")})).encode(),
    json.dumps(table(dict.fromkeys(LEVERS, 0.6), limit_per_class=6)).encode(),  # a quick slice, not a result
])
def test_a_damaged_or_foreign_lever_table_is_one_line_and_trains_nothing(final, tmp_path, capsys, content):
    path = tmp_path / "levers.json"
    path.write_bytes(content)
    assert final.main(["--levers", str(path), "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cloud_final: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["work", "out"])
@pytest.mark.parametrize("content", [b"[" * 100_000, b"{", b"\xff", b"[]", b"7", None])  # None: a folder
def test_a_damaged_recipe_record_is_one_line_and_trains_nothing(final, tmp_path, capsys, content, where):
    """WORK/NAME/recipe.json or OUT/NAME/recipe.json damaged (a crash, a hand edit): refused before
    any training with one line, never a traceback; nothing is written."""
    levers = tmp_path / "levers.json"
    levers.write_text(json.dumps(table(dict.fromkeys(LEVERS, 0.6))))
    record = tmp_path / where / "x" / "recipe.json"
    record.parent.mkdir(parents=True)
    record.mkdir() if content is None else record.write_bytes(content)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc = final.main(["--levers", str(levers), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
                     "--name", "x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("cloud_final: ") and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_the_long_run_trains_the_chosen_recipe_scores_it_once_and_refuses_another_in_its_folder(tmp_path, data_root):
    """On a slice of FER2013 for 1 epoch: wider and deeper both won (WideDeepCNN), CutMix beat mixup,
    float32 and the spatial head won; the run lands in OUT/NAME with its recipe and test-time figures and its entry in the
    library, a re-run does nothing, the same work folder with another length or slice is refused,
    and a new recipe in another work folder first clears the old run's figures from OUT."""
    public = dict.fromkeys(LEVERS, 0.60) | {"baseline": 0.60, "wider": 0.62, "deeper": 0.615, "mixup": 0.62,
                                            "cutmix": 0.63, "float32": 0.61, "adamw": 0.605, "spatial-head": 0.62}
    levers = tmp_path / "levers.json"
    levers.write_text(json.dumps(table(public, limit_per_class=6)))
    bench = [sys.executable, str(ROOT / "bench" / "cloud_final.py"), "--levers", str(levers), "--data-root",
             str(data_root), "--limit-per-class", "6", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
             "--device", "cpu", "--name", "tiny-final", "--library", str(tmp_path / "library")]
    proc = subprocess.run([*bench, "--epochs", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "work" / "tiny-final" / "train.log").read_text()
    out = tmp_path / "out" / "tiny-final"
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["taken"] == ["wider", "spatial-head", "deeper", "cutmix", "float32"]  # adamw's +0.5: no
    run = json.loads((tmp_path / "work" / "tiny-final" / "run" / "run.json").read_text())
    assert run["backbone"] == "widedeepcnn" and run["train_config"]["mix"] == "cutmix"
    assert run["train_config"]["amp"] is False and run["train_config"]["epochs"] == 1 and run["pooling"] == "grid:3"
    metrics, tta = json.loads((out / "metrics.json").read_text()), json.loads((out / "tta.json").read_text())
    assert tta["accuracy"]["none"] == metrics["test_accuracy"] and set(tta["accuracy"]) == {"none", "flip", "tencrop"}
    assert "| adamw | +0.50 | no | +0.50 <= 0.8 points |" in (out / "recipe.md").read_text()
    assert "| mixup | +2.00 | no | +2.00 > 0.8 points, but cutmix gained more" in (out / "recipe.md").read_text()
    weights = tmp_path / "library" / "tiny-final" / "weights.safetensors"
    entry = json.loads((out / "entry.json").read_text())
    library_meta = json.loads((weights.parent / "metadata.json").read_text())
    assert entry["sha256"] == library_meta["sha256"] and entry["bytes"] == weights.stat().st_size
    assert entry["backbone"] == "widedeepcnn" and entry["embeddable"] is False  # 4.8M float32 parameters
    again = subprocess.run([*bench, "--epochs", "1"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    for other in (["--epochs", "2"], ["--epochs", "1", "--limit-per-class", "7"]):
        proc = subprocess.run([*bench, *other], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "begun with another recipe, length or slice" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    # another recipe (a higher margin: only CutMix left) in a fresh work folder, killed at once:
    # the old run's figures are gone from OUT, its new recipe is there, and it is not 'scored'
    new = [*bench[:bench.index("--work") + 1], str(tmp_path / "work2"), *bench[bench.index("--work") + 2:],
           "--epochs", "1", "--margin", "2.5"]
    proc = subprocess.Popen(new, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "work2" / "tiny-final" / "train.log").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    assert json.loads((out / "recipe.json").read_text())["taken"] == ["cutmix"]
    assert not (out / "tta.json").exists() and not (out / "metrics.json").exists() and not (out / "entry.json").exists()
