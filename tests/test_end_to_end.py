"""The real pipeline through KFP local execution on 600 real OpenClipart drawings, logged to a
real MLflow sqlite store; then `dudch report --json` reads the run back."""

import json

import numpy as np
import pytest

from dudch.student import StudentConfig
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


def test_parent_run_is_the_row_to_compare(pipeline_run, parent):
    """Every pipeline parameter (defaults too), a readable name, summary metrics per bit length
    and as a series over bits, the results table, a plot and the results as description."""
    client = pipeline_run["client"]
    declared = [line.split()[0] for line in dudch("params").stdout.splitlines()]
    assert set(parent.data.params) == set(declared) | {"dataset", "data_version"}
    assert parent.data.params["gamma"] == str(StudentConfig.gamma) and parent.data.params["similarity_rule"] == "graded"
    assert parent.info.run_name.startswith("openclipart 16-32b ")
    (evaluation,) = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = "
                                       f"'{parent.info.run_id}' and tags.`dudch.stage` = 'evaluate' and tags.`dudch.bits` = '32'")
    for method in ("teacher", "student"):
        for key in (f"{method}.{d}.{m}" for d in ("i2t", "t2i") for m in ("map_50", "map_all")):
            assert parent.data.metrics[f"{key}.32b"] == pytest.approx(evaluation.data.metrics[key])
            assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, key)) == list(BITS)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"results_table.json", "plots/map_vs_bits.png"} <= artifacts
    assert "| student | 32 | i2t |" in parent.data.tags["mlflow.note.content"]
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {c.data.tags["mlflow.source.git.commit"] for c in children} == {parent.data.tags["mlflow.source.git.commit"]}


def test_kfp_ui_gets_a_markdown_report_per_bit_length(pipeline_run):
    reports = sorted(pipeline_run["kfp_dir"].glob("for-loop-2-iteration-*/evaluate/report"))
    assert len(reports) == len(BITS)
    for path in reports:
        text = path.read_text()
        assert "MLflow run: " in text and "| student |" in text and text.count("data:image/png;base64,") == 2


def test_report_on_a_child_or_unknown_run_says_so_in_one_line(pipeline_run, parent):
    client = pipeline_run["client"]
    child = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")[0]
    for run_id, expected in ((child.info.run_id, "is not a pipeline run"), ("0123456789abcdef", "no run 0123456789abcdef")):
        done = dudch("report", "--run-id", run_id, env=pipeline_run["env"])
        assert done.returncode == 2 and expected in done.stderr and done.stderr.count("\n") == 1


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
    codes_files = sorted(pipeline_run["kfp_dir"].glob("for-loop-2-iteration-*/train-student/student/codes.npz"))
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
    assert report["teacher"] == "DJSRH"
    for row in report["results"]:
        method = "teacher (DJSRH)" if row["method"] == "teacher" else row["method"]
        assert (f"{method:<15} {row['bits']:>4}  {row['direction']:<9} {row['map_50']:>8.4f} "
                f"{row['map_all']:>8.4f} {row['distinct_codes']:>8.2f}") in pipeline_run["stdout"]
