"""`dudch index add` and `remove` on a real registry: a promoted model's database grown with new
drawings and shrunk again, each step a new version with its lineage, the parent untouched."""

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from dudch import nets, retrieval, sources
from dudch.features import bag_of_words_for
from tests.helpers import OPENCLIPART, dudch, interruptible

NAME = "index-test"
ADDED = 12


def new_drawings(folder, model, n):
    """A manifest over `n` real drawings that the model's database lacks, each with at least two
    words of its vocabulary (its tags as text): (manifest path, [(image path, text)])."""
    data = sources.load(f"openclipart:{OPENCLIPART}", min_label_size=1)
    vocabulary = model.encoders["text"]["vocabulary"]
    (folder / "images").mkdir(parents=True)
    records = []
    for row in range(len(data) - 1, -1, -1):  # the model's subset is the first items by content hash
        text = ", ".join(data.texts[row])
        if data.item_id[row] in model.item_id or bag_of_words_for([text], vocabulary).sum() < 2:
            continue
        name = f"images/{len(records)}.svg"
        (folder / name).write_bytes((OPENCLIPART / data.path[row]).read_bytes())
        records.append(dict(image=name, text=text))
        if len(records) == n:
            break
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder / "pairs.jsonl", records


@pytest.fixture(scope="module")
def grown(pipeline_run, tmp_path_factory):
    """The run's 32-bit student promoted as index-test (version 1), then grown with ADDED new
    drawings by `dudch index add` (version 2)."""
    env = pipeline_run["env"]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    done = dudch("promote", "--run", pipeline_run["run_id"], "--bits", "32", "--name", NAME, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    parent = mlflow.pyfunc.load_model(f"models:/{NAME}/1").get_raw_model()
    manifest, records = new_drawings(tmp_path_factory.mktemp("new"), parent, ADDED)
    added = dudch("index", "add", "--model", f"models:/{NAME}@production", "--dataset", f"manifest:{manifest}", env=env)
    assert added.returncode == 0, added.stderr[-2000:]
    return dict(env=env, manifest=manifest, records=records, added=added, parent=parent,
                client=pipeline_run["client"])


def test_add_registers_a_new_version_with_its_lineage_and_moves_no_alias(grown):
    client, size = grown["client"], len(grown["parent"].item_id)
    assert grown["added"].stdout.startswith(f"{NAME} version 2: version 1 with {ADDED} items added, "
                                            f"{size + ADDED} items in all")
    assert "no alias moved" in grown["added"].stdout
    version = client.get_model_version(NAME, "2")
    parent = client.get_model_version(NAME, "1")
    assert version.tags["dudch.parent_version"] == f"{NAME}/1"
    assert (version.tags["dudch.items_added"], version.tags["dudch.items_removed"]) == (str(ADDED), "0")
    assert version.tags["dudch.items"] == str(size + ADDED)
    assert version.tags["dudch.dataset"] == f"manifest:{grown['manifest']}"
    assert version.tags["dudch.data_version"] == "unpinned"  # a manifest outside any .dvc pin
    for carried in ("dudch.bits", "dudch.pipeline_run", "dudch.map_50.i2t", "dudch.map_all.t2i"):
        assert version.tags[carried] == parent.tags[carried]
    assert str(client.get_model_version_by_alias(NAME, "production").version) == "1"


def test_the_grown_database_is_the_parent_plus_the_new_items_coded_by_the_networks(grown):
    parent, model = grown["parent"], mlflow.pyfunc.load_model(f"models:/{NAME}/2").get_raw_model()
    size = len(parent.item_id)
    np.testing.assert_array_equal(model.database_codes()[:size], parent.database_codes())
    assert model.item_id.tolist() == parent.item_id.tolist() + [r["image"] for r in grown["records"]]
    assert model.text[size:].tolist() == [r["text"] for r in grown["records"]]
    # Each new pair coded sign(u + v) from the same networks and encoders as the queries.
    folder = Path(grown["manifest"]).parent
    image = model.encode(images=[folder / r["image"] for r in grown["records"]])
    text = model.encode(texts=[r["text"] for r in grown["records"]])
    features = retrieval.item_features(f"manifest:{grown['manifest']}", model.encoders, model.student,
                                       folder / "cache", progress=False)
    h_image, h_text = nets.hash_outputs(model.student, features["image"], features["text_features"])
    np.testing.assert_array_equal(nets.sign(h_image), image)
    np.testing.assert_array_equal(nets.sign(h_text), text)
    np.testing.assert_array_equal(model.database_codes()[size:], nets.sign(np.tanh(h_image) + np.tanh(h_text)))


def test_search_finds_each_added_drawing_at_rank_1_by_its_own_text_and_image(grown):
    """A query by an added item's own image file or own text finds it first: the items that hold
    exactly the query come first, then every other item, each group as the codes rank it (Hamming
    distance, agreement with the query's outputs, row).
    An item shares rank 1 only with items of the very same text (no two share an image file)."""
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/2")
    retriever = model.get_raw_model()
    folder, records = Path(grown["manifest"]).parent, grown["records"]
    database = retriever.database_codes()
    row_of = {item: row for row, item in enumerate(retriever.item_id.tolist())}
    images = [(folder / r["image"]).read_bytes() for r in records]
    normalised = np.array([retrieval.normalised_text(t) for t in retriever.text])
    alone = {"text": [], "image_b64": []}  # the records found at rank 1 alone
    for column, values, outputs in (("text", [r["text"] for r in records], retriever.outputs(texts=[r["text"] for r in records])),
                                    ("image_b64", [base64.b64encode(i).decode() for i in images], retriever.outputs(images=images))):
        found = model.predict(pd.DataFrame({column: values}), params={"top_k": len(database)})
        for record, image, found_row, output in zip(records, images, found.itertuples(), outputs):
            own = row_of[record["image"]]
            same = (normalised == retrieval.normalised_text(record["text"]) if column == "text"
                    else retriever.image_sha256 == hashlib.sha256(image).hexdigest())
            exact = np.flatnonzero(same)
            assert own in exact and found_row.exact == len(exact)
            if len(exact) == 1:
                alone[column].append(record)
            every = (database.shape[1] - database.astype(int) @ nets.sign(output).astype(int)) // 2
            score = retrieval.agreement(output, database)
            ranked = np.concatenate([group[np.lexsort((group, -score[group], every[group]))]
                                     for group in (exact, np.flatnonzero(~same))])
            assert found_row.ids == retriever.item_id[ranked].tolist() and found_row.distances == every[ranked].tolist()
            assert len(exact) > 1 or found_row.ids[0] == record["image"]
    assert len(alone["image_b64"]) == len(records) and alone["text"]
    record = alone["text"][0]
    by_text = dudch("search", "--text", record["text"], "--model", f"models:/{NAME}/2", "--top", "3", env=grown["env"])
    assert by_text.returncode == 0, by_text.stderr[-2000:]
    first = by_text.stdout.splitlines()[1].split()
    assert first[:2] == ["1", record["image"]] and first[3] == "exact"


def test_a_duplicate_add_is_refused_and_registers_nothing(grown):
    before = len(grown["client"].search_model_versions(f"name = '{NAME}'"))
    again = dudch("index", "add", "--model", f"models:/{NAME}/2", "--dataset", f"manifest:{grown['manifest']}",
                  env=grown["env"])
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.strip().splitlines()[-1] == (
        f"error: all {ADDED} items of manifest:{grown['manifest']} are already in models:/{NAME}/2 (same ids); "
        f"nothing to add, so no version was registered")
    assert len(grown["client"].search_model_versions(f"name = '{NAME}'")) == before


@pytest.mark.parametrize("moment", ["download", "encoding"])
def test_an_interrupted_add_registers_nothing_and_leaves_nothing_behind(grown, tmp_path, moment):
    """Ctrl-C while `index add` downloads the model (its first file there; MLflow downloads in
    threads) or encodes (the model downloaded, 200 drawings to go): one line, exit 130, no new
    version, the registered ones unchanged, no scratch folder left."""
    parent = grown["parent"]
    manifest, _ = new_drawings(tmp_path / "many", parent, 200)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    client = grown["client"]
    before = {v.version: (v.tags, v.source) for v in client.search_model_versions(f"name = '{NAME}'")}
    reference = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path / "reference")))
    sizes = {path.relative_to(reference): path.stat().st_size for path in reference.rglob("*") if path.is_file()}

    def reached():
        folders = list(scratch.glob("*/model"))
        if moment == "download":
            return any(any(folder.rglob("*")) for folder in folders)
        return any(all((folder / name).is_file() and (folder / name).stat().st_size == size
                       for name, size in sizes.items()) for folder in folders)

    command = [str(Path(sys.executable).with_name("dudch")), "index", "add", "--model", f"models:/{NAME}/1",
               "--dataset", f"manifest:{manifest}"]
    run = subprocess.Popen(command, env={**os.environ, **grown["env"], "TMPDIR": str(scratch)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    try:
        deadline = time.time() + 600
        while not reached() and run.poll() is None and time.time() < deadline:
            time.sleep(0.005)  # the download takes a fraction of a second
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate(timeout=600)
    finally:
        run.kill()
    assert run.returncode == 130 and stdout == "", stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: index interrupted (Ctrl-C); nothing was half-written, rerun it to start again"]
    assert stderr.splitlines()[-1] == errors[0] and "Traceback" not in stderr
    after = {v.version: (v.tags, v.source) for v in client.search_model_versions(f"name = '{NAME}'")}
    assert after == before
    assert list(scratch.iterdir()) == []
    np.testing.assert_array_equal(mlflow.pyfunc.load_model(f"models:/{NAME}/1").get_raw_model().database_codes(),
                                  parent.database_codes())


def test_remove_makes_an_item_unfindable_and_moves_the_alias_when_asked(grown, tmp_path):
    records, env = grown["records"], grown["env"]
    gone = records[0]["image"]
    ids = tmp_path / "ids.txt"
    ids.write_text(f"# retired drawings\n{gone}\nno-such-item\n")
    done = dudch("index", "remove", "--model", f"models:/{NAME}/2", "--ids", str(ids), "--alias", "production", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "note: 1 of 2 ids are not in the index and were skipped (first no-such-item)" in done.stderr
    version = done.stdout.split()[2].rstrip(":")
    tags = grown["client"].get_model_version(NAME, version).tags
    assert (tags["dudch.parent_version"], tags["dudch.items_removed"]) == (f"{NAME}/2", "1")
    assert str(grown["client"].get_model_version_by_alias(NAME, "production").version) == version
    shrunk = mlflow.pyfunc.load_model(f"models:/{NAME}@production")
    assert gone not in shrunk.get_raw_model().item_id.tolist()
    size = len(shrunk.get_raw_model().item_id)
    found = shrunk.predict(pd.DataFrame({"text": [records[0]["text"]]}), params={"top_k": size})
    assert gone not in found["ids"][0] and len(found["ids"][0]) == size
    # The versions it came from are unchanged and still load and search.
    older = mlflow.pyfunc.load_model(f"models:/{NAME}/2")
    assert gone in older.predict(pd.DataFrame({"text": [records[0]["text"]]}), params={"top_k": size + 1})["ids"][0]
    first = mlflow.pyfunc.load_model(f"models:/{NAME}/1").get_raw_model()
    np.testing.assert_array_equal(first.database_codes(), grown["parent"].database_codes())
    nothing = tmp_path / "unknown.txt"
    nothing.write_text("no-such-item\n")
    refused = dudch("index", "remove", "--model", f"models:/{NAME}/2", "--ids", str(nothing), env=env)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "none of the 1 ids" in refused.stderr


def test_a_dataset_that_does_not_fit_the_model_is_refused_in_one_line(grown, tmp_path):
    """Image features instead of images, or a model URI that names no registered version:
    one line, exit 2, nothing registered."""
    from tests.datasets import cleared_set

    pixels = np.full((12, 32, 32, 3), 255, dtype=np.uint8)
    folder = cleared_set(tmp_path / "mat", pixels, np.ones((12, 7), dtype=np.float32), np.ones((12, 1)),
                         features=np.ones((12, 1280), dtype=np.float32))
    before = len(grown["client"].search_model_versions(f"name = '{NAME}'"))
    for args, message in (
            (("--dataset", f"mirflickr25k:{folder}"), "gives image features, but the model encodes images with efficientnet-lite0"),
            (("--dataset", "manifest:/nonexistent/pairs.jsonl"), "dataset not found at /nonexistent/pairs.jsonl"),
            (("--model", f"runs:/abc/model", "--dataset", f"manifest:{grown['manifest']}"), "is not a registered model version"),
            (("--model", f"models:/{NAME}/99", "--dataset", f"manifest:{grown['manifest']}"), "no model version models:/index-test/99")):
        done = dudch("index", "add", *(args if args[0] == "--model" else ("--model", f"models:/{NAME}/1", *args)),
                     env=grown["env"])
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert done.returncode == 2 and len(errors) == 1 and message in errors[0], done.stderr
        assert done.stderr.splitlines()[-1] == errors[0] and "Traceback" not in done.stderr
    assert len(grown["client"].search_model_versions(f"name = '{NAME}'")) == before


def test_given_features_are_added_only_at_the_model_s_widths(tmp_path):
    """A model trained on given features (Cleared-Set XAll/YAll) takes new items of the same
    widths, and refuses other widths or images in one line."""
    from dudch import DudchError
    from tests.datasets import cleared_set

    rng = np.random.default_rng(0)
    features, bow = rng.normal(size=(12, 40)).astype(np.float32), (rng.random((12, 7)) > 0.5).astype(np.float32)
    folder = cleared_set(tmp_path / "mat", None, bow, np.ones((12, 1)), features=features)
    given = {"text": {"kind": "given"}, "image": {"kind": "given"}}
    items = retrieval.item_features(f"mirflickr25k:{folder}", given, nets.HashNets(40, 7, 16), tmp_path / "cache")
    np.testing.assert_array_equal(items["image"], features)
    np.testing.assert_array_equal(items["text_features"], bow)
    for student, message in ((nets.HashNets(41, 7, 16), "gives image features of width 40, but the model was trained "
                              "on given image features of width 41"),
                             (nets.HashNets(40, 8, 16), "gives text features of width 7, but the model was trained "
                              "on given text features of width 8")):
        with pytest.raises(DudchError, match=message):
            retrieval.item_features(f"mirflickr25k:{folder}", given, student, tmp_path / "cache")
