"""A team's set-up, for real: `mlflow/server.sh` runs an MLflow tracking server with artifacts
on S3 (the loopback moto endpoint); the pipeline logs to it, a run is promoted (twice: the gate
reads the holder's scores from the server), searched and compared, and the model loads back
through the server with the run's codes."""

import os
import subprocess

import boto3
import mlflow
import numpy as np
import pytest
import requests

from tests.conftest import free_port, wait_for_port
from tests.helpers import ROOT, dudch, run_pipeline

BUCKET = "mlflow-artifacts"


@pytest.fixture(scope="module")
def tracking_server(s3_endpoint, tmp_path_factory):
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    port = free_port()
    settings = {"MLFLOW_PORT": str(port), "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/team",
                "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path_factory.mktemp('server') / 'mlflow.db'}",
                "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    server = subprocess.Popen(["bash", str(ROOT / "mlflow" / "server.sh")], env={**os.environ, **settings},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, server, "mlflow/server.sh", timeout=120)
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if requests.get(f"{url}/health", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
        yield dict(url=url, endpoint=s3_endpoint)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_pipeline_promote_and_load_through_a_server_with_s3_artifacts(tracking_server):
    env = {"MLFLOW_TRACKING_URI": tracking_server["url"]}
    _, run_id, kfp_dir = run_pipeline("--max-items", "200", "--bits", "16", "--param", "teacher_epochs=2",
                                      "--param", "student_outer_iterations=2", "--param", "min_word_count=2",
                                      "--param", "min_label_size=5", env=env)
    promoted = dudch("promote", "--run", run_id, env=env)
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    # The gate reads the holder's scores back from the server: equal scores pass.
    again = dudch("promote", "--run", run_id, env=env)
    assert again.returncode == 0 and "at least version 1's in both directions" in again.stdout, again.stderr
    found = dudch("search", "--text", "bird", "--top", "3", env=env)
    assert found.returncode == 0 and len(found.stdout.strip().splitlines()) == 4, found.stderr
    compared = dudch("compare", "--last", "1", env=env)
    assert compared.returncode == 0 and compared.stdout.splitlines()[2].startswith(run_id[:8]), compared.stderr

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_server["url"])
    try:
        model = mlflow.pyfunc.load_model("models:/dudch@production")
    finally:
        mlflow.set_tracking_uri(previous)
    with np.load(next(kfp_dir.glob("for-loop-1-iteration-0/train-student/student/codes.npz"))) as saved:
        np.testing.assert_array_equal(model.unwrap_python_model().retriever.database_codes(), saved["codes"])

    keys = [o["Key"] for page in boto3.client("s3", endpoint_url=tracking_server["endpoint"])
            .get_paginator("list_objects_v2").paginate(Bucket=BUCKET) for o in page.get("Contents", [])]
    assert all(k.startswith("team/") for k in keys)
    names = {k.rsplit("/", 1)[-1] for k in keys}
    assert {"MLmodel", "database.npz", "student.pt", "retrieval_examples_16bits.png", "codes.npz"} <= names
