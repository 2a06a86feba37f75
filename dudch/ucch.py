"""UCCH (Hu, Zhu, Lin, Peng, Zhao, Peng, "Unsupervised Contrastive Cross-modal Hashing", IEEE
TPAMI 45(3), 2023), the strongest unsupervised peer: a baseline, and a teacher option.

Per modality an MLP ending in a hash layer; its output is tanh then L2-normalised,
h_I = tanh(f_I(x)) / |.|, h_T = tanh(f_T(y)) / |.|, and the codes are sign(f(.)).
Per mini-batch of m pairs (indices y), two losses, weighted alpha and 1 - alpha:

- contrastive hashing (L_c): a memory bank M (n x k, one row per training item) holds each
  item's running code. Item i is contrasted against the binary codes sign(M) of itself (the
  positive) and of K items drawn uniformly with replacement (the negatives):
      L_c = CE(softmax(sign(M[y_i, cands]) h_I,i / (T sqrt(k))), 0) + the same for h_T,
  so the networks learn against exact binary codes, with no relaxation; the bank, not the
  gradient, carries the sign function (the paper's "momentum optimizer"): after each step
      M[y] <- normalise(m M[y] + (1 - m) normalise((h_I + h_T) / 2)).
  During the warm-up epoch the candidates are the batch's own sign((h_I + h_T) / 2), detached,
  and the bank rows are overwritten (momentum 0), as in the public code.
- cross-modal ranking (L_r, "CRL"): on the m x m scores s_ij = h_I,i . h_T,j, every pair less
  similar than the matching pair's score minus `margin` is shifted down by `shift`, then a
  softmax ranking loss per row (image queries) and per column (text queries):
      L_r = mean_i(-s_ii + logsumexp_j c_ij + margin) + mean_j(-s_jj + logsumexp_i c'_ij + margin).

Settings are the paper's feature-mode ones (its README, 128 bits on MIRFLICKR-25K): alpha 0.7,
3 / 2 linear layers, margin 0.2, shift 0.1, 20 epochs, batch 256 (the last, partial batch of an
epoch dropped), Adam lr 1e-4 with weight decay 1e-6, gradient norm clipped at 1, K 4096, bank
momentum 0.4, one warm-up epoch; but hidden widths 2048 and T 0.3 instead of 8192 and 0.9,
chosen on OpenClipart's validation split as our own method's settings are
(benchmarks/results/tuning-ucch-openclipart.md, 64 bits: the paper's settings score 3 (I->T)
and 6 (T->I) mAP@50 points lower there, 1 point lower on T->I mAP@all, level on I->T mAP@all; the
training set is 2,861 pairs, not MIRFLICKR's 5,000+). Departures from the public
code: the last epoch's networks are kept (the code keeps the epoch with the best label-based
test mAP: labels never reach training here); the bank starts from unbiased random signs (the
code's initialisation is slightly biased towards -1); ReLU layers carry no dropout or
normalisation, as in the code. The networks are `dudch.nets.HashNets`, so UCCH's outputs feed
the similarity stage and the evaluation exactly as DJSRH's do.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from dudch import DudchError
from dudch.nets import HashNets, check_pairs, default_device, resume, save_checkpoint


@dataclass(frozen=True)
class UCCHConfig:
    bits: int = 64
    epochs: int = 20
    batch_size: int = 256
    alpha: float = 0.7  # weight of the contrastive loss; 1 - alpha weighs the ranking loss
    margin: float = 0.2
    shift: float = 0.1
    temperature: float = 0.3  # the paper's 0.9 and its 8192-wide layers lost on the validation split
    negatives: int = 4096  # K, drawn from the memory bank per item
    bank_momentum: float = 0.4
    warmup_epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-6
    clip_norm: float = 1.0
    hidden: int = 2048
    image_layers: int = 3  # linear layers per branch, hash layer included
    text_layers: int = 2
    seed: int = 0


def networks(image_dim, text_dim, config):
    """UCCH's two MLPs as HashNets: `image_layers` / `text_layers` linear layers each."""
    if config.image_layers < 1 or config.text_layers < 1:
        raise DudchError("UCCH needs at least one linear layer per branch (ucch_image_layers, ucch_text_layers >= 1)")
    return HashNets(image_dim, text_dim, config.bits, text_hidden=[config.hidden] * (config.text_layers - 1),
                    image_hidden=[config.hidden] * (config.image_layers - 1))


def unit_codes(h):
    """UCCH's continuous codes: tanh of the hash layer, rows L2-normalised. (m, k) -> (m, k)."""
    return F.normalize(torch.tanh(h), dim=1)


def ranking_loss(u_image, u_text, margin, shift):
    """Cross-modal ranking loss L_r on unit codes u_image, u_text (m, k), paired row by row."""
    scores = u_image @ u_text.T
    matching = scores.diag()
    by_row = torch.where(scores >= matching[:, None] - margin, scores, scores - shift)
    by_column = torch.where(scores >= matching[None, :] - margin, scores, scores - shift)
    return ((-matching + torch.logsumexp(by_row, dim=1) + margin).mean()
            + (-matching + torch.logsumexp(by_column, dim=0) + margin).mean())


def contrastive_loss(u_image, u_text, candidates, temperature):
    """L_c: each item's unit codes (m, k) against its candidate binary codes (m, 1 + K, k),
    the positive first; softmax cross-entropy with temperature T sqrt(k)."""
    scale = temperature * np.sqrt(u_image.shape[1])
    target = torch.zeros(len(u_image), dtype=torch.long, device=u_image.device)
    logits = lambda u: torch.bmm(candidates, u[:, :, None])[:, :, 0] / scale
    return F.cross_entropy(logits(u_image), target) + F.cross_entropy(logits(u_text), target)


class MemoryBank:
    """Running codes of the n training items, float32 (n, k), rows of unit norm."""

    def __init__(self, n, bits, generator, device="cpu"):
        signs = torch.randint(0, 2, (n, bits), generator=generator).float() * 2 - 1
        self.memory = F.normalize(signs, dim=1).to(device)

    def candidates(self, rows, others):
        """sign of the bank for each row (m,) followed by its `others` (m, K): (m, 1 + K, k)."""
        return torch.sign(self.memory[torch.cat([rows[:, None], others], dim=1)])

    @torch.no_grad()
    def update(self, rows, u_image, u_text, momentum):
        """M[rows] <- normalise(momentum M[rows] + (1 - momentum) normalise((u_I + u_T) / 2))."""
        mean = F.normalize((u_image + u_text) / 2, dim=1)
        self.memory[rows] = F.normalize(momentum * self.memory[rows] + (1 - momentum) * mean, dim=1)


def in_batch_candidates(u_image, u_text):
    """Warm-up candidates (m, m, k): for item i, sign((u_I + u_T) / 2) of i, then of the other
    batch items in order; detached (no gradient flows through a sign)."""
    codes = torch.sign((u_image + u_text).detach() / 2)
    m = len(codes)
    order = torch.arange(m, device=codes.device)
    others = order[None, :].expand(m, m)[~torch.eye(m, dtype=torch.bool, device=codes.device)].view(m, m - 1)
    return codes[torch.cat([order[:, None], others], dim=1)]


def fit(image, text, config=UCCHConfig(), on_epoch=None, device=None, checkpoint=None):
    """Train UCCH on paired features.

    image: float32 (n, d_image), text: float32 (n, d_text), paired row by row. Labels are not
    an input. on_epoch(epoch, mean_loss, seconds) after each epoch. checkpoint: a file path;
    the state (networks, optimiser, generators, memory bank) is saved there after every epoch
    and training resumes from it when it exists, ending exactly as an uninterrupted run.
    Returns the trained HashNets (eval mode, on the CPU).
    """
    image, text = check_pairs(image, text)
    n = len(image)
    if n < 2:
        raise DudchError(f"UCCH needs at least 2 training pairs, got {n}; use a larger dataset")
    batch_size = min(config.batch_size, n)
    device = torch.device(device or default_device())
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    nets = networks(image.shape[1], text.shape[1], config).to(device)
    optimiser = torch.optim.Adam(nets.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    bank = MemoryBank(n, config.bits, torch.Generator().manual_seed(config.seed), device)
    first_epoch, saved = resume(checkpoint, nets, optimiser, rng)
    if "memory" in saved:
        bank.memory = torch.from_numpy(saved["memory"]).to(device)
    x_i, x_t = torch.from_numpy(image).to(device), torch.from_numpy(text).to(device)
    nets.train()
    for epoch in range(first_epoch, config.epochs):
        started, total = time.perf_counter(), 0.0
        warmup = epoch < config.warmup_epochs
        order = rng.permutation(n)
        batches = [order[s:s + batch_size] for s in range(0, n - batch_size + 1, batch_size)]
        for batch in batches:
            rows = torch.from_numpy(batch).to(device)
            h_i, h_t = nets(x_i[rows], x_t[rows])
            u_i, u_t = unit_codes(h_i), unit_codes(h_t)
            if warmup:
                candidates = in_batch_candidates(u_i, u_t)
            else:
                others = torch.from_numpy(rng.integers(0, n, (len(batch), config.negatives))).to(device)
                candidates = bank.candidates(rows, others)
            loss = (config.alpha * contrastive_loss(u_i, u_t, candidates, config.temperature)
                    + (1 - config.alpha) * ranking_loss(u_i, u_t, config.margin, config.shift))
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(nets.parameters(), config.clip_norm)
            optimiser.step()
            bank.update(rows, u_i, u_t, 0.0 if warmup else config.bank_momentum)
            total += loss.item()
        if checkpoint:
            save_checkpoint(checkpoint, epoch, nets, optimiser, rng, memory=bank.memory.cpu())
        if on_epoch:
            on_epoch(epoch, total / len(batches), time.perf_counter() - started)
    return nets.cpu().eval()
