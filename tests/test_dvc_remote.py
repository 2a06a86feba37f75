"""DVC with an S3 remote on a real S3-compatible HTTP server (moto, loopback): a project pushes
its own dataset (a manifest over real drawings), a fresh clone pulls it and runs the
pipeline, and the run records exactly which version it read. Credentials stay in the
environment."""

import json
import subprocess
import sys
from pathlib import Path

import boto3
import mlflow
import pytest
import yaml

from dudch import DudchError
from pipeline.data import fetch_pinned, pin
from tests import datasets
from tests.conftest import S3_CREDENTIALS
from tests.helpers import ROOT, dudch

BUCKET = "dudch-data"
ITEMS = 40


def git(*args, cwd):
    subprocess.run(["git", "-c", "user.email=test@dudch", "-c", "user.name=test", *args], cwd=cwd,
                   check=True, capture_output=True)


def dvc(*args, cwd):
    subprocess.run([str(Path(sys.executable).with_name("dvc")), *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def origin(tmp_path_factory, s3_endpoint, openclipart_root):
    """A project with data/own tracked by DVC, pushed to s3://dudch-data/store, committed."""
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    repo = tmp_path_factory.mktemp("origin")
    git("init", "-q", cwd=repo)
    dvc("init", "-q", cwd=repo)
    datasets.drawings_manifest(repo / "data" / "own", openclipart_root, ITEMS)
    dvc("add", "-q", "data/own", cwd=repo)
    done = dudch("data", "remote", f"s3://{BUCKET}/store", "--endpoint-url", s3_endpoint, cwd=repo)
    assert done.returncode == 0, done.stderr
    pushed = dudch("data", "push", cwd=repo)
    assert pushed.returncode == 0, pushed.stderr
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "own data", cwd=repo)
    return dict(repo=repo, pushed=pushed.stdout, endpoint=s3_endpoint,
                md5=yaml.safe_load((repo / "data" / "own.dvc").read_text())["outs"][0]["md5"])


def test_push_uploads_to_the_s3_server_and_writes_no_credentials(origin):
    assert origin["pushed"].strip() == f"push: {ITEMS + 2} files"  # images, manifest, the .dir listing
    objects = boto3.client("s3", endpoint_url=origin["endpoint"]).list_objects_v2(Bucket=BUCKET)["Contents"]
    assert len(objects) == ITEMS + 2
    config = (origin["repo"] / ".dvc" / "config").read_text()
    assert f"url = s3://{BUCKET}/store" in config and f"endpointurl = {origin['endpoint']}" in config
    assert not any(secret in config for secret in S3_CREDENTIALS.values() if "test" in secret)


def test_a_fresh_clone_pulls_the_data_and_runs_the_pipeline(origin, tmp_path):
    clone = tmp_path / "clone"
    git("clone", "-q", str(origin["repo"]), str(clone), cwd=tmp_path)
    assert not (clone / "data" / "own").exists()
    pulled = dudch("data", "pull", cwd=clone)
    assert pulled.returncode == 0 and pulled.stdout.strip() == f"pull: {ITEMS + 2} files", pulled.stderr
    for path in (origin["repo"] / "data" / "own").rglob("*.*"):
        assert (clone / path.relative_to(origin["repo"])).read_bytes() == path.read_bytes()

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = dudch("run", "--dataset", "manifest:data/own/pairs.jsonl", "--bits", "16",
                 "--param", "teacher_epochs=2", "--param", "student_outer_iterations=2",
                 "--param", "min_word_count=1", cwd=clone, env={"MLFLOW_TRACKING_URI": store})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "mAP@all" in done.stdout
    mlflow.set_tracking_uri(store)
    (parent,) = mlflow.search_runs(experiment_names=["dudch"], filter_string="tags.`dudch.kind` = 'pipeline'",
                                   output_format="list")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    assert parent.data.tags["dudch.data_version"] == parent.data.params["data_version"] == origin["md5"]
    assert parent.data.tags["dudch.data_dvc_file"] == "data/own.dvc" and parent.data.tags["dudch.data_rev"] == head
    (dataset_input,) = parent.inputs.dataset_inputs
    assert dataset_input.dataset.digest == origin["md5"] and dataset_input.dataset.name == "manifest"
    logged = json.dumps([parent.data.params, parent.data.tags])
    assert not any(secret in logged for secret in S3_CREDENTIALS.values() if "test" in secret)


def test_fetching_a_pinned_file_brings_its_whole_tracked_folder(origin, tmp_path):
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=origin["repo"], capture_output=True, text=True).stdout.strip()
    local, pin = fetch_pinned(str(origin["repo"]), rev, "data/own/pairs.jsonl", tmp_path / "cache")
    assert pin == dict(dvc_file="data/own.dvc", md5=origin["md5"], rev=rev, tracked="data/own")
    assert local.read_bytes() == (origin["repo"] / "data" / "own" / "pairs.jsonl").read_bytes()
    assert len(list((local.parent / "images").iterdir())) == ITEMS


def test_the_workspace_pin_names_its_dvc_file_and_refuses_edited_data(origin):
    manifest = origin["repo"] / "data" / "own" / "pairs.jsonl"
    found = pin(manifest, origin["repo"], check_workspace=True)
    assert (found["dvc_file"], found["md5"], found["tracked"]) == ("data/own.dvc", origin["md5"], "data/own")
    assert pin(origin["repo"] / "README.md", origin["repo"])["md5"] is None  # not tracked
    text = manifest.read_text()
    manifest.write_text(text + text.splitlines()[0] + "\n")
    try:
        with pytest.raises(DudchError, match="differs from the version pinned in data/own.dvc; run `dvc add data/own`"):
            pin(manifest, origin["repo"], check_workspace=True)
    finally:
        manifest.write_text(text)


def test_a_run_reads_a_pinned_revision_through_dvc_without_a_checkout(origin, tmp_path):
    """As on a cluster: no data here; the prepare task fetches (repo, rev, path) from S3."""
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=origin["repo"], capture_output=True, text=True).stdout.strip()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = dudch("run", "--dataset", "manifest:data/own/pairs.jsonl", "--bits", "16",
                 "--param", f"data_repo={origin['repo']}", "--param", f"data_rev={rev}",
                 "--param", "teacher_epochs=1", "--param", "student_outer_iterations=1",
                 "--param", "min_word_count=1", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": store})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["dudch"], output_format="list")
    by_stage = {r.data.tags.get("dudch.stage", "pipeline"): r for r in runs}
    assert by_stage["pipeline"].data.tags["dudch.data_version"] == origin["md5"]
    prepare = by_stage["prepare"]
    assert prepare.data.tags["dudch.data_version"] == origin["md5"] and prepare.data.tags["dudch.data_rev"] == rev
    assert prepare.data.metrics["items"] == ITEMS
    assert prepare.inputs.dataset_inputs[0].dataset.name == "manifest"


def test_an_unreachable_remote_is_one_line(origin, tmp_path):
    clone = tmp_path / "clone"
    git("clone", "-q", str(origin["repo"]), str(clone), cwd=tmp_path)
    assert dudch("data", "remote", f"s3://{BUCKET}/store", "--endpoint-url", "http://127.0.0.1:9", cwd=clone).returncode == 0
    for direction in ("pull", "push"):  # refused before DVC's S3 layer retries for most of a minute
        done = dudch("data", direction, cwd=clone, timeout=300)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert f"dvc {direction}: cannot reach the remote's endpoint 'http://127.0.0.1:9'" in done.stderr
        assert "--endpoint-url" in done.stderr


def test_remote_urls_with_credentials_are_refused(origin):
    done = dudch("data", "remote", "s3://key:secret@bucket/x", cwd=origin["repo"])
    assert done.returncode == 2 and "must not hold credentials" in done.stderr


def test_the_default_remote_is_a_local_folder(tmp_path):
    """The project's own .dvc/config: `dudch data push` works out of the box, into .dvc-storage/."""
    git("init", "-q", cwd=tmp_path)
    dvc("init", "-q", cwd=tmp_path)
    (tmp_path / ".dvc" / "config").write_text((ROOT / ".dvc" / "config").read_text())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.jsonl").write_text('{"image": "a.png", "text": "x"}\n')
    dvc("add", "-q", "data", cwd=tmp_path)
    done = dudch("data", "push", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "push: 2 files", done.stderr
    assert len([p for p in (tmp_path / ".dvc-storage").rglob("*") if p.is_file()]) == 2
