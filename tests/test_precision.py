"""`trainer.precision=bf16-mixed` end to end: every plugin trains, tests and writes predictions (bf16 outputs are
cast for numpy), and the metrics come out finite. HEP is fast; the others are marked slow."""
import json
import math

import pytest
from conftest import FAST, sciml, write_h5

BF16 = ["trainer.precision=bf16-mixed", "trainer.max_epochs=1", "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2", "callbacks.progress_bar=null",
        "trainer.enable_model_summary=false"]


def check(result, run_dir, keys):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in keys:
        assert math.isfinite(metrics[key]), key
    return metrics


def test_hep_bf16(tmp_path):
    data = write_h5(tmp_path / "images.h5", n=256)
    run_dir = tmp_path / "run"
    result = sciml("+plugin=hep", f"data.path={data}", f"hydra.run.dir={run_dir}", *FAST, *BF16)
    check(result, run_dir, ("test/auc", "test/loss", "val/auc", "train/loss"))
    assert (run_dir / "predictions" / "images_scores.h5").is_file()
    assert "threads: " in (run_dir / "hep.log").read_text(), "the thread setting is logged at start"


@pytest.mark.slow
@pytest.mark.parametrize("overrides, keys", [
    (["+plugin=climate", "model.widths=[8,16]", "data.num_maps=1"], ("test/miou", "test/iou_tc")),
    (["+plugin=hail", "model.widths=[8,16]"], ("test/auc", "test/bss")),
    (["+plugin=hail", "hail/target=regression", "model.widths=[8,16]"], ("test/rmse", "test/auc")),
    (["+plugin=hail", "hail/data=storms"], ("test/auc", "test/loss")),
], ids=["climate", "hail-patches", "hail-regression", "hail-storms"])
def test_plugins_bf16(tmp_path, overrides, keys):
    run_dir = tmp_path / "run"
    check(sciml(*overrides, f"hydra.run.dir={run_dir}", *BF16), run_dir, keys)


@pytest.mark.slow
def test_tumor_bf16(tmp_path):
    from test_tumor_reader import write_cases

    cases = write_cases(tmp_path / "cases", 4, shape=(36, 40, 12))
    run_dir = tmp_path / "run"
    result = sciml("+plugin=tumor", f"data.path={cases}", "data.train_cases=rest", "data.test_cases=2",
                   "data.patch_size=32", "data.batch_size=8", "data.samples_per_epoch=32", "model.channels=[8,16,32]",
                   "model.strides=[2,2]", "model.downsample=1", "trainer.check_val_every_n_epoch=1",
                   f"hydra.run.dir={run_dir}", *BF16)
    check(result, run_dir, ("test/dice_wt", "test/hd95_wt", "test/miou"))
