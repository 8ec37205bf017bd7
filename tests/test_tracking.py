"""Experiment tracking: logger=mlflow writes a SQLite store in the run directory that MLflow's client reads back;
TensorBoard gets the run's hyperparameters and final metrics."""
from __future__ import annotations

import json

from conftest import FAST, sciml, write_h5


def test_mlflow_and_tensorboard_record_the_run(tmp_path):
    data = write_h5(tmp_path / "images.h5", n=256)
    run_dir = tmp_path / "run"
    result = sciml("+plugin=hep", f"data.path={data}", f"hydra.run.dir={run_dir}", *FAST, "trainer.max_epochs=1",
                   "task.bootstrap=20", "logger=[mlflow,tensorboard]", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / "mlflow.db").is_file(), "the tracking store is a database file in the run directory"
    assert not (tmp_path / "mlruns").exists(), "nothing lands outside the run directory"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hep")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["test/auc"] == metrics["test/auc"]
    assert run.data.params["optimizer/lr"] == "0.005" and run.data.params["model/widths"] == "[8, 8]"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/roc.png" in plots

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    hparams = (run_dir / "tensorboard" / "hparams.yaml").read_text()
    assert "widths" in hparams and "num_classes" in hparams, "hparams.yaml holds the run's settings"
    assert "final/test/auc" in events.Tags()["scalars"], "final metrics under final/, off the training curves"
