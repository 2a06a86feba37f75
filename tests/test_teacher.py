import numpy as np
import pytest
import torch

from dudch import DudchError, nets
from dudch.teacher import TeacherConfig, fit, semantic_affinity


def test_affinity_follows_djsrh():
    rng = np.random.default_rng(0)
    image, text = rng.standard_normal((6, 5)), rng.random((6, 4))
    beta, eta, mu = 0.9, 0.4, 1.5
    f_i = image / np.linalg.norm(image, axis=1, keepdims=True)
    f_t = text / np.linalg.norm(text, axis=1, keepdims=True)
    mixed = beta * (2 * f_i @ f_i.T - 1) + (1 - beta) * (2 * f_t @ f_t.T - 1)
    expected = mu * ((1 - eta) * mixed + eta * mixed @ mixed.T / 6)
    got = semantic_affinity(torch.tensor(image), torch.tensor(text), beta, eta, mu).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_fit_lowers_the_loss_and_is_deterministic(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.standard_normal((96, 10)).astype(np.float32)
    text = (rng.random((96, 20)) < 0.2).astype(np.float32)
    config = TeacherConfig(bits=8, epochs=15, text_hidden=32)
    losses = []
    trained = fit(image, text, config, on_epoch=lambda e, loss, s: losses.append(loss))
    assert losses[-1] < losses[0]
    again = fit(image, text, config)
    h1, h2 = nets.hash_outputs(trained, image, text), nets.hash_outputs(again, image, text)
    np.testing.assert_array_equal(h1[0], h2[0])
    nets.save(tmp_path / "model.pt", trained, config)
    loaded, saved_config = nets.load(tmp_path / "model.pt")
    np.testing.assert_array_equal(nets.hash_outputs(loaded, image, text)[1], h1[1])
    assert saved_config["bits"] == 8


def test_the_fused_optimiser_trains_the_same_weights_as_plain_sgd(monkeypatch):
    """fit's fused SGD is a speed-up only: the weights equal those of torch's per-operation SGD
    bit for bit, so results and caches made before it still hold."""
    rng = np.random.default_rng(2)
    image = rng.standard_normal((96, 10)).astype(np.float32)
    text = (rng.random((96, 20)) < 0.2).astype(np.float32)
    config = TeacherConfig(bits=8, epochs=5, text_hidden=32)
    fused = fit(image, text, config)
    plain_sgd = torch.optim.SGD
    monkeypatch.setattr(torch.optim, "SGD", lambda *args, fused, **kwargs: plain_sgd(*args, **kwargs))
    plain = fit(image, text, config)
    for a, b in zip(fused.parameters(), plain.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("image,text,message", [
    (np.zeros((5, 3)), np.zeros((4, 3)), "5 image rows but 4 text rows"),
    (np.zeros(5), np.zeros((5, 3)), "must be 2-D"),
    (np.full((5, 3), np.nan), np.zeros((5, 3)), "NaN"),
])
def test_bad_features_give_one_clear_line(image, text, message):
    with pytest.raises(DudchError, match=message) as error:
        fit(image, text, TeacherConfig(epochs=1))
    assert "\n" not in str(error.value)
