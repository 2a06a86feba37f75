"""UCCH's pieces on tiny data: the two losses against values worked out by hand, their
gradients against finite differences, the memory bank's momentum update, and a fit that
learns, is deterministic and resumes exactly."""

import numpy as np
import pytest
import torch

from dudch import DudchError, nets, ucch


def unit(rows):
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_ranking_loss_matches_the_paper_worked_by_hand():
    u_i, u_t = unit([[1, 0], [0.6, 0.8], [0, 1]]), unit([[0.8, 0.6], [1, 0], [-1, 1]])
    margin, shift = 0.2, 0.1
    s = u_i @ u_t.T
    expected = 0.0
    for along_rows in (True, False):
        terms = []
        for q in range(3):
            pairs = s[q] if along_rows else s[:, q]
            # pairs below the matching score minus the margin are shifted down
            costs = [p if p >= s[q, q] - margin else p - shift for p in pairs]
            terms.append(-s[q, q] + np.log(np.sum(np.exp(costs))) + margin)
        expected += np.mean(terms)
    got = ucch.ranking_loss(torch.tensor(u_i), torch.tensor(u_t), margin, shift).item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_contrastive_loss_is_cross_entropy_against_binary_candidates():
    u_i, u_t = unit([[1, 2, 0, 1], [0, 1, 1, -1]]), unit([[1, 1, 1, 1], [-1, 1, 0, 0.5]])
    candidates = np.array([[[1, 1, -1, 1], [-1, 1, 1, 1], [1, -1, -1, -1]],
                           [[1, 1, 1, -1], [1, -1, 1, 1], [-1, -1, 1, 1]]], dtype=np.float64)
    temperature = 0.9
    expected = 0.0
    for u in (u_i, u_t):
        for item in range(2):
            logits = candidates[item] @ u[item] / (temperature * 2.0)  # T sqrt(k), k = 4
            expected += -np.log(np.exp(logits[0]) / np.exp(logits).sum()) / 2
    got = ucch.contrastive_loss(torch.tensor(u_i), torch.tensor(u_t), torch.tensor(candidates), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_the_losses_have_the_gradients_of_their_values():
    rng = np.random.default_rng(3)
    h_i = torch.tensor(rng.standard_normal((5, 6)), requires_grad=True)
    h_t = torch.tensor(rng.standard_normal((5, 6)), requires_grad=True)
    candidates = torch.tensor(np.sign(rng.standard_normal((5, 4, 6))))

    def loss(a, b):
        u_a, u_b = ucch.unit_codes(a), ucch.unit_codes(b)
        return 0.7 * ucch.contrastive_loss(u_a, u_b, candidates, 0.9) + 0.3 * ucch.ranking_loss(u_a, u_b, 0.2, 0.1)

    assert torch.autograd.gradcheck(loss, (h_i, h_t))


def test_the_bank_moves_towards_the_batch_by_its_momentum():
    bank = ucch.MemoryBank(4, 2, torch.Generator().manual_seed(0))
    assert torch.allclose(bank.memory.norm(dim=1), torch.ones(4))
    np.testing.assert_allclose(bank.memory.abs().numpy(), 2 ** -0.5, rtol=1e-6)
    before = bank.memory.clone()
    u_i, u_t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    bank.update(torch.tensor([2]), u_i, u_t, momentum=0.4)
    mean = np.array([1, 1]) / np.sqrt(2)
    expected = 0.4 * before[2].numpy() + 0.6 * mean
    np.testing.assert_allclose(bank.memory[2].numpy(), expected / np.linalg.norm(expected), rtol=1e-6)
    untouched = [0, 1, 3]
    assert torch.equal(bank.memory[untouched], before[untouched])
    bank.update(torch.tensor([0]), u_i, u_t, momentum=0.0)  # the warm-up overwrites
    np.testing.assert_allclose(bank.memory[0].numpy(), mean, rtol=1e-6)
    picked = bank.candidates(torch.tensor([2, 0]), torch.tensor([[1, 1], [3, 2]]))
    assert picked.shape == (2, 3, 2)
    assert torch.equal(picked[0, 0], torch.sign(bank.memory[2])) and torch.equal(picked[1, 2], torch.sign(bank.memory[2]))


def test_warm_up_candidates_are_the_item_then_the_rest_of_its_batch():
    u = torch.tensor([[1.0, -1.0], [-1.0, -1.0], [1.0, 1.0]])
    candidates = ucch.in_batch_candidates(u, u)
    assert candidates.shape == (3, 3, 2)
    assert candidates[1].tolist() == [[-1, -1], [1, -1], [1, 1]]
    assert not candidates.requires_grad


def data(n=80, seed=1):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 4, n)
    image = (np.eye(4)[groups] @ rng.standard_normal((4, 12)) + 0.3 * rng.standard_normal((n, 12))).astype(np.float32)
    text = ((np.eye(4)[groups] @ rng.random((4, 20)) + 0.2 * rng.random((n, 20))) > 0.6).astype(np.float32)
    return image, text, groups


CONFIG = ucch.UCCHConfig(bits=8, epochs=6, batch_size=16, negatives=32, hidden=32, lr=3e-3)


def test_fit_learns_is_deterministic_and_resumes_exactly(tmp_path):
    image, text, groups = data()
    losses = []
    trained = ucch.fit(image, text, CONFIG, on_epoch=lambda e, loss, s: losses.append(loss))
    assert len(losses) == CONFIG.epochs and losses[-1] < losses[1]  # epoch 0 is the warm-up
    assert [type(layer).__name__ for layer in trained.image] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [type(layer).__name__ for layer in trained.text] == ["Linear", "ReLU", "Linear"]
    h_i, h_t = nets.hash_outputs(trained, image, text)
    # the codes of an item's two modalities agree more than those of unrelated items
    agreement = (np.sign(h_i) == np.sign(h_t)).mean(axis=1)
    unrelated = (np.sign(h_i) == np.sign(h_t[::-1])).mean(axis=1)[groups != groups[::-1]]
    assert agreement.mean() > unrelated.mean() + 0.1

    checkpoint = tmp_path / "ucch.ckpt"
    from dataclasses import replace
    ucch.fit(image, text, replace(CONFIG, epochs=3), checkpoint=checkpoint)
    resumed = ucch.fit(image, text, CONFIG, checkpoint=checkpoint)
    for a, b in zip(nets.hash_outputs(resumed, image, text), (h_i, h_t)):
        np.testing.assert_array_equal(a, b)

    nets.save(tmp_path / "ucch.pt", trained, CONFIG)
    loaded, saved = nets.load(tmp_path / "ucch.pt")
    np.testing.assert_array_equal(nets.hash_outputs(loaded, image, text)[0], h_i)
    assert saved["hidden"] == 32


@pytest.mark.parametrize("image,text,config,message", [
    (np.zeros((5, 3)), np.zeros((4, 3)), CONFIG, "5 image rows but 4 text rows"),
    (np.full((5, 3), np.inf), np.zeros((5, 3)), CONFIG, "NaN or infinite"),
    (np.zeros((1, 3)), np.zeros((1, 3)), CONFIG, "at least 2 training pairs"),
    (np.zeros((5, 3)), np.zeros((5, 3)), ucch.UCCHConfig(text_layers=0), "at least one linear layer"),
])
def test_bad_input_gives_one_clear_line(image, text, config, message):
    with pytest.raises(DudchError, match=message) as error:
        ucch.fit(image, text, config)
    assert "\n" not in str(error.value)
