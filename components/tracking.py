"""MLflow for the stages: each stage (and bit length) logs one child run under the pipeline's
parent run. The tracking URI comes from MLFLOW_TRACKING_URI, set by `dudch run` locally and by
a config map on a cluster. The cacheable stages (prepare, teacher) take no per-run input, so
they cannot know the parent run: they write a `StageRecord` into an output, and a task that is
never cached logs it (`log_record`), for a reused output as for a fresh one."""

import contextlib
import json
import shutil
import time
from pathlib import Path

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
def stage_run(parent_run_id, stage, bits=None, params=None, timed=True):
    """Start the child run of `parent_run_id` for this stage and bit length, or resume it when a
    retried task (or a rerun) already made one, so that each stays one row; log `params` on
    entry and, if `timed`, the stage's wall time on exit. Yields the active run."""
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
        if timed:
            mlflow.log_metric("stage_wall_time_s", time.perf_counter() - started)


class StageRecord:
    """What a cacheable stage logs to MLflow, kept in its `record` output folder: params, metrics
    with their steps, tags, files at their artifact paths, networks (nets.save files) to log as
    MLflow PyTorch models, and its input dataset. `save` writes it; `log_record` logs it."""

    def __init__(self, folder, stage, bits=None):
        self.folder = Path(folder)
        self.files = self.folder / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self.content = dict(stage=stage, bits=bits, params={}, metrics=[], tags={}, models=[],
                            dataset=None, warnings=[], started=time.time())

    def log_params(self, params):
        self.content["params"].update(params)

    def log_metrics(self, metrics, step=0):
        self.content["metrics"] += [[name, float(value), step] for name, value in metrics.items()]

    def set_tags(self, tags):
        self.content["tags"].update(tags)

    def _artifact(self, artifact_file):
        """Where the file that MLflow will hold at `artifact_file` is kept until then."""
        path = self.files / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def log_dict(self, obj, artifact_file):
        self._artifact(artifact_file).write_text(json.dumps(obj, indent=2, default=str))

    def log_figure(self, figure, artifact_file):
        figure.savefig(self._artifact(artifact_file))

    def log_artifact(self, local_path, artifact_path):
        shutil.copy(local_path, self._artifact(f"{artifact_path}/{Path(local_path).name}"))

    def log_model(self, saved_nets, name):
        shutil.copy(saved_nets, self.folder / f"{name}.pt")
        self.content["models"].append(name)

    def warn(self, message):
        """A data warning, shown again whenever the record is logged (a reused output too)."""
        self.content["warnings"].append(message)

    def log_input(self, uri, name, digest):
        self.content["dataset"] = dict(uri=str(uri), name=name, digest=digest)

    def save(self):
        from dudch.storage import save_json

        self.log_metrics({"stage_wall_time_s": time.time() - self.content["started"]})
        save_json(self.folder / "record.json", {**self.content, "finished": time.time()})


def log_record(folder, parent_run_id):
    """Log a StageRecord's folder as its stage's child run of `parent_run_id`. Returns the
    record's content."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Metric

    folder = Path(folder)
    content = json.loads((folder / "record.json").read_text())
    with stage_run(parent_run_id, content["stage"], content["bits"], content["params"], timed=False) as run:
        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value, step in content["metrics"]]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            mlflow.MlflowClient().log_batch(run.info.run_id, metrics=metrics[start:start + 1000])
        mlflow.set_tags(content["tags"])
        mlflow.log_artifacts(str(folder / "files"))
        for name in content["models"]:
            log_networks(folder / f"{name}.pt", name)
        if content["dataset"]:
            found = content["dataset"]
            mlflow.log_input(MetaDataset(dataset_source(found["uri"]), name=found["name"], digest=found["digest"]),
                             context="training")
    return content


def run_link(run):
    """The run's page in the MLflow UI when the store is a server, else its id and store."""
    from dudch import redact

    uri = redact(mlflow.get_tracking_uri())
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return f"{run.info.run_id} in {uri}"


def log_networks(saved_nets, name):
    """Log a networks file (`dudch.nets.save`: a state dict) as an MLflow model that the
    installed `pipeline.serving` loads: nothing pickled, no code in the store. Requirements are
    given rather than inferred: inference would import and run the model in a subprocess."""
    import torch

    from pipeline.serving import LOADER_MODULE

    mlflow.pyfunc.log_model(name=name, loader_module=LOADER_MODULE, data_path=str(saved_nets),
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
