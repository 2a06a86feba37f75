import numpy as np
import pytest

from dudch import evaluate
from dudch.baselines import CCAITQ, itq_rotation
from dudch.nets import sign
from dudch.similarity import SimilarityGraph, embedding, joint_embedding
from dudch.student import StudentConfig, fit
from dudch.teacher import TeacherConfig
from dudch.teacher import fit as fit_teacher


def paired_data(n=300, seed=0):
    """Two views of 4 latent clusters: image features and sparse tag vectors."""
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, 4, n)
    image = rng.standard_normal((4, 40))[cluster] + 0.5 * rng.standard_normal((n, 40))
    text = (rng.random((4, 30)) < 0.3)[cluster] & (rng.random((n, 30)) < 0.8)
    labels = np.eye(4, dtype=np.uint8)[cluster]
    return image.astype(np.float32), text.astype(np.float32), labels


def test_itq_rotation_is_orthogonal_and_lowers_quantisation_loss():
    values = np.random.default_rng(0).standard_normal((500, 8))
    rotation = itq_rotation(values - values.mean(0))
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(8), atol=1e-10)
    loss = lambda r: ((sign(values @ r) - values @ r) ** 2).sum()
    assert loss(rotation) < loss(np.eye(8))


def test_cca_itq_codes_are_binary_and_retrieve_across_modalities():
    image, text, labels = paired_data()
    model = CCAITQ(bits=8, pca_dim=16).fit(image[:200], text[:200])
    q, b = model.encode_image(image[200:]), model.encode_text(text[:200])
    assert q.dtype == np.int8 and np.isin(q, (-1, 1)).all() and b.shape == (200, 8)
    from dudch.metrics import mean_average_precision

    assert mean_average_precision(q, b, labels[200:], labels[:200]) > 0.6  # chance: about 0.25


def test_raw_source_is_the_mean_of_within_modality_cosines():
    image, text, _ = paired_data(50)
    z, codes = embedding("raw", image, text)
    assert codes is None  # no teacher, nothing to start a student from
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = (unit(image) @ unit(image).T + unit(text) @ unit(text).T) / 2
    np.testing.assert_allclose(z @ z.T, expected, atol=1e-5)


@pytest.mark.parametrize("source", ["hash", "deep", "both"])
def test_teacher_sources_give_a_symmetric_graph(source):
    image, text, _ = paired_data(80)
    teacher = fit_teacher(image, text, TeacherConfig(bits=8, epochs=2, text_hidden=16))
    z, codes = embedding(source, image, text, teacher)
    s = SimilarityGraph(z, "quantile", 0.2).rows(np.arange(80))
    np.testing.assert_array_equal(s, s.T)
    from dudch.nets import hash_outputs

    joint = joint_embedding(*hash_outputs(teacher, image, text))
    np.testing.assert_array_equal(codes, sign(joint))  # the teacher's joint codes, whatever the source
    if source == "hash":
        np.testing.assert_allclose(z, joint)


def test_relaxed_student_binarises_its_own_outputs_and_retrieves():
    image, text, labels = paired_data(300)
    graph = SimilarityGraph(embedding("raw", image, text)[0], "graded", 20)
    config = StudentConfig(bits=8, outer_iterations=6, inner_epochs=2, omega_size=150, batch_size=32,
                           image_hidden=16, text_hidden=16, discrete=False, init="zeros", lr_step=0,
                           optimizer="adam")
    nets, codes = fit(image, text, np.arange(200), graph, config)
    from dudch.metrics import mean_average_precision
    from dudch.nets import hash_outputs

    u, v = (np.tanh(h) for h in hash_outputs(nets, image, text))
    np.testing.assert_array_equal(codes, np.where(u + v >= 0, 1, -1))
    assert mean_average_precision(sign(u[200:]), codes[:200], labels[200:], labels[:200]) > 0.5  # chance: about 0.25


def test_validation_split_never_retrieves_the_query_itself():
    features = dict(query=np.array([0, 1]), database=np.arange(2, 12), validation=np.array([3, 7]))
    query, database, mask = evaluate.split_rows(features, "validation")
    np.testing.assert_array_equal(query, [3, 7])
    assert not set(query) & set(database) and mask.sum() == 8
    query, database, mask = evaluate.split_rows(features, "query")
    np.testing.assert_array_equal(database, np.arange(2, 12))
