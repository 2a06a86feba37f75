import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import OPENCLIPART, ROOT, run_pipeline

# Credentials of the loopback S3 server: distinctive, so tests can prove they are never written.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "dudch-test-key", "AWS_SECRET_ACCESS_KEY": "dudch-test-secret-9f2c",
                  "AWS_DEFAULT_REGION": "us-east-1"}


BITS = (16, 32)
TEACHER_EPOCHS = 3
STUDENT_ITERATIONS = 3


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, openclipart_root):
    """One real pipeline run (KFP local execution) on 600 real drawings at 16 and 32 bits, in a
    fresh MLflow sqlite store: {env, stdout, run_id, kfp_dir (its task outputs), client}."""
    import mlflow

    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    done, run_id, kfp_dir = run_pipeline("--max-items", "600", "--bits", *map(str, BITS),
                                         "--param", f"teacher_epochs={TEACHER_EPOCHS}",
                                         "--param", f"student_outer_iterations={STUDENT_ITERATIONS}",
                                         "--param", "min_word_count=2", "--param", "min_label_size=10", env=env)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return dict(env=env, stdout=done.stdout, run_id=run_id, kfp_dir=kfp_dir, client=mlflow.MlflowClient())


@pytest.fixture(scope="session")
def openclipart_root():
    """The real OpenClipart tree (fetched by `make test` through `dudch data openclipart`)."""
    if not OPENCLIPART.is_dir():
        pytest.fail("data/openclipart is missing: run `make test` (or `dudch data openclipart`) first")
    return OPENCLIPART


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, process, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not open port {port} in {timeout} s")


def start_mlflow_server(port, **settings):
    """mlflow/server.sh on loopback `port` with `settings` (MLFLOW_BACKEND_STORE_URI, ...), in its
    own process group: (process, url) once it answers /health."""
    import os

    import requests

    process = subprocess.Popen(["bash", str(ROOT / "mlflow" / "server.sh")],
                               env={**os.environ, "MLFLOW_PORT": str(port), **settings},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_port(port, process, "mlflow/server.sh", timeout=300)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # a loaded slow machine takes tens of seconds to load MLflow
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=30).ok:
                return process, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop(process)
    raise RuntimeError("the MLflow server never answered /health")


def stop(process):
    """Kill a process started in its own group, and everything it started."""
    import os
    import signal

    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=120)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible HTTP server (moto's standalone server) on a loopback port, with its
    credentials in this process's environment. Yields the endpoint URL."""
    import os

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in S3_CREDENTIALS}
    os.environ.update(S3_CREDENTIALS)
    try:
        wait_for_port(port, server, "the moto S3 server")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=120)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
