"""bench/nested_lr.py: the fine-tuning lr chosen on inner folds of each outer fold's training
people, scored on that outer fold's test people (a tiny slice: the selection logic, not its figures)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("nested_lr", ROOT / "bench" / "nested_lr.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_each_outer_fold_is_scored_at_the_lr_its_inner_folds_chose_and_a_rerun_trains_nothing(
        tmp_path, data_root, monkeypatch):
    script = _script()
    argv = ["--data-root", str(data_root), "--weights", "scratch", "--align", "none", "--input-size", "16",
            "--epochs", "1", "--limit-per-class", "2", "--folds", "2", "--inner-folds", "2",
            "--lrs", "0.01,0.001", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    assert script.main(argv) == 0
    result = json.loads((tmp_path / "out" / "jaffe-subject-smallcnn.json").read_text())
    assert result["complete"] is True and [r["outer_fold"] for r in result["rows"]] == [0, 1]
    for row in result["rows"]:
        means = {lr: sum(scores) / len(scores) for lr, scores in row["inner"].items()}
        best = max(means.values())
        assert row["chosen_lr"] == next(lr for lr in ("0.01", "0.001") if means[lr] == best)  # a tie: the first
        assert row["nested_accuracy"] == row["outer"][row["chosen_lr"]]
        outer_split = json.loads((tmp_path / "work" / f"outer{row['outer_fold']}" / "lr0.01" / "outer" /
                                  "split.json").read_text())
        held_out = {e["subject"] for e in outer_split["entries"] if e["split"] == "test"}
        for lr in ("0.01", "0.001"):
            for inner in (0, 1):
                folder = tmp_path / "work" / f"outer{row['outer_fold']}" / f"lr{lr}" / f"inner{inner}"
                split = json.loads((folder / "split.json").read_text())
                assert split["nested_in"] == {"fold": row["outer_fold"], "folds": 2}
                assert not {e["subject"] for e in split["entries"]} & held_out
                assert json.loads((folder / "run.json").read_text())["train_config"]["lr"] == float(lr)
    from emoshield.errors import EmoshieldError
    from emoshield.pipeline import DataOptions, evaluate_model

    inner = tmp_path / "work" / "outer0" / "lr0.01" / "inner0"  # evaluated on its own split: says it is an inner fold
    metrics = evaluate_model(inner, tmp_path / "eval")
    assert metrics["nested_in"] == [0, 2] and metrics["test_accuracy"] == json.loads(
        (inner / "metrics.json").read_text())["test_accuracy"]
    assert "fold 0/2 of the training people of fold 0/2" in (tmp_path / "eval" / "report.md").read_text()
    with pytest.raises(EmoshieldError, match="--nested-in splits subject folds; it needs --protocol subject"):
        evaluate_model(inner, tmp_path / "eval2", DataOptions(dataset="ckplus48", data_root=str(data_root),
                                                              protocol="all", nested_in=(0, 2)))
    table = (tmp_path / "out" / "jaffe-subject-smallcnn.md").read_text()
    assert "Nested estimate over 2 outer fold(s)" in table and "| 0 |" in table and "| 1 |" in table

    import emoshield.pipeline

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(emoshield.pipeline, "train_model", no_training)
    assert script.main(argv) == 0
    assert json.loads((tmp_path / "out" / "jaffe-subject-smallcnn.json").read_text())["rows"] == result["rows"]
    with pytest.raises(SystemExit) as exited:  # finished runs of other settings are not reused
        script.main([*argv[:argv.index("--epochs") + 1], "2", *argv[argv.index("--epochs") + 2:]])
    assert exited.value.code == 2
    for bad in ("0", "-1", "x", "", "nan", "0.01,2", "0.01,0.010"):
        with pytest.raises(SystemExit) as exited:
            script.main([*argv[:-6], f"--lrs={bad}", *argv[-4:]])
        assert exited.value.code == 2
