"""A retried task keeps one MLflow child run per stage and bit length; runs that an older version
left duplicated still read as one row in report and promote."""

import mlflow
import pytest

from components.tracking import BITS_TAG, STAGE_TAG, stage_run
from pipeline import registry, tracking


@pytest.fixture
def parent(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("lifecycle", artifact_location=(tmp_path / "artifacts").as_uri())
    return client.create_run(experiment, tags={tracking.KIND_TAG: "pipeline"})


def _children(parent):
    return mlflow.MlflowClient().search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def test_a_retried_stage_resumes_its_child_run(parent):
    with pytest.raises(RuntimeError, match="preempted"):
        with stage_run(parent.info.run_id, "teacher", 16, params={"epochs": 3}):
            mlflow.log_metric("loss", 1.0, step=0)
            raise RuntimeError("preempted")
    (failed,) = _children(parent)
    assert failed.info.status == "FAILED"
    with stage_run(parent.info.run_id, "teacher", 16, params={"epochs": 3}):
        mlflow.log_metric("loss", 0.5, step=1)
    with stage_run(parent.info.run_id, "teacher", 32, params={"epochs": 3}):
        pass
    children = _children(parent)
    assert sorted(c.data.tags[BITS_TAG] for c in children) == ["16", "32"]
    (resumed,) = [c for c in children if c.data.tags[BITS_TAG] == "16"]
    assert resumed.info.run_id == failed.info.run_id and resumed.info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(resumed.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5)]


def test_report_and_promote_read_one_row_where_an_older_version_left_two(parent):
    client = mlflow.MlflowClient()
    tags = {"mlflow.parentRunId": parent.info.run_id, STAGE_TAG: "evaluate", BITS_TAG: "16"}
    for status, score in (("FINISHED", 0.6), ("FAILED", 0.1)):  # the killed attempt started later
        child = client.create_run(parent.info.experiment_id, tags=tags)
        for key in registry.GATE_METRICS:
            metric, direction = key.split(".")
            client.log_metric(child.info.run_id, f"student.{direction}.{metric}", score)
        client.set_terminated(child.info.run_id, status)
    for _ in range(2):
        student = client.create_run(parent.info.experiment_id, tags={**tags, STAGE_TAG: "student"})
        client.set_terminated(student.info.run_id, "FINISHED")
    client.set_terminated(parent.info.run_id, "FINISHED")

    rows = tracking.report(None, parent.info.run_id)["results"]
    assert [(r["method"], r["bits"], r["direction"], r["map_50"]) for r in rows] == [
        ("student", 16, "i2t", 0.6), ("student", 16, "t2i", 0.6)]
    _, bits, scores = registry.candidate(client, parent.info.run_id)
    assert bits == 16 and set(scores.values()) == {0.6}
