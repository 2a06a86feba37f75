"""`dudch index add` and `dudch index remove`: a registered retrieval model's database grown or
shrunk without retraining, registered as a new version of the model with its lineage.

The new version keeps the parent version's networks and encoders byte for byte; only
database.npz changes. An added pair's database code is sign(u + v) from the student's networks
(`dudch.retrieval.joint_codes`), its features made by the model's own encoders. Version tags:
the parent's `dudch.bits`, `dudch.pipeline_run` and scores (the networks', measured on the
pipeline run's database; the promotion gate reads them), and the lineage: `dudch.parent_version`,
`dudch.items_added`, `dudch.items_removed`, `dudch.items` (the database's size), and for an add
`dudch.dataset` and `dudch.data_version` (its DVC md5, or "unpinned").
"""

import contextlib
import gc
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np
import yaml

from dudch import DudchError, retrieval
from pipeline import registry
from pipeline.tracking import KIND_TAG

CARRIED_TAGS = ("dudch.bits", "dudch.pipeline_run", *(f"dudch.{m}" for m in registry.GATE_METRICS))
_REGISTERED = re.compile(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))")


def add(model_uri, source, data_version, cache_dir, name=None, alias=None, progress=True):
    """Add the items of dataset `source` to the database of the registered model at `model_uri`
    (models:/NAME@ALIAS or models:/NAME/VERSION) as a new version of model `name` (default: the
    same model), moving `alias` to it when given. Items whose id the database holds are skipped;
    when every item is, nothing is registered and a DudchError says so. Returns {"name",
    "version", "parent", "added", "items", "notes": [one-line notes]}."""
    import mlflow

    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        parent, folder, model = _open(client, model_uri, tmp)
        items = retrieval.item_features(source, model.encoders, model.student, cache_dir, progress)
        held = np.isin(items["item_id"], model.item_id)
        if held.all():
            raise DudchError(f"all {len(held)} items of {source} are already in {model_uri} (same ids); "
                             f"nothing to add, so no version was registered")
        notes = items["warnings"] + ([f"{int(held.sum())} of {len(held)} items are already in the index "
                                      f"(same ids) and were skipped"] if held.any() else [])
        new = ~held
        codes = retrieval.joint_codes(model.student, items["image"][new], items["text_features"][new])
        grown = shutil.copytree(folder, Path(tmp) / "retriever")
        retrieval.grow(model, grown, codes, items["item_id"][new], items["text"][new], items["image_sha256"][new])
        lineage = _lineage(added=int(new.sum()), removed=0, items=len(model.item_id) + int(new.sum()))
        lineage.update({"dudch.dataset": source, "dudch.data_version": data_version or "unpinned"})
        version = _register(client, parent, grown, name, alias, lineage, "index-add")
    return dict(name=version.name, version=version.version, parent=parent.version, added=int(new.sum()),
                items=int(lineage["dudch.items"]), notes=notes)


def remove(model_uri, ids, name=None, alias=None):
    """Remove the items `ids` (str) from the database of the registered model at `model_uri`, as
    `add` adds them. Ids the database does not hold are noted and skipped; when none is held,
    nothing is registered. Returns the dict of `add`, with "removed" for "added"."""
    import mlflow

    client = mlflow.MlflowClient()
    ids = np.unique(np.asarray(ids, dtype=str))
    with tempfile.TemporaryDirectory() as tmp:
        parent, folder, model = _open(client, model_uri, tmp)
        held = np.isin(ids, model.item_id)
        if not held.any():
            raise DudchError(f"none of the {len(ids)} ids is in {model_uri}; nothing to remove, so no "
                             f"version was registered")
        notes = [f"{int((~held).sum())} of {len(ids)} ids are not in the index and were skipped "
                 f"(first {ids[~held][0]})"] if not held.all() else []
        shrunk = shutil.copytree(folder, Path(tmp) / "retriever")
        retrieval.shrink(model, shrunk, ids[held])
        lineage = _lineage(added=0, removed=int(held.sum()), items=len(model.item_id) - int(held.sum()))
        version = _register(client, parent, shrunk, name, alias, lineage, "index-remove")
    return dict(name=version.name, version=version.version, parent=parent.version, removed=int(held.sum()),
                items=int(lineage["dudch.items"]), notes=notes)


def read_ids(path):
    """The item ids in a text file, one a line (blank lines and `#` comments ignored)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DudchError(f"cannot read ids file {path} ({error.__class__.__name__}); give a UTF-8 text "
                         f"file with one item id a line") from None
    ids = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not ids:
        raise DudchError(f"ids file {path} holds no id; write one item id a line (as `dudch search` prints them)")
    return ids


def _open(client, model_uri, destination):
    """(the ModelVersion at `model_uri`, its retriever folder downloaded below `destination`, the
    Retriever loaded from it). The download is quiet (`registry.download`)."""
    from mlflow.exceptions import MlflowException

    match = _REGISTERED.fullmatch(model_uri)
    if not match:
        raise DudchError(f"{model_uri!r} is not a registered model version; give models:/NAME@ALIAS or "
                         f"models:/NAME/VERSION (the index grows into a new version of it)")
    model_name, alias, number = match.groups()
    try:
        version = (client.get_model_version_by_alias(model_name, alias) if alias
                   else client.get_model_version(model_name, number))
    except MlflowException:
        raise DudchError(f"no model version {model_uri} in the registry; check the name and alias "
                         f"(`dudch promote` sets them)") from None
    with _interrupt_held():
        folder = registry.download(f"models:/{version.name}/{version.version}", str(Path(destination) / "model"))
        # MLflow's download pool can be left in a reference cycle; collected later, its weakref
        # callback would swallow a Ctrl-C ("Exception ignored"), so it goes while Ctrl-C waits.
        gc.collect()
    data = (yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"].get("data") or "")
    if not (folder / data / "database.npz").is_file():
        raise DudchError(f"{model_uri} is not a dudch retrieval model (it has no database); grow a model "
                         f"that `dudch promote` registered")
    return version, folder / data, retrieval.load(folder / data)


def _lineage(added, removed, items):
    return {"dudch.items_added": str(added), "dudch.items_removed": str(removed), "dudch.items": str(items)}


def _register(client, parent, retriever_dir, name, alias, lineage, run_name):
    """Register `retriever_dir` as a new version of `name` (default: the parent's model), with
    the parent's carried tags and the lineage, in a run beside the parent version's own."""
    parent_run = client.get_run(parent.run_id)
    tags = {**{k: v for k, v in parent.tags.items() if k in CARRIED_TAGS}, **lineage,
            "dudch.parent_version": f"{parent.name}/{parent.version}",
            "dudch.decision": f"{run_name}: {lineage['dudch.items_added']} items added, "
                              f"{lineage['dudch.items_removed']} removed from version {parent.version}"}
    with _interrupt_held(stop_after=False):  # pressed during registering: too late, it is done
        return registry.register(retriever_dir, name or parent.name, tags, alias,
                                 experiment_id=parent_run.info.experiment_id, run_name=run_name,
                                 parent_run_id=parent_run.data.tags.get("mlflow.parentRunId"),
                                 run_tags={KIND_TAG: "index", **{k: v for k, v in tags.items()
                                                                 if k.startswith("dudch.items")}})


@contextlib.contextmanager
def _interrupt_held(stop_after=True):
    """Ctrl-C inside the block waits for the block to end, then stops the command
    (KeyboardInterrupt) if `stop_after`. Around MLflow's threaded download (a Ctrl-C in it made
    the temporary folder's removal race the download threads: a traceback) and the registration
    (all of it, or none)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # Ctrl-C is ignored (a background job) or someone else's to handle
        return
    pressed = []
    signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed and stop_after:
        raise KeyboardInterrupt
