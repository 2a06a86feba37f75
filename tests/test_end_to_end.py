"""The real pipeline through KFP local execution on 600 real OpenClipart drawings, logged to a
real MLflow sqlite store; then `dudch report --json` reads the run back."""

import json

import numpy as np
import pytest

from tests.conftest import BITS, STUDENT_ITERATIONS, TEACHER_EPOCHS
from tests.helpers import ROOT, dudch


@pytest.fixture(scope="module")
def parent(pipeline_run):
    return pipeline_run["client"].get_run(pipeline_run["run_id"])


def test_parent_run_has_params_data_version_and_commit(parent):
    assert parent.info.status == "FINISHED"
    assert parent.data.params["max_items"] == "600" and json.loads(parent.data.params["bits"]) == list(BITS)
    version = (ROOT / "data.dvc").read_text().split("md5: ")[1].split()[0]
    assert parent.data.params["data_version"] == version == parent.data.tags["dudch.data_version"]
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40


def test_child_runs_per_stage_and_bit_length(pipeline_run, parent):
    client = pipeline_run["client"]
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    stages = sorted((c.data.tags["dudch.stage"], c.data.tags.get("dudch.bits")) for c in children)
    expected = [("prepare", None)] + [(s, str(b)) for s in ("evaluate", "similarity", "student", "teacher") for b in BITS]
    assert stages == sorted(expected)
    for child in children:
        assert child.info.status == "FINISHED" and child.data.metrics["stage_wall_time_s"] > 0
        stage = child.data.tags["dudch.stage"]
        if stage == "teacher":
            assert len(client.get_metric_history(child.info.run_id, "loss")) == TEACHER_EPOCHS
        if stage == "student":
            assert len(client.get_metric_history(child.info.run_id, "objective")) == STUDENT_ITERATIONS
        if stage == "evaluate":
            maps = {k: v for k, v in child.data.metrics.items() if ".map_" in k}
            assert len(maps) == 3 * 2 * 2 and all(0 < v <= 1 for v in maps.values())
            plots = [a.path for a in client.list_artifacts(child.info.run_id, "plots")]
            bits = child.data.tags["dudch.bits"]
            assert plots == [f"plots/precision_at_top_{bits}bits.png", f"plots/precision_recall_{bits}bits.png",
                             f"plots/retrieval_examples_{bits}bits.png"]
        if stage in ("teacher", "student"):
            bits = child.data.tags["dudch.bits"]
            assert [a.path for a in client.list_artifacts(child.info.run_id, "plots")] == [f"plots/losses_{bits}bits.png"]
        retrieval = {"prepare": ["retrieval/encoders.json", "retrieval/items.npz"],
                     "student": ["retrieval/codes.npz", "retrieval/model.pt"]}
        if stage in retrieval:  # what `dudch promote` packages
            assert [a.path for a in client.list_artifacts(child.info.run_id, "retrieval")] == retrieval[stage]
    models = client.search_logged_models([parent.info.experiment_id])
    assert sorted(m.name for m in models) == ["student"] * len(BITS) + ["teacher"] * len(BITS)


def test_student_codes_are_exactly_plus_minus_one(pipeline_run):
    codes_files = sorted(pipeline_run["kfp_dir"].glob("for-loop-1-iteration-*/train-student/student/codes.npz"))
    assert len(codes_files) == len(BITS)
    for path in codes_files:
        with np.load(path) as saved:
            codes = saved["codes"]
        assert codes.dtype == np.int8 and codes.shape[1] in BITS
        assert np.isin(codes, (-1, 1)).all()


def test_run_prints_the_table_and_report_reads_it_back(pipeline_run, parent):
    assert "mAP@50 and mAP@all" in pipeline_run["stdout"] and "mlflow ui --backend-store-uri" in pipeline_run["stdout"]
    done = dudch("report", "--json", env=pipeline_run["env"])
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["run_id"] == parent.info.run_id
    assert report["dataset"] == f"openclipart:{ROOT / 'data' / 'openclipart'}" and report["data_version"].endswith(".dir")
    assert sorted((r["method"], r["bits"], r["direction"]) for r in report["results"]) == sorted(
        (m, b, d) for m in ("teacher", "student") for b in BITS for d in ("i2t", "t2i"))
    for row in report["results"]:
        assert (f"{row['method']:<10} {row['bits']:>4}  {row['direction']:<9} {row['map_50']:>8.4f} "
                f"{row['map_all']:>8.4f} {row['distinct_codes']:>8.2f}") in pipeline_run["stdout"]
