"""`dudch run`'s console: a line per task start and end, each data warning once, the results;
everything else in a log file per task; a failure as the task's one-line error and its log's
end, without a traceback."""

import json
import os
from pathlib import Path

import mlflow

from tests import datasets
from tests.conftest import BITS
from pipeline.cli import _keep_latest
from tests.helpers import ROOT, dudch

TASKS = ["prepare"] + [f"{stage} {bits}b" for stage in ("teacher", "similarity", "student", "evaluate")
                        for bits in BITS] + ["finish"]


def test_one_line_per_task_start_and_end_and_the_rest_in_logs(pipeline_run):
    out = pipeline_run["stdout"]
    lines = out.splitlines()
    for task in TASKS:
        assert sum(f"  {task} " in line and line.endswith(" started") for line in lines) == 1, task
        assert sum(f"  {task} " in line and " done in " in line for line in lines) == 1, task
    assert "KFP Executor" not in out and "Traceback" not in out and "epochs" not in out
    # Every data warning once, though several tasks could report it.
    warnings = [line.split("warning: ")[1] for line in lines if "warning: " in line]
    assert warnings and len(warnings) == len(set(warnings))
    assert any("no text word in the vocabulary" in w for w in warnings)
    assert len(lines) <= 2 * len(TASKS) + 25  # the results table, warnings and a few lines more

    logs = ROOT / out.split("Logs: ")[1].split("/ ")[0]
    assert logs.name == pipeline_run["run_id"]
    names = {p.name for p in logs.iterdir()}
    recorded = {"log-prepare.log"} | {f"log-teacher-{bits}b.log" for bits in BITS}  # quiet: no console line
    assert {task.replace(" ", "-") + ".log" for task in TASKS} | recorded | {"kfp.log", "events.jsonl"} == names
    assert "KFP Executor" in (logs / "kfp.log").read_text()
    teacher = (logs / f"teacher-{BITS[0]}b.log").read_text()
    assert f"teacher-{BITS[0]}b: 1/" in teacher
    assert "MLflow run of this task" in (logs / f"log-teacher-{BITS[0]}b.log").read_text()
    events = [json.loads(line) for line in (logs / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "end" and e["status"] == "ok" for e in events) == len(TASKS)
    # The tasks' launchers made their temporary folders in the run's scratch folder, now gone.
    scratch = ROOT / ".dudch" / "tmp" / pipeline_run["run_id"]
    assert f"--component_module_path `{scratch}/" in (logs / "kfp.log").read_text() and not scratch.exists()


def test_only_the_newest_runs_outputs_are_kept(tmp_path):
    for age, name in enumerate(["dudch-3", "dudch-1", "dudch-2"]):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1000 + age, 1000 + age))
    _keep_latest(tmp_path, 0)
    assert len(list(tmp_path.iterdir())) == 3
    _keep_latest(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dudch-1", "dudch-2"]


def test_a_failing_task_reports_its_error_and_log_tail_without_a_traceback(tmp_path, openclipart_root):
    pixels, _, _, tags = datasets.real_items(openclipart_root, 12)
    path = datasets.manifest(tmp_path / "own", pixels, [" ".join(t) for t in tags])
    (tmp_path / "own" / "images" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    done = dudch("run", "--dataset", f"manifest:{path}", "--bits", "16", "--param", "on_bad_image=fail",
                 env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: task prepare failed: cannot decode image images/3.png")
    assert "Traceback" not in done.stdout + done.stderr
    assert "prepare         FAILED after" in done.stdout
    log = done.stdout.split("Last lines of prepare's log (")[1].split(")")[0]
    assert "Traceback" in Path(log).read_text()  # kept for whoever wants it
    # The pipeline's exit task ended the MLflow runs: none is left RUNNING.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("dudch").experiment_id])
    assert [(r.info.run_name.split()[0], r.info.status) for r in runs] == [("manifest", "FAILED")]
    (parent,) = [r for r in runs if r.data.tags.get("dudch.kind") == "pipeline"]
    assert parent.data.tags["kfp.run_id"]
