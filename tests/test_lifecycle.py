"""MLflow runs that end as the pipeline does: a retried task keeps one child run per stage and bit
length, runs that an older version left duplicated read as one row, Ctrl-C ends a local run at
once as KILLED, a killed task is named with its own log. (A failed run ends FAILED:
tests/test_console.py.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from components.tracking import BITS_TAG, STAGE_TAG, stage_run
from pipeline import registry, tracking
from tests.helpers import ROOT, dudch, interruptible


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


def test_a_rerun_that_changes_only_the_student_reuses_prepare_and_teacher_and_logs_them(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    # A seed no other test uses, so that the first run computes everything.
    common = ("--max-items", "300", "--bits", "16", "--seed", "7", "--param", "teacher_epochs=2",
              "--param", "min_word_count=2", "--param", "min_label_size=10")
    first = dudch("run", *common, "--param", "student_outer_iterations=2", env=env, reuse=True)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    second = dudch("run", *common, "--param", "student_outer_iterations=3", env=env, reuse=True)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    for stage in ("prepare", "teacher 16b"):
        assert f"{stage}: reused the output of an earlier run" in second.stdout
        assert f"  {stage} " not in second.stdout.replace(f"{stage}:", "")  # not run again
    assert "  student 16b     started" in second.stdout and "  similarity 16b  started" in second.stdout

    # The new run's MLflow record is complete all the same.
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    parent_id = second.stdout.split("MLflow parent run ")[1].split()[0]
    experiment = client.get_run(parent_id).info.experiment_id
    children = {c.data.tags[STAGE_TAG]: c for c in client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{parent_id}'")}
    assert set(children) == {"prepare", "teacher", "similarity", "student", "evaluate"}
    assert all(c.info.status == "FINISHED" for c in children.values())
    teacher = children["teacher"]
    assert len(client.get_metric_history(teacher.info.run_id, "loss")) == 2
    assert teacher.data.params["epochs"] == "2" and teacher.data.metrics["stage_wall_time_s"] > 0
    assert {a.path for a in client.list_artifacts(teacher.info.run_id)} >= {"plots"}
    assert [m.name for m in client.search_logged_models([experiment], filter_string=f"source_run_id = '{teacher.info.run_id}'")] == ["teacher"]
    assert [a.path for a in client.list_artifacts(children["prepare"].info.run_id, "retrieval")] == [
        "retrieval/encoders.json", "retrieval/items.npz"]
    assert children["prepare"].data.metrics["items"] > 0
    assert client.get_run(parent_id).data.metrics["student.i2t.map_50.16b"] > 0


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_stopped_local_run_stops_every_task_at_once_and_is_killed(tmp_path, stop):
    """Ctrl-C: SIGINT to the run's process group, as a terminal sends it. SIGTERM (`kill PID`)
    reaches the CLI alone, which stops its tasks itself. Three teachers, one of them queued."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "out.txt"
    with open(log, "w") as out:
        run = subprocess.Popen([str(Path(sys.executable).with_name("dudch")), "run", "--max-items", "300",
                                "--bits", "16", "32", "64", "--param", "teacher_epochs=100000", "--param",
                                "min_word_count=2", "--param", "min_label_size=10", "--keep-runs", "0",
                                "--no-cache"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                               env={**os.environ, "MLFLOW_TRACKING_URI": store}, start_new_session=True,
                               preexec_fn=interruptible)
        try:
            deadline = time.time() + 600  # prepare first: slow on a loaded machine
            while "teacher 16b     started" not in log.read_text() and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(2)
            if stop == "ctrl-c":
                os.killpg(run.pid, signal.SIGINT)
            else:
                run.terminate()
            # Stopping takes a second or two; the teachers alone would run for hours. The bound
            # is there only so that a run that does not stop fails the test.
            assert run.wait(timeout=600) == 2
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    assert log.read_text().strip().splitlines()[-1].startswith("error: stopped (Ctrl-C or SIGTERM); MLflow run ")
    assert "Traceback" not in log.read_text()
    for _ in range(50):  # no task runs on (given a moment to exit)
        left = subprocess.run(["pgrep", "-g", str(run.pid)], capture_output=True, text=True).stdout.split()
        if not left:
            break
        time.sleep(0.1)
    assert left == []
    mlflow.set_tracking_uri(store)
    runs = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("dudch").experiment_id])
    statuses = {r.data.tags.get("dudch.stage", "pipeline"): r.info.status for r in runs}
    assert statuses["pipeline"] == "KILLED" and "RUNNING" not in statuses.values()



def test_a_task_killed_by_sigkill_is_named_with_its_own_log(tmp_path):
    """SIGKILL (or the out-of-memory killer) leaves a task no chance to report: the console
    names it from its start without an end, shows its own log (not the runner's), and the run
    ends FAILED with nothing left RUNNING."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        run = subprocess.Popen([str(Path(sys.executable).with_name("dudch")), "run", "--max-items", "300",
                                "--bits", "16", "--param", "teacher_epochs=100000", "--param", "min_word_count=2",
                                "--param", "min_label_size=10", "--keep-runs", "0", "--no-cache"], cwd=ROOT,
                               stdout=stdout, stderr=stderr, start_new_session=True,
                               env={**os.environ, "MLFLOW_TRACKING_URI": store})
    try:
        teacher, deadline = None, time.time() + 900  # prepare first: slow on a loaded machine
        while teacher is None and time.time() < deadline and run.poll() is None:
            time.sleep(0.5)
            if "Logs: " in out.read_text():
                events = ROOT / out.read_text().split("Logs: ")[1].split("/ ")[0] / "events.jsonl"
                teacher = next((e for e in map(json.loads, events.read_text().splitlines())
                                if e["event"] == "start" and e["stage"] == "teacher"), None)
        assert teacher, "the teacher never started: " + out.read_text()[-2000:] + err.read_text()[-2000:]
        while "teacher-16b: 1/" not in Path(teacher["log"]).read_text() and time.time() < deadline:
            time.sleep(0.2)  # into its epochs, its MLflow run started
        os.kill(teacher["pid"], signal.SIGKILL)
        run.wait(timeout=600)  # only so that a run that never ends fails the test
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    printed, errors = out.read_text(), err.read_text()
    assert run.returncode == 2, printed[-2000:] + errors[-2000:]
    assert errors.strip().splitlines()[-1].startswith("error: task teacher 16b failed: it was killed before "
                                                      "it could report an error (SIGKILL, or the out-of-memory killer")
    assert f"Last lines of teacher 16b's log ({teacher['log']}):" in printed
    assert "kfp.log" not in printed.split("Last lines")[1] and "Traceback" not in printed + errors
    mlflow.set_tracking_uri(store)
    runs = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("dudch").experiment_id])
    statuses = {r.data.tags.get("dudch.stage", "pipeline"): r.info.status for r in runs}
    # The teacher (a cached stage) logs its MLflow run in a task after it, which never ran.
    assert statuses["pipeline"] == "FAILED" and "RUNNING" not in statuses.values()
