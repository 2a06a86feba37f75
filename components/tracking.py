"""MLflow for the stages: each stage (and bit length) logs one child run under the pipeline's
parent run. The tracking URI comes from MLFLOW_TRACKING_URI, set by `dudch run` locally and by
a config map on a cluster."""

import contextlib
import time

import mlflow

STAGE_TAG = "dudch.stage"
BITS_TAG = "dudch.bits"


def stage_children(client, parent, stage, bits=None):
    """The child runs of pipeline run `parent` for `stage` (and `bits`), one per bit length:
    where an older version's retry left two, the latest finished one."""
    query = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`{STAGE_TAG}` = '{stage}'"
    if bits is not None:
        query += f" and tags.`{BITS_TAG}` = '{bits}'"
    runs = client.search_runs([parent.info.experiment_id], query)
    chosen = {}
    for run in sorted(runs, key=lambda r: (r.info.status == "FINISHED", r.info.start_time), reverse=True):
        chosen.setdefault(run.data.tags.get(BITS_TAG), run)
    return list(chosen.values())


@contextlib.contextmanager
def stage_run(parent_run_id, stage, bits=None, params=None):
    """Start the child run of `parent_run_id` for this stage and bit length, or resume it when a
    retried task (or a rerun) already made one, so that each stays one row; log `params` on
    entry and the stage's wall time on exit. Yields the active run."""
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    name = f"{stage}-{bits}bits" if bits else stage
    commit = parent.data.tags.get("mlflow.source.git.commit")
    tags = {STAGE_TAG: stage, **({BITS_TAG: str(bits)} if bits else {}),
            **({"mlflow.source.git.commit": commit} if commit else {})}
    earlier = stage_children(client, parent, stage, bits)
    with (mlflow.start_run(run_id=earlier[0].info.run_id) if earlier else
          mlflow.start_run(experiment_id=parent.info.experiment_id, run_name=name,
                           parent_run_id=parent_run_id, tags=tags)) as run:
        print(f"MLflow run of this task: {run_link(run)}", flush=True)
        if params:
            mlflow.log_params(params)
        started = time.perf_counter()
        yield run
        mlflow.log_metric("stage_wall_time_s", time.perf_counter() - started)


def run_link(run):
    """The run's page in the MLflow UI when the store is a server, else its id and store."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return f"{run.info.run_id} in {uri}"


def log_torch_model(nets, name):
    """Log networks as an MLflow PyTorch model. Requirements are given rather than inferred:
    inference would import and run the model in a subprocess, slow and fragile."""
    import mlflow.pytorch
    import torch

    mlflow.pytorch.log_model(nets, name=name, serialization_format="pickle",
                             pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "dudch"])


def dataset_source(uri):
    """The MLflow dataset source recording where data was read: a path, or an s3:// or http(s)
    URL as MLflow resolves them; any other URL (an ssh:// git remote) as a plain URL source."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow warns that it guessed the source type
        try:
            return resolve_dataset_source(str(uri))
        except MlflowException:
            return HTTPDatasetSource(str(uri))


def markdown_table(rows):
    """Results rows as a Markdown table."""
    lines = ["| method | bits | direction | mAP@50 | mAP@all | distinct codes |", "|---|---|---|---|---|---|"]
    for r in rows:
        distinct = f"{r['distinct_codes']:.2f}" if r.get("distinct_codes") is not None else "-"
        lines.append(f"| {r['method']} | {r['bits']} | {r['direction']} | {r['map_50']:.4f} | {r['map_all']:.4f} | {distinct} |")
    return "\n".join(lines)
