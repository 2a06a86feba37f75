"""Labels are for evaluation only. Two real OpenClipart trees that differ only in which category
folder each drawing sits in (its labels) must give identical training inputs and identical
trained codes (the student's and UCCH's); and in the pipeline only the evaluate task may consume the labels artifact."""

import shutil

import numpy as np
import yaml

from dudch import nets, openclipart, prepare, ucch
from dudch.similarity import SimilarityGraph, embedding
from dudch.student import StudentConfig
from dudch.student import fit as fit_student
from dudch.teacher import TeacherConfig
from dudch.teacher import fit as fit_teacher
from tests.helpers import ROOT

# Every folder a label, so that moving drawings between folders changes their labels but not
# which drawings are labelled (unlabelled drawings leave the protocol, as in DJSRH).
CONFIG = prepare.PrepareConfig(min_label_size=1, min_word_count=2)


def relabelled_trees(source, destination, count=160, seed=0):
    """Copy `count` real drawings twice: as they are, and with the category folders dealt out
    again by a permutation (same folders, same sizes, other drawings in them)."""
    drawings = [d for d in openclipart.scan(source)][:count]  # by content hash: a fixed subset
    folders = [d.path.rsplit("/", 1)[0] for d in drawings]
    shuffled = [folders[i] for i in np.random.default_rng(seed).permutation(count)]
    trees = []
    for name, assignment in (("original", folders), ("relabelled", shuffled)):
        for drawing, folder in zip(drawings, assignment):
            target = destination / name / folder / f"{drawing.sha1}.svg"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / drawing.path, target)
        trees.append(destination / name)
    return trees


def train_codes(features):
    database, train = features["database"], features["train"]
    teacher = fit_teacher(features["image"][train], features["text"][train],
                          TeacherConfig(bits=16, epochs=3, text_hidden=64))
    z, teacher_codes = embedding("hash", features["image"][database], features["text"][database], teacher)
    graph = SimilarityGraph(z, "graded", 10, teacher_codes=teacher_codes)
    student, codes = fit_student(features["image"][database], features["text"][database],
                                 np.searchsorted(database, train), graph,
                                 StudentConfig(bits=16, outer_iterations=2, inner_epochs=1,
                                               image_hidden=32, text_hidden=64))
    peer = ucch.fit(features["image"][train], features["text"][train],
                    ucch.UCCHConfig(bits=16, epochs=3, batch_size=32, negatives=64, hidden=64))
    return codes, nets.hash_outputs(peer, features["image"], features["text"])


def test_permuting_labels_changes_nothing_that_training_sees(openclipart_root, tmp_path):
    original, relabelled = relabelled_trees(openclipart_root, tmp_path)
    cache = tmp_path / "cache"
    features_a, labels_a, _ = prepare.prepare(f"openclipart:{original}", cache, CONFIG, progress=False)
    features_b, labels_b, _ = prepare.prepare(f"openclipart:{relabelled}", cache, CONFIG, progress=False)

    assert not np.array_equal(labels_a["labels"], labels_b["labels"]), "the permutation must move labels"
    assert sorted(features_a) == sorted(features_b)
    assert not {"labels", "label_names", "path"} & set(features_a)
    for key in features_a:
        np.testing.assert_array_equal(features_a[key], features_b[key], err_msg=key)
    (codes_a, ucch_a), (codes_b, ucch_b) = train_codes(features_a), train_codes(features_b)
    np.testing.assert_array_equal(codes_a, codes_b)  # the student's, from DJSRH
    np.testing.assert_array_equal(ucch_a[0], ucch_b[0])  # UCCH's
    np.testing.assert_array_equal(ucch_a[1], ucch_b[1])


def test_only_the_evaluate_task_consumes_labels():
    spec = next(yaml.safe_load_all((ROOT / "pipeline.yaml").read_text()))
    consumers = set()

    def walk(node):
        if isinstance(node, dict):
            for task_name, task in node.get("tasks", {}).items():
                artifacts = task.get("inputs", {}).get("artifacts", {})
                for argument in artifacts.values():
                    source = argument.get("taskOutputArtifact", {})
                    passed_in = argument.get("componentInputArtifact", "").endswith("-labels")
                    is_loop = task["componentRef"]["name"].startswith("comp-for-loop")
                    if (source.get("outputArtifactKey") == "labels" or passed_in) and not is_loop:
                        consumers.add(task_name)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    assert consumers == {"evaluate"}
    prepare_outputs = spec["components"]["comp-prepare-data"]["outputDefinitions"]["artifacts"]
    # record: what `log_stage` logs to MLflow (counts, encoders, the items' ids and texts; no labels)
    assert set(prepare_outputs) == {"features", "labels", "record"}
