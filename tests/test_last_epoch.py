"""bench/last_epoch.py: every finished run of a study read twice on its held-out people, the kept
(best-validation) model and the last epoch's weights from the resume checkpoint."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("last_epoch", ROOT / "bench" / "last_epoch.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_kept_model_and_the_last_epoch_are_both_scored_and_a_stale_checkpoint_is_refused(tmp_path, data_root,
                                                                                              capsys):
    from emoshield.pipeline import DataOptions, ModelOptions, model_test_data, train_model, _decode_for
    from emoshield.training import TrainConfig, predict_logits
    from emoshield.training.checkpoint import load_checkpoint
    from emoshield.training.trainer import make_optimizer

    work = tmp_path / "work"
    run = work / "smallcnn" / "fold0-seed0" / "localization"
    config = TrainConfig(epochs=3, seed=0, lr=0.05)
    train_model(DataOptions(dataset="jaffe", data_root=str(data_root), protocol="subject", fold=0, folds=5,
                            limit_per_class=4),
                ModelOptions(backbone="smallcnn", weights="scratch", head="localization", input_size=16), config,
                run, progress=False)
    (work / "study.json").write_text(json.dumps({"options": {"dataset": "jaffe", "protocol": "subject"},
                                                 "weights": {"smallcnn": "scratch"}}))
    out = tmp_path / "out"
    script = _script()
    assert script.main(["--work", str(work), "--runs", "localization", "--out", str(out), "--name", "t"]) == 0
    result = json.loads((out / "t.json").read_text())
    [row] = result["rows"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert row["best"] == pytest.approx(metrics["test_accuracy"]) and row["best_epoch"] == metrics["best_epoch"]
    assert row["last_epoch"] == 3 and row["epochs"] == 3
    # the last epoch's accuracy, through the trainer's own resume path
    model, records, root, meta = model_test_data(run)
    load_checkpoint(run, model, make_optimizer(model, config), torch.Generator())
    test, _ = _decode_for(model, records, root, meta["classes"])
    assert row["last"] == pytest.approx((predict_logits(model, test.pixels).argmax(1) == test.labels).float().mean().item())
    assert result["mean"]["localization"] == {"best": row["best"], "last": row["last"]}
    assert "| fold0-seed0 | localization |" in (out / "t.md").read_text()
    # a run that says it trained longer than its checkpoint: the checkpoint is not its last epoch
    meta_file = run / "run.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "epochs": 5}))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        script.main(["--work", str(work), "--runs", "localization", "--out", str(out), "--name", "t"])
    assert "its checkpoint is of epoch 3, not the last (5)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no unit with these runs
        script.main(["--work", str(work), "--runs", "defended", "--out", str(out)])
    assert "no unit with finished defended runs" in capsys.readouterr().err
