"""A preempted training task resumes from its checkpoint and ends exactly where an
uninterrupted run with the same seed ends."""

import numpy as np
import pytest

from dudch.nets import hash_outputs
from dudch.similarity import SimilarityGraph, embedding
from dudch.student import StudentConfig
from dudch.student import fit as fit_student
from dudch.teacher import TeacherConfig
from dudch.teacher import fit as fit_teacher


class Preempted(Exception):
    pass


def preempt_after(step):
    def callback(current, *_):
        if current == step:
            raise Preempted

    return callback


def paired(n=96, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 12)).astype(np.float32), (rng.random((n, 20)) < 0.2).astype(np.float32)


def test_teacher_resumes_to_the_same_model(tmp_path):
    image, text = paired()
    config = TeacherConfig(bits=8, epochs=6, text_hidden=32)
    uninterrupted = hash_outputs(fit_teacher(image, text, config), image, text)
    checkpoint = tmp_path / "teacher.ckpt"
    with pytest.raises(Preempted):
        fit_teacher(image, text, config, on_epoch=preempt_after(2), checkpoint=checkpoint)
    epochs_run = []
    resumed = fit_teacher(image, text, config, checkpoint=checkpoint, on_epoch=lambda e, *_: epochs_run.append(e))
    assert epochs_run == [3, 4, 5]
    for a, b in zip(uninterrupted, hash_outputs(resumed, image, text)):
        np.testing.assert_array_equal(a, b)


def test_student_resumes_to_the_same_codes(tmp_path):
    image, text = paired(120)
    graph = SimilarityGraph(embedding("raw", image, text)[0], "quantile", 0.2)
    config = StudentConfig(bits=8, outer_iterations=5, inner_epochs=1, omega_size=60, lr_step=2,
                           batch_size=16, image_hidden=16, text_hidden=16, init="zeros")
    _, uninterrupted = fit_student(image, text, np.arange(80), graph, config)
    checkpoint = tmp_path / "student.ckpt"
    with pytest.raises(Preempted):
        fit_student(image, text, np.arange(80), graph, config, on_iteration=preempt_after(1), checkpoint=checkpoint)
    iterations = []
    _, resumed = fit_student(image, text, np.arange(80), graph, config, checkpoint=checkpoint,
                             on_iteration=lambda i, *_: iterations.append(i))
    assert iterations == [2, 3, 4]
    np.testing.assert_array_equal(resumed, uninterrupted)
