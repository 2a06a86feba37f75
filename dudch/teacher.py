"""Stage 2: the teacher, DJSRH (Su, Zhong, Zhang, ICCV 2019), unsupervised.

Per mini-batch of m pairs, with F_I, F_T the L2-normalised input features:
    S_I = 2 F_I F_I^T - 1,  S_T = 2 F_T F_T^T - 1
    S~ = beta S_I + (1 - beta) S_T;  S = mu ((1 - eta) S~ + eta S~ S~^T / m)
    B_I = tanh(alpha h_I), B_T = tanh(alpha h_T), rows L2-normalised, alpha = sqrt(epoch + 1)
    loss = lambda1 MSE(B_I B_I^T, S) + MSE(B_I B_T^T, S) + lambda2 MSE(B_T B_T^T, S)
Networks as DJSRH with a frozen image backbone: image features -> linear hash layer; text
BoW -> 4096 -> ReLU -> k. Codes: sign(h). Departures: the backbone is EfficientNet-Lite0 rather
than AlexNet/VGG, and with image_input="pixels" (fine-tuning it end to end) the images are not
augmented (DJSRH's loader crops and flips them at random), so that runs are reproducible.
"""

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from dudch import DudchError
from dudch.nets import HashNets, check_pairs, default_device, resume, save_checkpoint


@dataclass(frozen=True)
class TeacherConfig:
    bits: int = 64
    epochs: int = 80
    batch_size: int = 32
    beta: float = 0.9  # DJSRH's MIRFLICKR-25K setting (0.6 on NUS-WIDE)
    eta: float = 0.4
    mu: float = 1.5
    lambda1: float = 0.1
    lambda2: float = 0.1
    lr_image: float = 0.001
    lr_text: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    text_hidden: int = 4096
    image_input: str = "features"  # or "pixels": fine-tune EfficientNet-Lite0 end to end (GPU)
    seed: int = 0


IMAGE_INPUTS = ("features", "pixels")
# The teacher stage's methods (this module's DJSRH, or dudch.ucch) and how results name them.
TEACHER_NAMES = {"djsrh": "DJSRH", "ucch": "UCCH"}
DEFAULT_TEACHER = "djsrh"  # chosen on the validation split: benchmarks/results/tuning-ucch-openclipart.md


def semantic_affinity(image, text, beta, eta, mu):
    """DJSRH's joint-semantics affinity S (m x m) from a batch of raw features."""
    f_i, f_t = F.normalize(image, dim=1), F.normalize(text, dim=1)
    s_mixed = beta * (2 * f_i @ f_i.T - 1) + (1 - beta) * (2 * f_t @ f_t.T - 1)
    return mu * ((1 - eta) * s_mixed + eta * (s_mixed @ s_mixed.T) / len(image))


def djsrh_loss(h_image, h_text, affinity, alpha, lambda1, lambda2):
    b_i = F.normalize(torch.tanh(alpha * h_image), dim=1)
    b_t = F.normalize(torch.tanh(alpha * h_text), dim=1)
    return (lambda1 * F.mse_loss(b_i @ b_i.T, affinity) + F.mse_loss(b_i @ b_t.T, affinity)
            + lambda2 * F.mse_loss(b_t @ b_t.T, affinity))


def fit(image, text, config=TeacherConfig(), on_epoch=None, device=None, pixels=None, checkpoint=None):
    """Train DJSRH on paired features.

    image: float32 (n, d_image) frozen backbone features (they define S_I, as in DJSRH);
    text: float32 (n, d_text); pixels: uint8 (n, h, w, 3), required when
    config.image_input == "pixels", where the image branch is EfficientNet-Lite0 fine-tuned
    end to end on them. Labels are not an input. On a GPU the forward pass runs under bf16
    autocast where the card supports it. on_epoch(epoch, mean_loss, seconds) after each epoch.
    checkpoint: a file path; the state is saved there after every epoch and, when the file
    exists, training resumes from it (a preempted task picks up where it stopped, with the same
    final result as an uninterrupted run). Returns the trained HashNets (eval mode, on the CPU).
    """
    image, text = check_pairs(image, text)
    if config.image_input not in IMAGE_INPUTS:
        raise DudchError(f"unknown teacher image input {config.image_input!r}; use features or pixels")
    fine_tune = config.image_input == "pixels"
    if fine_tune and (pixels is None or len(pixels) != len(image)):
        raise DudchError("teacher_image_input=pixels needs the rendered pixels of every training "
                         "item; prepare the dataset with teacher_image_input=pixels")
    device = torch.device(device or default_device())
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    nets = HashNets(image.shape[1], text.shape[1], config.bits, config.text_hidden,
                    image_backbone="efficientnet-lite0" if fine_tune else "").to(device)
    # fused: one pass over each parameter per step instead of one per operation; the same
    # arithmetic, so the same weights bit for bit, and epochs about 1.7x faster on a CPU
    # (the 4096-wide text layer's update dominated them)
    optimiser = torch.optim.SGD([
        dict(params=nets.image.parameters(), lr=config.lr_image),
        dict(params=nets.text.parameters(), lr=config.lr_text),
    ], momentum=config.momentum, weight_decay=config.weight_decay, fused=True)
    x_i, x_t = torch.from_numpy(image).to(device), torch.from_numpy(text).to(device)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    first_epoch, _ = resume(checkpoint, nets, optimiser, rng)
    nets.train()
    for epoch in range(first_epoch, config.epochs):
        started, total, batches = time.perf_counter(), 0.0, 0
        alpha = math.sqrt(epoch + 1)
        for batch in np.array_split(rng.permutation(len(image)), max(1, len(image) // config.batch_size)):
            idx = torch.from_numpy(batch).to(device)
            affinity = semantic_affinity(x_i[idx], x_t[idx], config.beta, config.eta, config.mu)
            image_in = x_i[idx] if not fine_tune else _pixel_batch(pixels, batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                h_i, h_t = nets(image_in, x_t[idx])
            loss = djsrh_loss(h_i.float(), h_t.float(), affinity, alpha, config.lambda1, config.lambda2)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total, batches = total + loss.item(), batches + 1
        if checkpoint:
            save_checkpoint(checkpoint, epoch, nets, optimiser, rng)
        if on_epoch:
            on_epoch(epoch, total / batches, time.perf_counter() - started)
    return nets.cpu().eval()


def _pixel_batch(pixels, rows, device):
    batch = torch.from_numpy(np.ascontiguousarray(pixels[rows]))
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch
