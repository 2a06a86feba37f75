"""The container image, for real (run by `make image-test`, which builds and pushes it: heavy,
so `make test` skips this file). Every stage of a small pipeline run inside the pushed image
with KFP's DockerRunner gives the same codes and mAP as the subprocess runner with the same
seed; the image runs as a non-root user, installs nothing when a task starts, and holds no
credential in any layer."""

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests import datasets
from tests.conftest import S3_CREDENTIALS, free_port, start_mlflow_server, stop
from tests.helpers import ROOT, dudch

IMAGE = os.environ.get("DUDCH_IMAGE_UNDER_TEST")
pytestmark = pytest.mark.skipif(not IMAGE, reason="run by `make image-test` (needs a Docker engine and "
                                "the image it builds and pushes)")
DOCKER = "/usr/bin/docker"
ITEMS, BITS = 80, 16
PARAMS = ("--bits", str(BITS), "--param", "teacher_epochs=3", "--param", "student_outer_iterations=3",
          "--param", "min_word_count=2", "--param", "min_label_size=1", "--keep-runs", "0", "--no-cache")


def docker(*args):
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, check=True).stdout


def test_the_image_runs_as_a_user_and_holds_no_credential():
    assert docker("run", "--rm", IMAGE, "id", "-u").strip() != "0"
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE)
    for secret in [*S3_CREDENTIALS.values(), "BEGIN CERTIFICATE", "PASSWORD=", "TOKEN="]:
        assert secret not in history
    # The CA bundle pip used came in as a build secret: not in the image's file system.
    assert docker("run", "--rm", IMAGE, "sh", "-c", "ls /run/secrets 2>/dev/null | wc -l").strip() == "0"


def test_the_pipeline_is_compiled_against_the_pushed_digest_and_installs_nothing():
    spec = (ROOT / "build" / "pipeline.yaml").read_text()
    assert "@sha256:" in IMAGE and f"image: {IMAGE}" in spec
    assert "pip install" not in spec


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    process, url = start_mlflow_server(free_port(), MLFLOW_ARTIFACTS_DESTINATION=str(folder / "artifacts"),
                                       MLFLOW_BACKEND_STORE_URI=f"sqlite:///{folder / 'mlflow.db'}")
    yield url
    stop(process)


def run(server, manifest, *extra):
    """(wall seconds, parent run id, the student's codes.npz arrays, as its MLflow run holds
    them) of one `dudch run`."""
    import mlflow

    from components.tracking import stage_children

    started = time.time()
    done = dudch("run", "--dataset", f"manifest:{manifest}", *PARAMS, *extra, env={"MLFLOW_TRACKING_URI": server})
    wall = time.time() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_id = done.stdout.split("MLflow parent run ")[1].split()[0]
    mlflow.set_tracking_uri(server)
    client = mlflow.MlflowClient()
    (student,) = stage_children(client, client.get_run(run_id), "student", BITS)
    with np.load(client.download_artifacts(student.info.run_id, "retrieval/codes.npz")) as saved:
        return wall, run_id, dict(saved)


def stage_times(server, run_id):
    import mlflow

    from components.tracking import stage_children

    mlflow.set_tracking_uri(server)
    client = mlflow.MlflowClient()
    parent = client.get_run(run_id)
    return {stage: stage_children(client, parent, stage, None if stage == "prepare" else BITS)[0]
            .data.metrics["stage_wall_time_s"] for stage in ("prepare", "teacher", "similarity", "student", "evaluate")}


def results(server, run_id):
    done = dudch("report", "--run-id", run_id, "--json", env={"MLFLOW_TRACKING_URI": server})
    assert done.returncode == 0, done.stderr
    return {(r["method"], r["direction"]): (r["map_50"], r["map_all"]) for r in json.loads(done.stdout)["results"]}


def test_every_stage_in_the_image_gives_what_the_subprocess_runner_gives(server, tmp_path, openclipart_root):
    manifest = datasets.drawings_manifest(tmp_path / "data", openclipart_root, ITEMS)
    docker_wall, docker_run, docker_codes = run(server, manifest, "--image", IMAGE)
    local_wall, local_run, local_codes = run(server, manifest)
    np.testing.assert_array_equal(docker_codes["item_id"], local_codes["item_id"])
    same_codes = bool(np.array_equal(docker_codes["codes"], local_codes["codes"]))
    docker_results, local_results = results(server, docker_run), results(server, local_run)
    report = dict(items=ITEMS, bits=BITS,
                  docker=dict(wall_s=docker_wall, stages=stage_times(server, docker_run)),
                  subprocess=dict(wall_s=local_wall, stages=stage_times(server, local_run)),
                  same=("identical database codes and mAP@50/mAP@all" if same_codes and docker_results == local_results
                        else f"codes equal: {same_codes}; mAP: image {docker_results}, subprocess {local_results}"))
    Path(os.environ["DUDCH_IMAGE_REPORT"]).write_text(json.dumps(report, indent=2))
    assert same_codes and docker_results == local_results, report["same"]
