"""The teacher option through a real small pipeline run: teacher=ucch trains UCCH (with the
ucch_ parameters), the similarity stage and the student distil it, and the MLflow runs,
`report`, `compare` and the registry name it."""

import pytest

from dudch import nets, ucch
from tests.helpers import dudch, run_pipeline

UCCH_EPOCHS = 2


@pytest.fixture(scope="module")
def ucch_run(tmp_path_factory):
    import mlflow

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"}
    _, run_id, kfp_dir = run_pipeline("--max-items", "200", "--bits", "16", "--param", "teacher=ucch",
                                      "--param", f"ucch_epochs={UCCH_EPOCHS}", "--param", "ucch_hidden=64",
                                      "--param", "ucch_negatives=64", "--param", "ucch_batch_size=32",
                                      "--param", "student_outer_iterations=2", "--param", "min_word_count=2",
                                      "--param", "min_label_size=5", env=env)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return dict(env=env, run_id=run_id, kfp_dir=kfp_dir, client=mlflow.MlflowClient())


def test_the_teacher_stage_trains_ucch_and_the_student_distils_it(ucch_run):
    client, run_id = ucch_run["client"], ucch_run["run_id"]
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["teacher"] == "ucch"
    children = {c.data.tags["dudch.stage"]: c for c in client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")}
    teacher = children["teacher"]
    assert teacher.data.params["teacher"] == "ucch" and teacher.data.tags["dudch.teacher"] == "ucch"
    assert teacher.data.params["hidden"] == "64" and teacher.data.params["negatives"] == "64"
    assert len(client.get_metric_history(teacher.info.run_id, "loss")) == UCCH_EPOCHS
    (model,) = ucch_run["kfp_dir"].glob("for-loop-*/train-teacher/teacher/model.pt")
    trained, config = nets.load(model)
    assert trained.dims["image_hidden"] == [64, 64] and trained.dims["text_hidden"] == [64]
    assert config["temperature"] == ucch.UCCHConfig().temperature  # a UCCH config: DJSRH has none
    assert children["student"].info.status == "FINISHED"
    assert any(k.startswith("teacher.") for k in children["evaluate"].data.metrics)
    (report,) = ucch_run["kfp_dir"].glob("for-loop-*/evaluate/report")
    assert report.read_text().startswith("# DUDCH, 16 bits, teacher UCCH\n")  # the KFP UI's report


def test_report_compare_and_promote_name_the_teacher(ucch_run):
    env, run_id = ucch_run["env"], ucch_run["run_id"]
    report = dudch("report", "--run-id", run_id, env=env)
    assert report.returncode == 0, report.stderr
    assert "teacher UCCH" in report.stdout and "teacher (UCCH)    16" in report.stdout
    compare = dudch("compare", env=env)
    assert compare.returncode == 0 and f"{run_id[:8]}" in compare.stdout and " UCCH " in compare.stdout
    promoted = dudch("promote", "--run", run_id, env=env)
    assert promoted.returncode == 0, promoted.stderr
    assert "(a student of UCCH)" in promoted.stdout
    (version,) = ucch_run["client"].search_model_versions("name = 'dudch'")
    assert version.tags["dudch.teacher"] == "UCCH"
