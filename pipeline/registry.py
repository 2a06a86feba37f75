"""The MLflow model registry: promote a pipeline run's student as a retrieval model behind a
quality gate, load it for search, and compare pipeline runs."""

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from components.tracking import stage_children
from dudch import DudchError, first_line
from pipeline import serving
from pipeline.tracking import KIND_TAG, report, status_of, teacher_of

MODEL_NAME = "dudch"
ALIAS = "production"
# The student's mAP@50 (DJSRH's metric) and mAP@all in both directions, keyed "map_50.i2t".
GATE_METRICS = tuple(f"{metric}.{direction}" for metric in ("map_50", "map_all") for direction in ("i2t", "t2i"))


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    def column(kind, name):
        return ColSpec(kind, name, required=False)

    inputs = Schema([column(DataType.string, "text"), column(DataType.string, "image_b64"),
                     column(DataType.string, "image"),
                     column(Array(DataType.double), "text_features"),
                     column(Array(DataType.double), "image_features")])
    outputs = Schema([ColSpec(DataType.string, "code"), column(Array(DataType.string), "ids"),
                      column(Array(DataType.long), "distances"), column(Array(DataType.string), "texts"),
                      column(DataType.long, "exact"), column(DataType.string, "warning")])
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("top_k", DataType.long, 0)]))


# One query column per request; `top_k` > 0 adds the nearest database items.
SIGNATURE = _signature()


def candidate(client, run_id, bits=None):
    """(parent run, bits, {"map_50.i2t": student score or None, ...} for GATE_METRICS) of a
    finished pipeline run; bits defaults to the longest code the run trained."""
    try:
        parent = client.get_run(run_id)
    except Exception:
        raise DudchError(f"no run {run_id} in the MLflow store; list pipeline runs with `dudch compare`") from None
    if parent.data.tags.get(KIND_TAG) != "pipeline":
        raise DudchError(f"run {run_id} is not a pipeline run (a stage's child run?); pass the "
                         f"parent run id that `dudch run` printed")
    if parent.info.status != "FINISHED":
        raise DudchError(f"pipeline run {run_id} is {parent.info.status}, not FINISHED; promote a finished run")
    trained = sorted(int(r.data.tags["dudch.bits"]) for r in stage_children(client, parent, "student"))
    if not trained:
        raise DudchError(f"pipeline run {run_id} has no student; it did not train")
    bits = bits or trained[-1]
    if bits not in trained:
        raise DudchError(f"pipeline run {run_id} trained {trained} bits, not {bits}; pass --bits")
    (evaluation,) = stage_children(client, parent, "evaluate", bits) or [None]
    metrics = evaluation.data.metrics if evaluation else {}
    scores = {m: metrics.get("student.{1}.{0}".format(*m.split("."))) for m in GATE_METRICS}
    return parent, bits, scores


def build(client, parent, bits, directory):
    """Download the run's student, codes, encoders and items, and write a retriever folder."""
    from dudch import retrieval

    (student_run,) = stage_children(client, parent, "student", bits)
    (prepare_run,) = stage_children(client, parent, "prepare")
    local = Path(directory)
    student_dir = client.download_artifacts(student_run.info.run_id, "retrieval", str(local / "student"))
    prepare_dir = client.download_artifacts(prepare_run.info.run_id, "retrieval", str(local / "prepare"))
    with np.load(Path(student_dir) / "codes.npz") as saved:
        codes, item_id = saved["codes"], saved["item_id"]
    with np.load(Path(prepare_dir) / "items.npz") as saved:
        row_of = {item: row for row, item in enumerate(saved["item_id"].tolist())}
        rows = [row_of[i] for i in item_id.tolist()]
        text = saved["text"][rows]
        # A run prepared before digests were kept: its items match no query image exactly.
        digests = saved["image_sha256"][rows] if "image_sha256" in saved.files else np.full(len(rows), "")
    encoders = json.loads((Path(prepare_dir) / "encoders.json").read_text())
    retrieval.save(local / "retriever", Path(student_dir) / "model.pt", encoders, codes, item_id, text, digests)
    return local / "retriever"


def _input_example(retriever):
    if retriever.encoders["text"]["kind"] != "given":
        return pd.DataFrame({"text": ["a drawing of a bird"]})
    width = retriever.student.dims["text_dim"]
    return pd.DataFrame({"text_features": [np.zeros(width, dtype=np.float32).tolist()]})


def quiet_mlflow():
    """Quiet MLflow's download bars and "Created version" notices: a command prints its outcome once."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def promote(run_id, bits=None, name=MODEL_NAME, alias=ALIAS, force=False):
    """Register the student of pipeline run `run_id` as a version of model `name` and move
    `alias` to it, when it passes the gate: at the alias holder's bit length, its mAP@50 and
    mAP@all at least the holder's in both directions (or `force`). Returns a dict: version,
    decision, scores; the decision and both score sets are also the version's tags. A refusal
    registers nothing and raises DudchError."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import store_lock

    quiet_mlflow()
    client = mlflow.MlflowClient()
    parent, bits, scores = candidate(client, run_id, bits)
    commit = {k: v for k, v in parent.data.tags.items() if k == "mlflow.source.git.commit"}
    outcome = {}

    def judge():
        """The gate against the alias's holder now: {"decision", "tags"}, or a DudchError."""
        holder = None
        try:
            holder = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            pass  # no model or no alias yet: nothing to beat
        decision, held = gate(scores, bits, holder)
        if decision.startswith("refused"):
            if not force:
                raise DudchError(f"{name} run {run_id[:8]} ({bits} bits) not registered: "
                                 f"{decision.removeprefix('refused: ')}; pass --force to promote it anyway")
            decision = "forced: " + decision.removeprefix("refused: ")
        outcome.update(decision=decision, held=held, tags={
            "dudch.decision": decision, "dudch.pipeline_run": parent.info.run_id, "dudch.bits": str(bits),
            "dudch.teacher": teacher_of(parent),
            **{f"dudch.{m}": str(v) for m, v in scores.items() if v is not None},
            **{f"dudch.holder_{m}": str(v) for m, v in held.items() if v is not None}})
        return outcome["tags"]

    # MLflow cannot compare-and-set an alias. On a local store promotions take turns (a lock);
    # on a server the gate is judged again just before registering, against whoever holds the
    # alias then, so that of two concurrent promotions the later one is judged against the first.
    with store_lock(mlflow.get_tracking_uri(), "promote"), tempfile.TemporaryDirectory() as tmp:
        judge()  # refuse before the model is built
        version = register(build(client, parent, bits, tmp), name, judge, alias, experiment_id=parent.info.experiment_id,
                           run_name=f"promote-{bits}bits", parent_run_id=parent.info.run_id,
                           run_tags={KIND_TAG: "promotion", "dudch.bits": str(bits), **commit})
    return dict(name=name, version=version.version, decision=outcome["decision"], scores=scores, held=outcome["held"],
                teacher=teacher_of(parent))


def register(retriever_dir, name, tags, alias, experiment_id, run_name, parent_run_id, run_tags):
    """Check a retriever folder by loading and querying it, log it as a pyfunc model in a new
    MLflow run (`run_name`, `run_tags`, under `parent_run_id` in `experiment_id`), register that
    as a new version of model `name` with `tags`, and move `alias` to it (None: no alias moves).
    `tags` may be a function returning them, called just before registering (it may refuse with
    a DudchError). Returns the ModelVersion. Until the version is created nothing is registered,
    so a failure or an interruption before leaves every registered version as it was."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    probe = serving._load_pyfunc(retriever_dir)  # a loaded copy to check the model before it is logged
    example = _input_example(probe.retriever)
    probe.predict(example, {"top_k": 1})  # fails here, not in production, if broken
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_run_id,
                          tags=run_tags):
        # Data only (`retriever_dir`); the installed `pipeline.serving` reads it.
        logged = mlflow.pyfunc.log_model(
            name="retrieval", loader_module=serving.LOADER_MODULE, data_path=str(retriever_dir),
            signature=SIGNATURE, input_example=example, pip_requirements=_requirements())
    tags = tags() if callable(tags) else tags
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # it exists: add a version
    # Tagged as it is created: an interruption after this leaves no version without its lineage.
    version = client.create_model_version(name, logged.model_uri, run_id=logged.run_id, model_id=logged.model_id,
                                          tags=tags)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version


def gate(scores, bits, holder):
    """(decision, the holder's scores): "promoted: ..." or "refused: ..." for a candidate with
    `scores` (GATE_METRICS) at `bits` against the model version holding the alias (or None)."""
    held = {m: float(holder.tags[f"dudch.{m}"]) if holder and f"dudch.{m}" in holder.tags else None
            for m in GATE_METRICS}
    if holder is None:
        return "promoted: no model held the alias", held
    if None in scores.values():
        return "refused: the run has no mAP (label-less data)", held
    held_bits = holder.tags.get("dudch.bits")
    if held_bits != str(bits):
        return (f"refused: version {holder.version} holds the alias at {held_bits} bits, this is {bits} "
                f"bits; compare at the same length (--bits {held_bits})"), held
    if None in held.values():
        return f"promoted: version {holder.version} has no mAP@50 and mAP@all to compare with", held
    worse = [m for m in GATE_METRICS if scores[m] < held[m]]
    if worse:
        return (f"refused: below version {holder.version} on {', '.join(worse)} "
                f"({_scores(scores)} vs {_scores(held)})"), held
    return f"promoted: mAP@50 and mAP@all at least version {holder.version}'s in both directions", held


def _scores(scores):
    return ", ".join(f"{m} {v:.4f}" if v is not None else f"{m} none" for m, v in scores.items())


def _requirements():
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "numpy", "faiss-cpu", "mlflow", "pandas")] + ["dudch"]


def download(model_uri, destination=None):
    """The folder of the model at `model_uri`, downloaded (into `destination`, or a temporary
    folder), after checking that loading it runs dudch's own code only
    (`serving.check_model_folder`)."""
    import mlflow

    quiet_mlflow()
    try:
        folder = mlflow.artifacts.download_artifacts(model_uri, dst_path=destination)
    except Exception as error:
        raise DudchError(f"cannot load {model_uri} ({first_line(error)}); check the name and alias "
                         f"(`dudch promote` sets them)") from None
    serving.check_model_folder(folder)
    return Path(folder)


def load(model_uri):
    """The pyfunc model at `model_uri`, checked as `download` does."""
    import mlflow

    return mlflow.pyfunc.load_model(str(download(model_uri)))


def search(model_uri, text=None, image=None, top=10):
    """(rows (rank, id, distance, text, exact) of the `top` database items nearest a text or an
    image file, exact matches of the query first; the model's warning about them: unknown query
    words, ties at the cut-off; '' if none).
    The image is sent as its bytes, as a remote client would."""
    import base64

    import mlflow

    if (text is None) == (image is None):
        raise DudchError("give exactly one of --text and --image")
    if image is not None and not Path(image).is_file():
        raise DudchError(f"image {image} not found")
    model = load(model_uri)
    query = {"text": [text]} if text is not None else {"image_b64": [base64.b64encode(Path(image).read_bytes()).decode()]}
    try:
        (found,) = model.predict(pd.DataFrame(query), params={"top_k": top}).itertuples()
    except mlflow.exceptions.MlflowException as error:
        raise DudchError(f"{model_uri} refused the query ({first_line(error.message)})") from None
    exact = getattr(found, "exact", 0)  # a model registered before exact matches reports none
    rows = [dict(rank=r + 1, id=i, distance=d, text=t, exact=r < exact)
            for r, (i, d, t) in enumerate(zip(found.ids, found.distances, found.texts))]
    return rows, getattr(found, "warning", "")


def compare(experiment_id, last=5):
    """{"runs": [{run_id, start, dataset, status, params, results}], "differing": {param: [value
    per run]}} for the `last` pipeline runs, newest first."""
    import mlflow

    client = mlflow.MlflowClient()
    parents = client.search_runs([experiment_id], f"tags.`{KIND_TAG}` = 'pipeline'",
                                 order_by=["attributes.start_time DESC"], max_results=last)
    if not parents:
        raise DudchError("no pipeline run in the MLflow store yet; run `dudch run` first")
    runs = [dict(run_id=p.info.run_id, start=p.info.start_time, status=status_of(p),
                 dataset=p.data.tags.get("dudch.dataset"), params=p.data.params, teacher=teacher_of(p),
                 results=report(experiment_id, p.info.run_id)["results"]) for p in parents]
    names = sorted({k for r in runs for k in r["params"]})
    differing = {k: [r["params"].get(k) for r in runs] for k in names
                 if len({r["params"].get(k) for r in runs}) > 1}
    return dict(runs=runs, differing=differing)


def format_comparison(comparison, method="student"):
    """The comparison as text: mAP@50 and mAP@all by run x (bits, direction), then the
    differing params."""
    import time

    runs = comparison["runs"]
    keys = sorted({(r["bits"], r["direction"]) for run in runs for r in run["results"] if r["method"] == method})
    lines = []
    for metric, title in (("map_50", "mAP@50"), ("map_all", "mAP@all")):
        lines += [f"{method} {title}", f"{'run':<10} {'started':<17} {'status':<11} {'teacher':<7}"
                  + "".join(f" {f'{b}b {d}':>9}" for b, d in keys)]
        for run in runs:
            value = {(r["bits"], r["direction"]): r[metric] for r in run["results"] if r["method"] == method}
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run["start"] / 1000))
            lines.append(f"{run['run_id'][:8]:<10} {started:<17} {run['status']:<11} {run['teacher']:<7}"
                         + "".join(f" {value[k]:>9.4f}" if k in value else f" {'-':>9}" for k in keys))
        lines.append("")
    if comparison["differing"]:
        lines.append("parameters that differ (same run order):")
        for name, values in comparison["differing"].items():
            lines.append(f"  {name}: " + " | ".join("-" if v is None else str(v) for v in values))
    else:
        lines.append("all parameters are equal")
    return "\n".join(lines)
