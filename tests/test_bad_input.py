"""The battery of bad, hostile and faulty input, each case as its user meets it: the input, the
one line that names the problem and the fix, the exit status, and that nothing was started,
written half-way or left RUNNING. Cases that need a trained model or a decoded dataset live
beside what they exercise: serving (tests/test_registry.py: over HTTP, tampered artifacts),
bad images and the feature cache (tests/test_sources.py, tests/test_data.py), a failing task
(tests/test_console.py), signals (tests/test_lifecycle.py), remotes (tests/test_dvc_remote.py)."""

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.conftest import free_port, start_mlflow_server, stop
from tests.helpers import ROOT, dudch

SECRET = "s3cr3t-9f2c"  # never printed, written or logged

PARAMETERS = [
    (("--bits", "-8"), "--bits -8 is out of range: code lengths are 8 to 1024 bits"),
    (("--bits", "0"), "--bits 0 is out of range"),
    (("--bits", "100000"), "--bits 100000 is out of range"),
    (("--bits", "16", "16"), "--bits lists 16 more than once"),
    (("--seed", "-1"), "seed must be 0 or more, got -1"),
    (("--max-items", "3"), "--max-items 3 is too few: a run needs at least 10 items"),
    (("--param", "similarity_rule=nonsense"), "similarity_rule='nonsense' is not one of: mutual_knn, union_knn, quantile, graded"),
    (("--param", "seed=3"), "set seed with --seed, not --param"),
    (("--param", "teacher_epochs=0"), "teacher_epochs must be positive, got 0"),
    (("--param", "teacher=adsh"), "teacher='adsh' is not one of: djsrh, ucch"),
    (("--param", "teacher=ucch", "--param", "teacher_image_input=pixels"), "teacher=ucch trains on image features only"),
    (("--param", "ucch_alpha=1.5"), "ucch_alpha must be between 0 and 1, got 1.5"),
    (("--param", "similarity_related_fraction=1.5"), "similarity_related_fraction must be between 0 and 1"),
    (("--param", "student_optimizer=rmsprop"), "student_optimizer='rmsprop' is not one of: sgd, adam"),
    (("--param", "on_bad_image=ignore"), "on_bad_image='ignore' is not one of: skip, fail"),
    (("--param", "max_bad_image_fraction=2"), "max_bad_image_fraction must be between 0 and 1, got 2.0"),
    (("--param", f"data_repo=https://user:{SECRET}@git.example/data.git"),
     "data_repo must not hold credentials (they would be stored with the run's parameters)"),
    (("--param", f"data_repo=https://{SECRET}@git.example/data.git"), "data_repo must not hold credentials"),
    (("--param", "lr_image=inf"), "lr_image must be a finite number, got inf"),
    (("--param", "gamma=nan"), "gamma must be a finite number, got nan"),
    (("--param", "similarity_rule=" + "x" * 100_000), "similarity_rule='xxxx"),
    (("--param", "teacher_epochs=" + "9" * 100_000 + "x"), "teacher_epochs needs a int, got '9999"),
]


def partial_files():
    return set((ROOT / ".dudch").glob("**/*.partial")) | set(ROOT.glob("*.partial"))


@pytest.fixture(autouse=True)
def nothing_half_written():
    """No case leaves a partly written file (write-then-rename's temporary) behind."""
    before = partial_files()
    yield
    assert partial_files() <= before


def refused(done, message, status=2):
    """The one-line refusal every case ends in: no traceback, no secret."""
    output = done.stdout + done.stderr
    assert done.returncode == status, output[-2000:]
    *_, error = done.stderr.strip().splitlines()
    assert error.startswith("error: ") and message in error, error
    assert "Traceback" not in output and SECRET not in output


@pytest.mark.parametrize("args, message", PARAMETERS, ids=[" ".join(a) for a, _ in PARAMETERS])
def test_bad_parameters_are_refused_up_front(tmp_path, args, message):
    store = tmp_path / "mlflow.db"
    done = dudch("run", *args, env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    refused(done, message)
    assert done.stderr.count("\n") == 1 and len(done.stderr) < 400  # a huge value is not echoed back
    assert not store.exists()  # refused before the store was opened: no run, nothing left RUNNING


def test_an_empty_manifest_is_refused_up_front(tmp_path):
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("")
    done = dudch("run", "--dataset", f"manifest:{manifest}", env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    refused(done, "is empty; add one record per image-text pair")
    assert done.stderr.count("\n") <= 2  # and that unpinned data is not versioned
    assert not (tmp_path / "m.db").exists()


def test_credentials_in_an_endpoint_are_refused_and_never_written(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "-q"], cwd=tmp_path, check=True)
    config = (tmp_path / ".dvc" / "config").read_text()
    done = dudch("data", "remote", "s3://bucket/x", "--endpoint-url", f"http://KEY:{SECRET}@minio:9000", cwd=tmp_path)
    refused(done, "the endpoint URL must not hold credentials (it is written to the git-tracked .dvc/config)")
    assert (tmp_path / ".dvc" / "config").read_text() == config


def test_a_tracking_uri_with_credentials_is_redacted(tmp_path):
    port = free_port()  # nothing listens there
    done = dudch("report", env={"MLFLOW_TRACKING_URI": f"http://user:{SECRET}@127.0.0.1:{port}"})
    refused(done, f"cannot reach the MLflow tracking server at http://***@127.0.0.1:{port}")


def test_an_unreachable_tracking_server_is_found_before_any_work(tmp_path):
    done = dudch("run", "--max-items", "50", "--bits", "16", env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    refused(done, "cannot reach the MLflow tracking server at http://127.0.0.1:")
    assert done.stderr.count("\n") == 1 and done.stdout == ""  # no parent run, no task started


@contextlib.contextmanager
def small_disk(folder, options):
    """A tmpfs mounted at `folder` (made here) with mount `options`, for the length of a case;
    the case is skipped where mounting is not allowed."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here ({mounted.stderr.decode().strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # a store may still be open here


def test_a_read_only_artifact_store_is_found_before_any_work(tmp_path):
    with small_disk(tmp_path / "mlartifacts", "ro,size=1m") as artifacts:
        done = dudch("run", "--max-items", "50", "--bits", "16",
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
        refused(done, f"the MLflow artifact store {artifacts} is not writable (Read-only file system)")
        assert done.stdout == ""  # no parent run announced, no task started
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("dudch").experiment_id]) == []


def test_a_store_whose_disk_fills_up_ends_the_run_failed_in_one_line(tmp_path):
    """The store (database and artifacts) on a 3 MB disk that the run's artifacts fill: the
    task that meets it names the problem and the fix, and the runs end FAILED, not RUNNING,
    although MLflow itself can no longer write to its database."""
    with small_disk(tmp_path / "store", "size=3m") as store:
        done = dudch("run", "--max-items", "50", "--bits", "16",
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"})
        refused(done, "failed: out of disk space (the database or disk is full) under the MLflow store "
                      "or the run's outputs; free space there (or point MLFLOW_TRACKING_URI at another disk)")
        mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
        runs = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("dudch").experiment_id])
        statuses = {r.data.tags.get("dudch.stage", "pipeline"): r.info.status for r in runs}
        assert statuses["pipeline"] == "FAILED" and "RUNNING" not in statuses.values()


@pytest.mark.parametrize("reachable, credentials, expected, fix", [
    (False, True, "dvc push: cannot reach the remote's endpoint 'http://127.0.0.1:", "--endpoint-url URL"),
    (True, False, "dvc push with remote 'storage' (s3://bucket/x) failed (NoCredentialsError",
     "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")], ids=["unreachable", "no credentials"])
def test_data_push_failures_are_one_line(tmp_path, reachable, credentials, expected, fix):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.jsonl").write_text('{"image": "a.png", "text": "x"}\n')
    subprocess.run([dvc, "add", "-q", "data"], cwd=tmp_path, check=True)
    with socket.socket() as endpoint:  # bound, so the port stays ours; listening only when reachable
        endpoint.bind(("127.0.0.1", 0))
        if reachable:
            endpoint.listen()
        url = f"http://127.0.0.1:{endpoint.getsockname()[1]}"
        assert dudch("data", "remote", "s3://bucket/x", "--endpoint-url", url, cwd=tmp_path).returncode == 0
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": SECRET} if credentials else {"HOME": str(tmp_path)})
        done = subprocess.run([str(Path(sys.executable).with_name("dudch")), "data", "push"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    refused(done, expected)
    assert done.stderr.count("\n") == 1 and fix in done.stderr


def test_two_first_runs_on_a_fresh_store_both_connect(tmp_path):
    """Both create the store's tables and experiment at once: the loser retries, and both end
    up with the same experiment (no 'already exists' error, no advice to fix the URI)."""
    code = "from pathlib import Path; from pipeline.tracking import connect; print(connect(Path('.')))"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    for attempt in range(3):
        store = tmp_path / "mlflow.db"
        store.unlink(missing_ok=True)
        racers = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for _ in range(3)]
        results = [racer.communicate(timeout=600) for racer in racers]
        assert all(racer.returncode == 0 for racer in racers), [err[-500:] for _, err in results]
        assert len({out.strip() for out, _ in results}) == 1


def test_a_tracking_server_that_dies_mid_run_fails_it_in_one_line_and_the_run_reads_interrupted(tmp_path):
    port = free_port()
    settings = {"MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
                "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'server.db'}"}
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    server, _ = start_mlflow_server(port, **settings)
    run = subprocess.Popen([str(Path(sys.executable).with_name("dudch")), "run", "--max-items", "200", "--bits", "16",
                            "--param", "teacher_epochs=20", "--param", "min_label_size=5", "--keep-runs", "0", "--no-cache"],
                           cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in run.stdout:
            if "teacher 16b" in line and "started" in line:
                break
        stop(server)
        # It ends by itself (MLflow's HTTP retries are bounded): no time is asserted, but a run
        # that hung would fail here, with room for a slow, loaded machine.
        stdout, stderr = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 2 and "Traceback" not in stdout + stderr
    *warnings, error = stderr.strip().splitlines()
    assert error.startswith("error: task ") and "failed" in error, stderr[-2000:]
    assert any(w.startswith("warning: could not end MLflow run") for w in warnings)
    server, _ = start_mlflow_server(port, **settings)
    try:
        compared = dudch("compare", "--last", "1", env=env)
        assert compared.returncode == 0 and compared.stdout.splitlines()[2].split()[3] == "INTERRUPTED", compared.stdout
    finally:
        stop(server)


@pytest.mark.parametrize("top", ["0", "-1", "1001", "ten"])
def test_search_refuses_a_count_out_of_range(top):
    done = dudch("search", "--text", "tux", "--top", top)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"dudch search: error: argument --top: '{top}' is not a count from 1 to 1000"


@pytest.mark.parametrize("last", ["-1", "0", "1000000000", "many"])
def test_compare_refuses_a_count_out_of_range(last):
    done = dudch("compare", "--last", last)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"dudch compare: error: argument --last: '{last}' is not a count from 1 to 1000"


@pytest.mark.parametrize("args, message", [
    (("",), "the remote is empty; give s3://bucket/prefix or a folder"),
    (("s3://",), "the remote 's3://' names no bucket; give s3://bucket/prefix"),
    (("s3:///prefix",), "names no bucket"),
    (("s3://bucket/x\nurl = /etc",), "holds a control character (a newline?); give it on one line"),
    (("s3://bucket/x", "--endpoint-url", "minio:9000"), "the endpoint URL 'minio:9000' is not http(s)://host[:port]"),
    (("s3://bucket/x", "--endpoint-url", "http://"), "is not http(s)://host[:port]"),
], ids=["empty", "no bucket", "empty bucket", "newline", "endpoint without scheme", "endpoint without host"])
def test_remote_urls_that_name_no_place_are_refused(tmp_path, args, message):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "-q"], cwd=tmp_path, check=True)
    config = (tmp_path / ".dvc" / "config").read_text()
    done = dudch("data", "remote", *args, cwd=tmp_path)
    refused(done, message)
    assert (tmp_path / ".dvc" / "config").read_text() == config


def write_manifest(folder, lines, name="pairs.jsonl", encoding="utf-8"):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    drawing = sorted((ROOT / "data" / "openclipart").glob("animals/*.svg"))[0]
    for i in range(3):
        (folder / "images" / f"{i}.svg").write_bytes(drawing.read_bytes() + b" " * i)  # three distinct files
    (folder / name).write_text("\n".join(lines) + "\n", encoding=encoding)
    return folder / name


def inspect(manifest):
    return dudch("data", "inspect", f"manifest:{manifest}")


def test_a_csv_manifest_with_a_byte_order_mark_is_read(tmp_path):
    """What spreadsheets write: UTF-8 with a BOM before the header."""
    manifest = write_manifest(tmp_path, ["image,text", "images/0.svg,a cat", "images/1.svg,a dog"], "pairs.csv", "utf-8-sig")
    assert manifest.read_bytes().startswith(b"\xef\xbb\xbf")
    done = inspect(manifest)
    assert done.returncode == 0 and json.loads(done.stdout)["n"] == 2, done.stderr


def test_manifest_records_that_repeat_an_image_are_warned_about_once(tmp_path):
    records = [json.dumps(dict(image=f"images/{i % 2}.svg", text="a cat")) for i in range(1000)]
    done = inspect(write_manifest(tmp_path, records))
    assert done.returncode == 0, done.stderr
    (warning,) = json.loads(done.stdout)["warnings"]
    assert warning == ("998 of 1000 records repeat an image listed before (first images/0.svg#2, the same file as "
                       "images/0.svg); list each pair once: duplicates can inflate mAP")


def test_manifest_image_paths_that_are_no_paths_are_refused(tmp_path):
    (tmp_path / "images").mkdir()
    os.symlink(tmp_path / "images" / "loop.svg", tmp_path / "images" / "loop.svg")
    for image, message in (("images/a\u0000.svg", "image 'images/a\\x00.svg' is not a usable path (a NUL byte or a symlink loop)"),
                           ("images/loop.svg", "is not a usable path")):
        manifest = write_manifest(tmp_path, [json.dumps(dict(image=image, text="x"))])
        refused(inspect(manifest), message)


def test_a_read_only_feature_cache_is_found_before_any_work(tmp_path):
    cache = ROOT / ".dudch" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(cache), str(cache)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount the cache read-only here ({mounted.stderr.decode().strip()})")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(cache)], check=True)
        done = dudch("run", "--max-items", "50", "--bits", "16",
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    finally:
        subprocess.run(["umount", str(cache)], check=True)
    refused(done, f"the feature cache {cache} is not writable (Read-only file system); fix its permissions or free space")
    assert done.stdout == "" and not (tmp_path / "mlflow.db").exists()


def png_header(width, height):
    """A PNG that claims width x height pixels: its signature and header chunk, no pixel data."""
    import struct
    import zlib

    header = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + header + struct.pack(">I", zlib.crc32(header))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def test_data_inspect_warns_about_images_that_will_not_decode(tmp_path):
    manifest = write_manifest(tmp_path, [json.dumps(dict(image=f"images/{name}", text="x"))
                                         for name in ("0.svg", "text.png", "empty.jpg", "huge.png")])
    (tmp_path / "images" / "text.png").write_text("not an image\n")
    (tmp_path / "images" / "empty.jpg").write_bytes(b"")
    (tmp_path / "images" / "huge.png").write_bytes(png_header(30_000, 30_000))
    done = inspect(manifest)
    assert done.returncode == 0, done.stderr
    (warning,) = [w for w in json.loads(done.stdout)["warnings"] if "will not decode" in w]
    assert warning.startswith(f"3 images will not decode (first {tmp_path / 'images' / 'text.png'}: not a PNG or JPEG)")
    from dudch.sources import FileImages

    assert FileImages([tmp_path / "images" / "huge.png"]).problems() == {
        tmp_path / "images" / "huge.png": "over 64,000,000 pixels"}
