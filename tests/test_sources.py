"""Every SOURCE kind, built in its real layout from real drawings, loads to the same items; bad
input gives one clear line."""

import json
import zipfile
from dataclasses import replace

import numpy as np
import pytest

from dudch import DudchError, prepare, sources
from dudch.evaluate import score
from dudch.prepare import PrepareConfig
from tests import datasets
from tests.helpers import dudch

N = 24
CONFIG = PrepareConfig(min_word_count=1, min_label_size=1, image_size=224)


@pytest.fixture(scope="module")
def items(openclipart_root):
    pixels, bow, labels, tags = datasets.real_items(openclipart_root, N)
    return dict(pixels=pixels, bow=bow, labels=labels, tags=tags)


def _pixels(data):
    return np.stack(data.images.batch(data.rows, 224))


@pytest.mark.parametrize("kind,prefix,hdf5", [("mirflickr25k", "mirflickr25k-", False),
                                               ("mirflickr25k", "mirflickr25k-", True),
                                               ("nuswide", "nus-wide-tc10-", True)],
                         ids=["mirflickr-v5", "mirflickr-v7.3-hdf5", "nuswide-v7.3-hdf5"])
def test_cleared_set_loads_in_both_mat_versions(tmp_path, items, kind, prefix, hdf5):
    folder = datasets.cleared_set(tmp_path / kind, items["pixels"], items["bow"], items["labels"],
                                  prefix=prefix, hdf5=hdf5)
    data = sources.load(f"{kind}:{folder}")
    assert len(data) == N and data.warnings == []
    np.testing.assert_array_equal(_pixels(data), items["pixels"])
    np.testing.assert_array_equal(data.text_bow, items["bow"])
    np.testing.assert_array_equal(data.labels, items["labels"])
    assert data.images.shape == (N, 224, 224, 3)


def test_hdf5_files_are_stored_transposed_like_matlab_writes_them(tmp_path, items):
    folder = datasets.cleared_set(tmp_path / "mir", items["pixels"], items["bow"], items["labels"], hdf5=True)
    import h5py

    with h5py.File(folder / "mirflickr25k-iall.mat", "r") as f:
        assert f["IAll"].shape == (N, 3, 224, 224)  # as the Cleared-Set's IAll reads from h5py
    with h5py.File(folder / "mirflickr25k-yall.mat", "r") as f:
        assert f["YAll"].shape == (items["bow"].shape[1], N)


def test_nuswide_with_precomputed_features(tmp_path, items):
    features = np.random.default_rng(0).normal(size=(N, 40)).astype(np.float32)
    folder = datasets.cleared_set(tmp_path / "nus", None, items["bow"], items["labels"],
                                  prefix="nus-wide-tc10-", hdf5=True, features=features)
    data = sources.load(f"nuswide:{folder}")
    assert data.images is None
    np.testing.assert_allclose(data.image_features, features)
    summary = prepare.describe(f"nuswide:{folder}", CONFIG)
    empty = int((items["bow"].sum(axis=1) == 0).sum())  # real drawings without tags
    assert summary == dict(n=N, image=dict(kind="features", shape=[N, 40]), text_dim=items["bow"].shape[1],
                           num_labels=items["labels"].shape[1],
                           warnings=[f"{empty} items have no text word in the vocabulary (all-zero text); they are kept"])


def test_a_matrix_stored_items_as_columns_is_detected_and_transposed(tmp_path, items):
    folder = datasets.cleared_set(tmp_path / "mir", items["pixels"], items["bow"], items["labels"])
    datasets.write_mat(folder / "mirflickr25k-yall.mat", YAll=items["bow"].T)
    data = sources.load(f"mirflickr25k:{folder}")
    np.testing.assert_array_equal(data.text_bow, items["bow"])
    assert any("YAll was stored items-as-columns" in w for w in data.warnings)


def test_mirflickr_zip_becomes_the_standard_protocol(tmp_path, items):
    # 20 images carry the frequent tag "sky"; 4 only a rare one, so they leave the protocol.
    tags = [["sky", "blue"] if i < 10 else ["sky"] if i < 20 else ["rare"] for i in range(N)]
    concepts = {"clouds": [1, 2, 3, 21], "sea": list(range(4, 19))}  # image 19 and 20: no label
    path = datasets.mirflickr_zip(tmp_path / "mirflickr25k.zip", items["pixels"], tags, concepts)
    data = sources.load(f"mirflickr25k-zip:{path}")
    assert data.vocabulary == ["sky"] and data.label_names == ["clouds", "sea"]
    assert list(data.item_id) == [f"im{i}" for i in range(1, 19)]
    assert data.warnings == ["4 images have no tag used by >= 20 images and were left out (protocol)",
                             "2 items without labels were left out (DJSRH protocol)"]
    assert data.labels[:3].tolist() == [[1, 0]] * 3 and data.labels[3:].tolist() == [[0, 1]] * 15
    decoded = _pixels(data)
    assert decoded.shape == (18, 224, 224, 3)
    assert np.abs(decoded.astype(int) - items["pixels"][:18]).mean() < 8  # JPEG round trip


@pytest.mark.parametrize("csv", [False, True], ids=["jsonl", "csv"])
def test_manifest_with_png_jpeg_and_svg(tmp_path, items, openclipart_root, csv):
    svgs = sorted(openclipart_root.glob("animals/*.svg"))[:2]
    texts = [" ".join(t) for t in items["tags"]] + ["an animal", "another animal"]
    labels = [["a"] if i % 3 else ["b", "c"] for i in range(N + 2)]
    path = datasets.manifest(tmp_path / "own", items["pixels"], texts, labels, svgs, csv=csv)
    data = sources.load(f"manifest:{path}")
    assert len(data) == N + 2 and data.label_names == ["a", "b", "c"]
    assert data.labels[0].tolist() == [0, 1, 1] and data.labels[1].tolist() == [1, 0, 0]
    decoded = _pixels(data)
    np.testing.assert_array_equal(decoded[1], items["pixels"][1])  # PNG: lossless
    assert decoded[-1].std() > 0  # the SVG was rendered


def test_a_manifest_without_labels_trains_but_refuses_map(tmp_path, items):
    path = datasets.manifest(tmp_path / "own", items["pixels"], [" ".join(t) for t in items["tags"]])
    features, labels, info = prepare.prepare(f"manifest:{path}", tmp_path / "cache", CONFIG, progress=False)
    assert info["num_labels"] == 0 and labels["labels"].shape == (N, 0)
    assert features["image"].shape == (N, 1280)
    codes = {"m": {"i2t": (np.ones((2, 8)), np.ones((3, 8)))}}
    with pytest.raises(DudchError, match="no labels, so mAP cannot be computed"):
        score(codes, features, labels, 8)


def test_empty_text_and_unlabelled_rows_are_counted(tmp_path, items):
    texts = ["" if i < 3 else " ".join(t) for i, t in enumerate(items["tags"])]
    labels = [[] if i in (5, 6) else ["x"] for i in range(N)]
    path = datasets.manifest(tmp_path / "own", items["pixels"], texts, labels)
    summary = json.loads(dudch("data", "inspect", f"manifest:{path}", "--min-word-count", "1").stdout)
    assert summary["n"] == N - 2 and summary["num_labels"] == 1
    assert summary["image"] == dict(kind="pixels", shape=[N - 2, 224, 224, 3])
    assert summary["warnings"] == ["2 items without labels were left out (DJSRH protocol)",
                                   "3 items have no text word in the vocabulary (all-zero text); they are kept"]


def test_sentence_embeddings_as_text_features(tmp_path, items):
    path = datasets.manifest(tmp_path / "own", items["pixels"][:12], ["a red car", "a cat"] * 6)
    config = PrepareConfig(text_features="minilm", image_size=224)
    features, _, info = prepare.prepare(f"manifest:{path}", tmp_path / "cache", config, progress=False)
    assert features["text"].shape == (12, 384) and info["text_dim"] == 384
    np.testing.assert_allclose(np.linalg.norm(features["text"], axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(features["text"][0], features["text"][2], atol=1e-6)
    assert features["text"][0] @ features["text"][1] < 0.9


# ---- bad input: one line naming the problem and the fix, exit status 2 ---------------------

def _one_line_error(source, *match, extra=()):
    done = dudch("data", "inspect", source, *extra)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    for text in match:
        assert text in done.stderr, done.stderr
    return done.stderr


def test_missing_file_key_and_folder(tmp_path, items):
    folder = datasets.cleared_set(tmp_path / "mir", items["pixels"], items["bow"], items["labels"])
    (folder / "mirflickr25k-lall.mat").unlink()
    _one_line_error(f"mirflickr25k:{folder}", "no LAll (in mirflickr25k-lall.mat)")
    datasets.write_mat(folder / "mirflickr25k-lall.mat", Labels=items["labels"])
    _one_line_error(f"mirflickr25k:{folder}", "no LAll")
    _one_line_error(f"nuswide:{tmp_path / 'absent'}", "is not a folder")
    _one_line_error(f"manifest:{tmp_path / 'absent.jsonl'}", "not found")
    _one_line_error("flickr:x", "unknown dataset")


def test_truncated_hdf5_file(tmp_path, items):
    folder = datasets.cleared_set(tmp_path / "mir", items["pixels"], items["bow"], items["labels"], hdf5=True)
    image = folder / "mirflickr25k-iall.mat"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    _one_line_error(f"mirflickr25k:{folder}", "mirflickr25k-iall.mat", "truncated", "download it again")


def test_mismatched_row_counts(tmp_path, items):
    folder = datasets.cleared_set(tmp_path / "mir", items["pixels"], items["bow"][:-3], items["labels"])
    _one_line_error(f"mirflickr25k:{folder}", "mismatched row counts", f"YAll {N - 3}x")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_infinite_features(tmp_path, items, bad):
    features = np.ones((N, 8), dtype=np.float32)
    features[4, 2] = bad
    folder = datasets.cleared_set(tmp_path / "mir", None, items["bow"], items["labels"], features=features)
    _one_line_error(f"mirflickr25k:{folder}", "XAll", "NaN or infinite")
    bow = items["bow"].copy()
    bow[0, 0] = bad
    folder = datasets.cleared_set(tmp_path / "mir2", items["pixels"], bow, items["labels"])
    _one_line_error(f"mirflickr25k:{folder}", "YAll", "NaN or infinite")


def test_bad_manifests(tmp_path, items):
    own = tmp_path / "own"
    path = datasets.manifest(own, items["pixels"][:4], ["a b"] * 4, [["x"]] * 4)
    good = path.read_text()
    path.write_text("\n\n")
    _one_line_error(f"manifest:{path}", "is empty", '"image"')
    path.write_text(good + "{not json\n")
    _one_line_error(f"manifest:{path}", "pairs.jsonl:5 is not valid JSON")
    path.write_text(good + json.dumps(dict(image="../../etc/passwd.png", text="x")) + "\n")
    _one_line_error(f"manifest:{path}", "outside the manifest's folder")
    path.write_text(good + json.dumps(dict(image="images/gone.png", text="x")) + "\n")
    _one_line_error(f"manifest:{path}", "images/gone.png not found")
    path.write_text(good + json.dumps(dict(text="x")) + "\n")
    _one_line_error(f"manifest:{path}", "pairs.jsonl:5", 'no "image"')


def test_undecodable_images_are_skipped_and_listed_or_fail_by_policy(tmp_path, items):
    path = datasets.manifest(tmp_path / "own", items["pixels"][:12], ["a b"] * 12)
    (tmp_path / "own" / "images" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    features, _, info = prepare.prepare(f"manifest:{path}", tmp_path / "cache", CONFIG, progress=False)
    assert len(features["item_id"]) == 11 and "3" not in features["item_id"].tolist()
    assert info["bad_images"] == ["images/3.png"]
    assert any(w.startswith("1 images could not be decoded and were left out (on_bad_image=skip") and
               w.endswith(": images/3.png") for w in info["warnings"])
    fail = replace(CONFIG, on_bad_image="fail")
    with pytest.raises(DudchError, match=r"cannot decode image images/3.png .*on_bad_image=skip"):
        prepare.prepare(f"manifest:{path}", tmp_path / "cache", fail, progress=False)
    with pytest.raises(DudchError, match=r"cannot decode image images/3.png .*on_bad_image=skip"):
        prepare.prepare(f"manifest:{path}", tmp_path / "fresh", fail, progress=False)
    assert not list((tmp_path / "fresh").glob("image-features-*"))  # nothing half-written
    for name in ("5.png", "7.png"):
        (tmp_path / "own" / "images" / name).write_bytes(b"not an image")
    with pytest.raises(DudchError, match=r"3 of 12 images cannot be decoded .*max_bad_image_fraction=0.1"):
        prepare.prepare(f"manifest:{path}", tmp_path / "cache", CONFIG, progress=False)


def test_a_cache_entry_that_does_not_match_its_seal_is_discarded_and_recomputed(tmp_path, items):
    path = datasets.manifest(tmp_path / "own", items["pixels"][:12], ["a b"] * 12)
    first, _, info = prepare.prepare(f"manifest:{path}", tmp_path / "cache", CONFIG, progress=False)
    (entry,) = (tmp_path / "cache").glob("image-features-*.npz")
    with np.load(entry) as saved:
        reversed_rows = {k: saved[k][::-1] for k in saved.files}
    damages = {"truncated": lambda: entry.write_bytes(entry.read_bytes()[:200]),
               "rows reversed": lambda: np.savez_compressed(entry, **reversed_rows)}
    for damage in damages.values():
        damage()
        again, _, info = prepare.prepare(f"manifest:{path}", tmp_path / "cache", CONFIG, progress=False)
        (warning,) = [w for w in info["warnings"] if "feature cache entry" in w]
        assert warning == f"feature cache entry {entry} is corrupt (its content does not match its checksum): discarded and computed again"
        np.testing.assert_array_equal(again["image"], first["image"])
    seal = entry.with_name(entry.name + ".seal.json")
    seal.write_text(seal.read_text().replace('"items": "', '"items": "0'))
    _, _, info = prepare.prepare(f"manifest:{path}", tmp_path / "cache", CONFIG, progress=False)
    assert any(w.endswith("was made for other items: discarded and computed again") for w in info["warnings"])


def test_corrupt_zip(tmp_path):
    path = tmp_path / "mirflickr25k.zip"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    _one_line_error(f"mirflickr25k-zip:{path}", "not a readable zip", "download it again")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mirflickr/README.txt", "no images")
    _one_line_error(f"mirflickr25k-zip:{path}", "has no im*.jpg images")


def test_a_label_less_pipeline_run_trains_and_says_there_is_no_map(tmp_path, items):
    path = datasets.manifest(tmp_path / "own", items["pixels"], [" ".join(t) for t in items["tags"]])
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = dudch("run", "--dataset", f"manifest:{path}", "--bits", "16", "--param", "teacher_epochs=1",
                 "--param", "student_outer_iterations=1", "--param", "min_word_count=1",
                 env={"MLFLOW_TRACKING_URI": store})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "No mAP: the dataset has no labels" in done.stdout
    assert "is not tracked by DVC" in done.stderr  # and the run says its data is unpinned
    import mlflow

    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["dudch"], output_format="list")
    by_stage = {r.data.tags.get("dudch.stage", "pipeline"): r for r in runs}
    assert by_stage["pipeline"].data.params["data_version"] == "untracked"
    assert by_stage["evaluate"].data.tags["dudch.evaluation"] == "skipped: the dataset has no labels"
    assert len(mlflow.MlflowClient().get_metric_history(by_stage["student"].info.run_id, "objective")) == 1
