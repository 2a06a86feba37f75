"""A team's set-up, for real: `mlflow/server.sh` runs an MLflow tracking server with artifacts
on S3 (the loopback moto endpoint); the pipeline logs to it, a run is promoted (twice: the gate
reads the holder's scores from the server), searched and compared, and the model loads back
through the server with the run's codes."""


import boto3
import mlflow
import numpy as np
import pytest
import requests

from dudch.student import StudentConfig
from tests.conftest import free_port, start_mlflow_server, stop
from tests.datasets import drawings_manifest
from tests.helpers import OPENCLIPART, dudch, run_pipeline

BUCKET = "mlflow-artifacts"


@pytest.fixture(scope="module")
def tracking_server(s3_endpoint, tmp_path_factory):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    port = free_port()
    settings = {"MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/team",
                "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path_factory.mktemp('server') / 'mlflow.db'}",
                "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    process, url = start_mlflow_server(port, **settings)
    yield dict(url=url, endpoint=s3_endpoint)
    stop(process)


@pytest.fixture(scope="module")
def server_runs(tracking_server):
    """Two small pipeline runs logged to the server, differing in student_outer_iterations:
    [(parent run id, KFP output folder)] in run order."""
    env = {"MLFLOW_TRACKING_URI": tracking_server["url"]}
    runs = []
    for iterations in (2, 4):
        _, run_id, kfp_dir = run_pipeline("--max-items", "200", "--bits", "16", "32", "--param", "teacher_epochs=2",
                                          "--param", f"student_outer_iterations={iterations}",
                                          "--param", "min_word_count=2", "--param", "min_label_size=5", env=env)
        runs.append((run_id, kfp_dir))
    return runs


def test_the_ui_api_sorts_pipeline_runs_by_a_summary_metric_with_every_parameter(tracking_server, server_runs):
    """What the MLflow UI's runs table does: runs/search over the parent runs, ordered by a
    summary metric; each row has the metrics (per bit length and as a series over bits) and
    every pipeline parameter, defaults included."""
    api = f"{tracking_server['url']}/api/2.0/mlflow"
    experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "dudch"}, timeout=120).json()
    found = requests.post(f"{api}/runs/search", timeout=120, json={
        "experiment_ids": [experiment["experiment"]["experiment_id"]],
        "filter": "tags.`dudch.kind` = 'pipeline'", "order_by": ["metrics.`student.i2t.map_50.32b` DESC"]}).json()["runs"]
    assert sorted(r["info"]["run_id"] for r in found) == sorted(run_id for run_id, _ in server_runs)
    metrics = [{m["key"]: m["value"] for m in r["data"]["metrics"]} for r in found]
    assert metrics[0]["student.i2t.map_50.32b"] >= metrics[1]["student.i2t.map_50.32b"]
    for values in metrics:
        for method in ("teacher", "student"):
            for key in (f"{method}.{d}.{m}.{b}b" for d in ("i2t", "t2i") for m in ("map_50", "map_all") for b in (16, 32)):
                assert 0 <= values[key] <= 1
    params = [{p["key"]: p["value"] for p in r["data"]["params"]} for r in found]
    shown = dudch("params").stdout.split()
    assert all(name in shown for p in params for name in p if name not in ("dataset", "data_version"))
    assert len(params[0]) == len(params[1]) >= 35 and params[0]["teacher_epochs"] == "2" and params[0]["gamma"] == str(StudentConfig.gamma)
    assert {p["student_outer_iterations"] for p in params} == {"2", "4"}
    assert all(r["info"]["run_name"].startswith("openclipart 16-32b ") for r in found)
    run_id = server_runs[0][0]
    history = requests.get(f"{api}/metrics/get-history", timeout=120,
                           params={"run_id": run_id, "metric_key": "student.t2i.map_all"}).json()["metrics"]
    assert sorted(m["step"] for m in history) == [16, 32]  # the UI's chart of mAP against bits
    run = requests.get(f"{api}/runs/get", params={"run_id": run_id}, timeout=120).json()["run"]
    assert "| student | 32 | t2i |" in {t["key"]: t["value"] for t in run["data"]["tags"]}["mlflow.note.content"]
    artifacts = requests.get(f"{api}/artifacts/list", params={"run_id": run_id, "path": "plots"}, timeout=120).json()
    assert "plots/map_vs_bits.png" in {f["path"] for f in artifacts["files"]}


def test_pipeline_promote_and_load_through_a_server_with_s3_artifacts(tracking_server, server_runs):
    env = {"MLFLOW_TRACKING_URI": tracking_server["url"]}
    run_id, kfp_dir = server_runs[0]
    promoted = dudch("promote", "--run", run_id, "--bits", "16", env=env)
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    # The gate reads the holder's scores back from the server: equal scores pass.
    again = dudch("promote", "--run", run_id, "--bits", "16", env=env)
    assert again.returncode == 0 and "at least version 1's in both directions" in again.stdout, again.stderr
    found = dudch("search", "--text", "bird", "--top", "3", env=env)
    assert found.returncode == 0 and len(found.stdout.strip().splitlines()) == 4, found.stderr
    compared = dudch("compare", "--last", "2", env=env)
    assert compared.returncode == 0 and compared.stdout.splitlines()[3].startswith(run_id[:8]), compared.stderr
    assert "  student_outer_iterations: 4 | 2" in compared.stdout.splitlines()

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_server["url"])
    try:
        model = mlflow.pyfunc.load_model("models:/dudch@production")
    finally:
        mlflow.set_tracking_uri(previous)
    with np.load(next(kfp_dir.glob("for-loop-2-iteration-0/train-student/student/codes.npz"))) as saved:
        np.testing.assert_array_equal(model.get_raw_model().database_codes(), saved["codes"])

    keys = [o["Key"] for page in boto3.client("s3", endpoint_url=tracking_server["endpoint"])
            .get_paginator("list_objects_v2").paginate(Bucket=BUCKET) for o in page.get("Contents", [])]
    assert all(k.startswith("team/") for k in keys)
    names = {k.rsplit("/", 1)[-1] for k in keys}
    assert {"MLmodel", "database.npz", "student.pt", "retrieval_examples_16bits.png", "codes.npz"} <= names


def test_index_add_and_remove_through_a_server(tracking_server, server_runs, tmp_path):
    """The promoted model grown with two drawings and shrunk again, every version read from and
    registered on the server (artifacts on S3); the version it grew from is unchanged."""
    env = {"MLFLOW_TRACKING_URI": tracking_server["url"]}
    assert dudch("promote", "--run", server_runs[1][0], "--bits", "32", "--name", "served-index", env=env).returncode == 0
    manifest = drawings_manifest(tmp_path / "new", OPENCLIPART, 2)
    added = dudch("index", "add", "--model", "models:/served-index/1", "--dataset", f"manifest:{manifest}",
                  "--alias", "production", env=env)
    assert added.returncode == 0 and "version 2: version 1 with 2 items added" in added.stdout, added.stderr[-2000:]
    image = str(tmp_path / "new" / "images" / "0.svg")
    found = dudch("search", "--model", "models:/served-index@production", "--image", image, "--top", "1000", env=env)
    assert found.returncode == 0, found.stderr[-2000:]
    first = found.stdout.splitlines()[1].split()
    assert first[:2] == ["1", "images/0.svg"] and first[3] == "exact"  # its own image finds it first
    (tmp_path / "ids.txt").write_text("images/0.svg\n")
    removed = dudch("index", "remove", "--model", "models:/served-index/2", "--ids", str(tmp_path / "ids.txt"),
                    "--alias", "production", env=env)
    assert removed.returncode == 0 and "version 3: version 2 with 1 item removed" in removed.stdout, removed.stderr[-2000:]
    gone = dudch("search", "--model", "models:/served-index@production", "--image", image, "--top", "1000", env=env)
    assert gone.returncode == 0 and "images/0.svg" not in gone.stdout and " exact " not in gone.stdout, gone.stderr[-2000:]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_server["url"])
    try:
        first, grown, shrunk = (mlflow.pyfunc.load_model(f"models:/served-index/{v}").get_raw_model() for v in (1, 2, 3))
    finally:
        mlflow.set_tracking_uri(previous)
    assert grown.item_id.tolist() == first.item_id.tolist() + ["images/0.svg", "images/1.svg"]
    assert shrunk.item_id.tolist() == first.item_id.tolist() + ["images/1.svg"]
    np.testing.assert_array_equal(shrunk.database_codes()[:len(first.item_id)], first.database_codes())
