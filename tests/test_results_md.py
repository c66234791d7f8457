"""scripts/results_md.py: RESULTS.md and README's results block from the committed results."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "results_md.py"


def run(tmp_path, *args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def results(tmp_path):
    """A copy of the committed results, to change freely."""
    shutil.copytree(ROOT / "results", tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- results:begin (scripts/results_md.py) -->\nstale\n<!-- results:end -->\nafter\n")
    return tmp_path


def _args(tmp):
    r = tmp / "results"
    return ["--studies", r / "reproduce", "--pretrain", r / "cloud_pretrain", "--cross", r / "cross",
            "--apgd-fix", r / "apgd_fix", "--levers", r / "cloud_levers", "--out", tmp / "RESULTS.md",
            "--readme", tmp / "README.md"]


def test_results_page_shows_the_rerun_studies_with_autoattack_and_the_checks(results):
    proc = run(results, *_args(results))
    assert proc.returncode == 0, proc.stderr
    page = (results / "RESULTS.md").read_text()
    study = json.loads((results / "results/reproduce/ckplus48-subject-v2/results.json").read_text())
    aa = study["summary"]["smallcnn"]["defended"]["autoattack@0.01"]
    # the re-run replaces its pre-fix study in the tables; the old one is listed as superseded
    assert "ckplus48-subject-v2/report.md) | smallcnn" in page
    assert "ckplus48-subject/report.md) | resnet18" not in page
    assert "## Earlier studies (superseded)" in page and "[ckplus48-subject](" in page
    assert f"**{aa['mean'] * 100:.1f} ± {aa['std'] * 100:.1f}**" in page
    for section in ("## Is the robustness real? Gradient-masking checks", "## Across datasets",
                    "[ckplus48 → jaffe](", "## APGD-CE before and after its step-size fix", "## The claims, one table each"):
        assert section in page
    shipped = json.loads((results / "results/cross/fer2013-jaffe/results.json").read_text())["summary"]["smallcnn"]
    own, other = (shipped["no fine-tuning"][k]["clean"]["mean"] for k in ("source", "target"))
    # the entry is named: several long runs' entries are tested on the same dataset
    assert (f"[fer2013 → jaffe](results/cross/fer2013-jaffe/report.md) | smallcnn | no fine-tuning, "
            f"`{json.loads((results / 'results/cross/fer2013-jaffe/results.json').read_text())['library_entry']['name']}` | 1 | "
            f"{own * 100:.1f} | n/a | {other * 100:.1f} |") in page and "its FER2013 PrivateTest accuracy" in page
    readme = (results / "README.md").read_text()
    assert readme.startswith("# x\n\nbefore\n<!-- results:begin") and readme.endswith("<!-- results:end -->\nafter\n")
    assert "stale" not in readme and "| [ckplus48 subject v2](results/reproduce/ckplus48-subject-v2/report.md) | smallcnn | 5 |" in readme
    # a re-run of the same study is told apart by its folder's version, in every table
    assert "| jaffe subject v2 | smallcnn | 5 |" in page and "| jaffe subject v3 | smallcnn | 5 |" in page


def test_cross_rows_of_two_studies_say_what_each_was_fine_tuned_from(results):
    """jaffe -> ckplus48 exists twice (v2 and v3); the rows must not read as the same models."""
    proc = run(results, *_args(results))
    assert proc.returncode == 0, proc.stderr
    page = (results / "RESULTS.md").read_text()
    for name, start, aligned in (("jaffe-ckplus48", "smallcnn-fer2013-48px", ""),
                                 ("jaffe-ckplus48-v3", "fer2013-48px-final-strong", ", aligned")):
        study = json.loads((results / f"results/cross/{name}/results.json").read_text())["study"]
        assert study["weights"]["smallcnn"] == f"library:{start}" and bool(study["options"].get("align")) == bool(aligned)
        for model in ("defended", "undefended"):
            assert f"(results/cross/{name}/report.md) | smallcnn | {model}, from `{start}`{aligned} |" in page
    assert "mobilenet_v2 | defended, from `imagenet` |" in page


def test_a_study_still_running_shows_k_of_n_units(results):
    path = results / "results/reproduce/ckplus48-subject-v2/results.json"
    study = json.loads(path.read_text())
    study["units"]["mobilenet_v2"].pop("fold4-seed0")
    study.update(complete=False, pending_units=["mobilenet_v2-fold4-seed0"])
    path.write_text(json.dumps(study))
    assert run(results, *_args(results)).returncode == 0
    page = (results / "RESULTS.md").read_text()
    assert "| mobilenet_v2 (`imagenet`) | 4 of 5 |" in page and "| smallcnn (`library:smallcnn-fer2013-48px`) | 5 |" in page


def test_a_study_trained_with_another_datasets_faces_or_lr_says_so_in_its_row(results):
    path = results / "results/reproduce/jaffe-subject-v3/results.json"
    study = json.loads(path.read_text())
    study["options"].update(extra_train=["ckplus48"], finetune_lr=0.001, defended_epochs=100)
    path.write_text(json.dumps(study))
    assert run(results, *_args(results)).returncode == 0
    page = (results / "RESULTS.md").read_text()
    readme = (results / "README.md").read_text()
    name = "jaffe subject v3 (+ ckplus48 faces) (fine-tuned at lr 0.001) (defended run 100 epochs)"
    for text in (page, readme):  # every table names the study, so each row says it
        assert f"[{name}](results/reproduce/jaffe-subject-v3/report.md) | smallcnn" in text
        assert "[ckplus48 subject v3](results/reproduce/ckplus48-subject-v3/report.md) | smallcnn" in text
    assert f"| {name} | smallcnn | 5 |" in page  # the masking checks
    assert "| jaffe subject v2 | smallcnn |" in page  # a study without either option: its name alone


def test_a_readme_without_the_block_is_an_error_not_a_silent_skip(results):
    (results / "README.md").write_text("# no block\n")
    proc = run(results, *_args(results))
    assert proc.returncode != 0 and "no <!-- results:begin" in proc.stderr
    assert (results / "README.md").read_text() == "# no block\n"


def test_the_cloud_tier_table_shows_flip_and_ten_crop_from_pretrain_tta(results, tmp_path, data_root):
    """scripts/pretrain_tta.py on a few FER2013 test faces: refused when the run's own one-crop
    figure disagrees (another model or other images), written when it agrees; RESULTS.md's
    cloud-tier table then shows flip / ten-crop, and '—' for a run without (or with a damaged) tta.json."""
    import importlib.util

    from emoshield.pipeline import DataOptions, evaluate_model

    spec = importlib.util.spec_from_file_location("pretrain_tta", ROOT / "scripts" / "pretrain_tta.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run_dir = results / "results/cloud_pretrain/smallcnn-fer2013-48px-amp"
    (run_dir / "tta.json").unlink(missing_ok=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    argv = ["--model", "library:smallcnn-fer2013-48px", "--into", str(run_dir), "--data-root", str(data_root),
            "--limit-per-class", "60"]
    for bad in ("[]", "not json", json.dumps({"test_accuracy": None})):  # refused before any evaluation
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "metrics.json").write_text(bad)
        assert script.main([*argv[:2], "--into", str(tmp_path / "bad"), *argv[4:]]) == 2
    assert script.main(argv) == 2 and not (run_dir / "tta.json").exists()  # a few faces: not the run's 67.9%
    data = DataOptions(dataset="fer2013", data_root=str(data_root), protocol="official", limit_per_class=60)
    few = evaluate_model("library:smallcnn-fer2013-48px", tmp_path / "one", data)
    one_crop = few["test_accuracy"]
    assert 20 <= few["num_images"] <= 200 and one_crop != metrics["test_accuracy"]
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "test_accuracy": one_crop}))
    assert script.main(argv) == 0
    tta = json.loads((run_dir / "tta.json").read_text())
    assert tta["accuracy"]["none"] == one_crop and tta["num_images"] == few["num_images"]
    assert tta["limit_per_class"] == 60
    assert all(0 <= tta["accuracy"][m] <= 1 for m in ("flip", "tencrop"))
    # a subset's figures are not the run's: the table takes only whole-test-set ones of the same model
    assert run(results, *_args(results)).returncode == 0
    row = next(line for line in (results / "RESULTS.md").read_text().splitlines()
               if line.startswith("| [smallcnn-fer2013-48px-amp]"))
    assert "| — |" in row
    whole = {**tta, "limit_per_class": None, "accuracy": {"none": metrics["test_accuracy"], "flip": 0.6874,
                                                          "tencrop": 0.6949}}
    (run_dir / "tta.json").write_text(json.dumps(whole))
    (run_dir / "metrics.json").write_text(json.dumps(metrics))  # the table's other columns as committed
    assert run(results, *_args(results)).returncode == 0
    row = next(line for line in (results / "RESULTS.md").read_text().splitlines()
               if line.startswith("| [smallcnn-fer2013-48px-amp]"))
    assert "| 68.7 / 69.5 |" in row
    for damaged in ("not json", "[]", "[" * 100_000, json.dumps({"accuracy": {"flip": 0.5}}),
                    json.dumps({**whole, "accuracy": None}), json.dumps({**whole, "accuracy": {**whole["accuracy"],
                                                                                             "flip": "x"}}),
                    json.dumps({**whole, "accuracy": {**whole["accuracy"], "tencrop": float("nan")}}),
                    json.dumps({**whole, "accuracy": {**whole["accuracy"], "none": 0.5}})):  # another model
        (run_dir / "tta.json").write_text(damaged)
        assert run(results, *_args(results)).returncode == 0
        row = next(line for line in (results / "RESULTS.md").read_text().splitlines()
                   if line.startswith("| [smallcnn-fer2013-48px-amp]"))
        assert "| — |" in row


def test_the_long_runs_row_links_its_recipe_and_names_its_levers(results):
    """bench/cloud_final.py's run in results/cloud_pretrain/NAME: its row links recipe.md and says
    which levers beyond batch, lr, schedule and augmentation it trained with."""
    pretrain = results / "results/cloud_pretrain"
    final = pretrain / "fer2013-48px-final"
    shutil.rmtree(final, ignore_errors=True)  # (the real long run's files, when committed: replaced by a stand-in)
    shutil.copytree(pretrain / "smallcnn-fer2013-48px-amp", final)
    run_json = json.loads((final / "run.json").read_text())
    run_json["pooling"] = "grid:3"
    run_json["train_config"].update(optimizer="adamw", weight_decay=0.05, mix="cutmix", mix_alpha=1.0,
                                    label_smoothing=0.1)
    (final / "run.json").write_text(json.dumps(run_json))
    (final / "recipe.md").write_text("# recipe\n")
    assert run(results, *_args(results)).returncode == 0
    lines = (results / "RESULTS.md").read_text().splitlines()
    row = next(line for line in lines if line.startswith("| [fer2013-48px-final]"))
    assert "([recipe](results/cloud_pretrain/fer2013-48px-final/recipe.md))" in row
    assert "`--augment standard`, adamw (weight decay 0.05), cutmix alpha 1.0, label smoothing 0.1, " \
           "head pooling grid:3 |" in row
    shipped = next(line for line in lines if line.startswith("| [smallcnn-fer2013-48px-amp]"))
    assert "recipe" not in shipped and "`--augment standard` |" in shipped


def test_the_masking_table_says_where_the_apgd_follow_up_ran_was_not_needed_or_is_missing():
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_md_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def unit(sweep, **more):
        return {"masking_checks": {"sweep": {"0.03": 0.5, "0.05": 0.3, "0.1": sweep}, **more},
                "defended": {"pgd@0.01": 0.9}, "sanity_flags": []}

    def row(units):
        study = {"dataset": "ckplus48", "protocol": "subject", "units": {"smallcnn": units}}
        return next(line for line in module.masking_table([study]) if line.startswith("| ckplus48"))

    assert "| not needed |" in row({"a": unit(0.0), "b": unit(0.05)})
    assert "| 1.0 (1 of 2) |" in row({"a": unit(0.3, sweep_apgd={"0.1": 0.01}), "b": unit(0.0)})
    assert "| not run on 1 |" in row({"a": unit(0.3), "b": unit(0.0)})  # an old unit: not "not needed"
    assert "| 1.0 (1 of 2); not run on 1 |" in row({"a": unit(0.3, sweep_apgd={"0.1": 0.01}), "b": unit(0.2)})


def test_the_lever_ablation_shows_its_table_and_how_far_it_has_got(results):
    levers = results / "results" / "cloud_levers"
    shutil.rmtree(levers, ignore_errors=True)
    assert run(results, *_args(results)).returncode == 0  # none yet: no section
    assert "levers, one at a time" not in (results / "RESULTS.md").read_text()
    levers.mkdir(parents=True)
    (levers / "levers.json").write_text(json.dumps({"levers": ["baseline", "mixup", "wider"], "complete": False,
                                                    "pending": ["wider"], "runs": [{"name": "baseline"}, {"name": "mixup"}]}))
    (levers / "levers.md").write_text("# its own title\n\n| lever | PrivateTest |\n|---|---:|\n| baseline | **67.9** |\n")
    assert run(results, *_args(results)).returncode == 0
    page = (results / "RESULTS.md").read_text()
    assert "## The cloud tier's levers, one at a time (2 of 3 levers so far; still to run: wider)" in page
    assert "| baseline | **67.9** |" in page and "its own title" not in page
    assert "(results/cloud_levers/levers.md)" in page
    (levers / "levers.json").write_text("{")  # damaged: left out, the page is still written
    assert run(results, *_args(results)).returncode == 0
    assert "levers, one at a time" not in (results / "RESULTS.md").read_text()


@pytest.mark.parametrize("folder", ["apgd_fix", "apgd_fix_seeds"])
def test_apgd_fix_report_is_its_results_json_with_data_input_and_epochs(tmp_path, folder):
    """bench/apgd_fix.py --render rebuilds report.md from results.json alone: the committed pair is
    in sync, and every row names its data, protocol, backbone, input size and training epochs."""
    shutil.copytree(ROOT / "results" / folder, tmp_path / folder)
    (tmp_path / folder / "report.md").unlink()
    bench = [sys.executable, ROOT / "bench" / "apgd_fix.py", "--out", tmp_path / folder, "--render"]
    proc = subprocess.run(bench, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / folder / "report.md").read_text()
    assert report == (ROOT / "results" / folder / "report.md").read_text()
    rows = json.loads((tmp_path / folder / "results.json").read_text())["rows"]
    for r in rows:
        assert (f"| {r['study']} | {r['unit']} | {r['dataset']}, {r['protocol']} | {r['backbone']} | "
                f"{r['input_size']} px, {r['epochs']} | {r['model']} |") in report
    (tmp_path / folder / "results.json").write_text('{"rows": [{"study": "x"}]')  # truncated
    proc = subprocess.run(bench, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("cannot render") and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("file", ["reproduce/ckplus48-subject-v2/results.json", "cross/fer2013-jaffe/results.json",
                                  "cloud_pretrain/smallcnn-fer2013-48px-amp/metrics.json",
                                  "cloud_pretrain/smallcnn-fer2013-48px-amp/history.json", "apgd_fix/results.json"])
@pytest.mark.parametrize("content", [b"", b'{"summary": {', b"[" * 100_000, b"\xff\xfe{}", b"[]", b'{"x": 1}'],
                         ids=["empty", "truncated", "nested", "not-utf8", "list", "other-object"])
def test_a_damaged_results_file_leaves_the_pages_as_they_were_and_names_it(results, file, content):
    """A study killed mid-write or a hand edit: the script exits 2 with one line (naming the file
    when it does not read), and RESULTS.md and README keep their last good version (the study
    driver prints that line, instead of the page going stale without a word)."""
    assert run(results, *_args(results)).returncode == 0
    page, readme = (results / "RESULTS.md").read_bytes(), (results / "README.md").read_bytes()
    (results / "results" / file).write_bytes(content)
    proc = run(results, *_args(results))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("results_md: ") and "left as they were" in proc.stderr
    if content in (b"", b'{"summary": {', b"[" * 100_000, b"\xff\xfe{}"):
        assert file in proc.stderr
    assert (results / "RESULTS.md").read_bytes() == page and (results / "README.md").read_bytes() == readme
