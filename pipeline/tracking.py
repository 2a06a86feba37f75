"""MLflow for whole pipeline runs: the store, the parent run, and reading results back."""

import contextlib
import fcntl
import os
import socket
import subprocess
from pathlib import Path

from dudch import DudchError, first_line, out_of_space

EXPERIMENT = "dudch"
KIND_TAG = "dudch.kind"
HOST_TAG, PID_TAG = "dudch.host", "dudch.pid"  # the `dudch run` process that owns a local run
RESULT_METHODS = ("teacher", "student")  # what `report` and the results table show


def tracking_uri(root):
    """MLFLOW_TRACKING_URI when set, else a sqlite file in the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


# MLflow's HTTP client retries 7 times with backoff factor 2 and a 120 s timeout: minutes per
# call when a server has died. These bound a dead server's cost to seconds per call, so a run
# fails within a minute or two (a user's own settings win).
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
RACE_ATTEMPTS = 5  # two first runs on a fresh server store both create the experiment


def connect(root):
    """Point MLflow (this process and the stages it starts) at the store, check that it answers
    and that its artifact store (when a folder) is writable, and return the experiment id.
    One-line DudchError when it cannot be used."""
    import time

    import mlflow

    uri = tracking_uri(root)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    for attempt in range(RACE_ATTEMPTS):
        try:
            with store_lock(uri):
                experiment = _experiment(uri)
            break
        except Exception as error:  # MLflow raises many types for a broken store
            if any(s in str(error) for s in ("already exists", "database is locked")) and attempt + 1 < RACE_ATTEMPTS:
                time.sleep(1 + attempt)  # another process is creating the store: use what it made
                continue
            raise DudchError(f"cannot use the MLflow store {uri} ({first_line(error)}); fix MLFLOW_TRACKING_URI "
                             f"or unset it to use the local sqlite store") from None
    _check_writable(experiment.artifact_location)
    return experiment.experiment_id


@contextlib.contextmanager
def store_lock(uri, purpose=""):
    """For a local sqlite store, an exclusive lock beside its file (one per `purpose`); for other
    stores, nothing. Around the first use of a store, so that two first runs do not both create
    its tables (their migrations break each other), and around a promotion (`purpose`
    "promote"), so that two promotions take their turns at the gate."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri.removeprefix("sqlite:///") + (f".{purpose}" if purpose else "") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _experiment(uri):
    import mlflow

    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        # A local sqlite store keeps its artifacts in a folder beside the database file.
        artifacts = ((Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
                     if uri.startswith("sqlite:///") else None)
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    return experiment


def _check_writable(artifact_location):
    """Refuse an artifact store folder that cannot be written, before any work is done. (An
    object store behind a server is the server's to check.)"""
    from urllib.parse import unquote, urlparse

    if not artifact_location.startswith("file:") and "://" in artifact_location:
        return
    folder = Path(unquote(urlparse(artifact_location).path) if artifact_location.startswith("file:") else artifact_location)
    check_writable(folder, "the MLflow artifact store", "or point MLFLOW_TRACKING_URI at another store")


def check_writable(folder, what, alternative=""):
    """Refuse a folder that cannot be created or written, in one line naming `what` it is."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dudch-write-check"):
            pass
    except OSError as error:
        raise DudchError(f"{what} {folder} is not writable ({error.strerror}); fix its permissions or free "
                         f"space{', ' + alternative if alternative else ''}") from None


def _check_server(uri):
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as error:
        reason = type(error).__name__
        raise DudchError(f"cannot reach the MLflow tracking server at {uri} ({reason}); start it "
                         f"(see mlflow/README.md) or unset MLFLOW_TRACKING_URI to use the local "
                         f"sqlite store") from None


def git_commit(root):
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def run_name(dataset, bits):
    """A readable, distinct name: dataset, code lengths and start time, e.g.
    'openclipart 16-32-64-128b 11-27 07:41:05'."""
    import time

    return f"{dataset.split(':')[0]} {'-'.join(map(str, bits))}b {time.strftime('%m-%d %H:%M:%S')}"


def start_parent_run(root, experiment_id, params, dataset, pin, data_uri):
    """Create the pipeline's parent run (left open for the stages' child runs), with every
    pipeline parameter (`params`, defaults included), tagged with the data's DVC pin
    (`pipeline.data.pin`; md5 "untracked" when no .dvc file tracks it) and the git commit of the
    project at `root`, with the data logged as the run's input dataset (`data_uri`: where it was
    read). Returns the run id."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    from components.tracking import dataset_source

    version = pin["md5"] or "untracked"
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id, run_name=run_name(dataset, params["bits"]), tags={
        KIND_TAG: "pipeline", "dudch.dataset": dataset, "dudch.data_version": version,
        "dudch.data_dvc_file": str(pin["dvc_file"]), "dudch.data_rev": str(pin["rev"]),
        "mlflow.source.git.commit": git_commit(root), "mlflow.source.name": "dudch run",
        **{HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}})
    for key, value in {**params, "dataset": dataset, "data_version": version}.items():
        client.log_param(run.info.run_id, key, value)
    entity = MetaDataset(dataset_source(data_uri), name=dataset.split(":")[0], digest=pin["md5"])._to_mlflow_entity()
    client.log_inputs(run.info.run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", "training")])])
    return run.info.run_id


def finish_parent_run(run_id, status):
    """End the parent run as `status` (FINISHED, FAILED or KILLED), and any of its child runs
    still RUNNING (a killed task's) as FAILED or KILLED. A finished run first gets its summary,
    and is FAILED, never left RUNNING, if that breaks."""
    import mlflow

    client = mlflow.MlflowClient()
    final = "FAILED" if status == "FINISHED" else status
    try:
        if status == "FINISHED":
            log_summary(run_id)
            final = "FINISHED"
    finally:
        experiment_id = client.get_run(run_id).info.experiment_id
        running = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}' "
                                     f"and attributes.status = 'RUNNING'")
        ends = {child.info.run_id: "KILLED" if status == "KILLED" else "FAILED" for child in running}
        ends[run_id] = final
        try:
            for ended, how in ends.items():
                client.set_terminated(ended, how)
        except Exception as error:
            database = mlflow.get_tracking_uri().partition("sqlite:///")[2]
            if not (out_of_space(error) and database):
                raise
            _end_in_place(database, ends)


def _end_in_place(database, ends):
    """End runs ({run id: status}) in a sqlite store on a full disk, where MLflow cannot: sqlite
    needs room for its rollback journal, and with the journal in memory an update that fits its
    page (a status and an end time do) needs none. Otherwise they would stay RUNNING for good."""
    import sqlite3
    import time

    with contextlib.closing(sqlite3.connect(database, timeout=60)) as db:
        db.execute("PRAGMA journal_mode=MEMORY")
        with db:
            db.executemany("UPDATE runs SET status = ?, end_time = ? WHERE run_uuid = ?",
                           [(how, int(time.time() * 1000), ended) for ended, how in ends.items()])


def is_running(run_id):
    import mlflow

    return mlflow.MlflowClient().get_run(run_id).info.status == "RUNNING"


def status_of(run):
    """A pipeline run's status as people should read it: MLflow's, except INTERRUPTED for a run
    still RUNNING whose `dudch run` process on this machine has ended (killed, or cut off
    from its MLflow server, so nothing could end the run)."""
    status = run.info.status
    tags = run.data.tags
    if status != "RUNNING" or tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
        return status
    try:
        alive = b"dudch" in Path(f"/proc/{tags[PID_TAG]}/cmdline").read_bytes()
    except OSError:
        alive = False
    return status if alive else "INTERRUPTED"


def log_summary(run_id):
    """Make the parent run the row to compare in the MLflow UI: per method, direction, metric
    and bit length a metric `student.i2t.map_50.64b`; the same as a series over bits
    (`student.i2t.map_50` at step = bits, which the UI's charts draw against code length); the
    results table (`results_table.json`), `plots/map_vs_bits.png`, and the table as the run's
    description."""
    import time

    import mlflow
    import pandas as pd
    from mlflow.entities import Metric

    from components.tracking import markdown_table
    from dudch.evaluate import plot_map_vs_bits

    rows = report(None, run_id)["results"]
    if not rows:
        return
    client, now = mlflow.MlflowClient(), int(time.time() * 1000)
    metrics = []
    for r in rows:
        for name in ("map_50", "map_all"):
            key = f"{r['method']}.{r['direction']}.{name}"
            metrics += [Metric(f"{key}.{r['bits']}b", r[name], now, 0), Metric(key, r[name], now, r["bits"])]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    mlflow.log_table(pd.DataFrame(rows), "results_table.json", run_id=run_id)
    client.log_figure(run_id, plot_map_vs_bits(rows), "plots/map_vs_bits.png")
    client.set_tag(run_id, "mlflow.note.content", "Results on the query set (mAP@50 is DJSRH's "
                   "calculate_top_map):\n\n" + markdown_table(rows))


def latest_pipeline_run_id(experiment_id):
    import mlflow

    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'pipeline'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise DudchError("no pipeline run in the MLflow store yet; run `dudch run` (or `make run`) first")
    return runs[0].info.run_id


def report(experiment_id, run_id=None):
    """The results of one pipeline run (default: the latest), as the `report --json` object."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from components.tracking import stage_children

    client = mlflow.MlflowClient()
    run_id = run_id or latest_pipeline_run_id(experiment_id)
    try:
        parent = client.get_run(run_id)
    except MlflowException:
        raise DudchError(f"no run {run_id} in the MLflow store {mlflow.get_tracking_uri()}; "
                         f"`dudch compare` lists the pipeline runs") from None
    if parent.data.tags.get(KIND_TAG) != "pipeline":
        raise DudchError(f"run {run_id} is not a pipeline run (a stage's child run?); pass the "
                         f"parent run id that `dudch run` printed (`dudch compare` lists them)")
    results = []
    for child in stage_children(client, parent, "evaluate"):
        bits = int(child.data.tags["dudch.bits"])
        for method in RESULT_METHODS:
            for direction in ("i2t", "t2i"):
                prefix = f"{method}.{direction}."
                if prefix + "map_all" in child.data.metrics:
                    results.append(dict(method=method, bits=bits, direction=direction,
                                        map_50=child.data.metrics[prefix + "map_50"],
                                        map_all=child.data.metrics[prefix + "map_all"],
                                        distinct_codes=child.data.metrics.get(prefix + "distinct_codes")))
    results.sort(key=lambda r: (RESULT_METHODS.index(r["method"]), r["bits"], r["direction"]))
    return dict(run_id=run_id, dataset=parent.data.tags.get("dudch.dataset"),
                data_version=parent.data.tags.get("dudch.data_version"), status=status_of(parent),
                teacher=teacher_of(parent), results=results)


def teacher_of(parent):
    """The name of the teacher a pipeline run distilled ("DJSRH", "UCCH"): runs from before the
    choice existed had DJSRH."""
    from dudch.teacher import TEACHER_NAMES

    method = parent.data.params.get("teacher", "djsrh")
    return TEACHER_NAMES.get(method, method)


def format_table(report_object):
    """The results as a fixed-width text table: method x bits x direction."""
    if not report_object["results"]:
        return ("No mAP: the dataset has no labels (or evaluation has not run). The codes were "
                "trained and logged; give the items labels to evaluate retrieval.")
    lines = [f"{'method':<15} {'bits':>4}  {'direction':<9} {'mAP@50':>8} {'mAP@all':>8} {'distinct':>8}"]
    for r in report_object["results"]:
        distinct = f"{r['distinct_codes']:>8.2f}" if r.get("distinct_codes") is not None else f"{'-':>8}"
        method = f"teacher ({report_object['teacher']})" if r["method"] == "teacher" else r["method"]
        lines.append(f"{method:<15} {r['bits']:>4}  {r['direction']:<9} {r['map_50']:>8.4f} {r['map_all']:>8.4f} {distinct}")
    return "\n".join(lines)
