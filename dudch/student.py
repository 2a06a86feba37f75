"""Stage 4: the student, asymmetric deep hashing with discrete cyclic coordinate descent (DCC),
ADSH (Jiang & Li, AAAI 2018) extended to two modalities, supervised by the reconstructed
similarity instead of labels.

Query networks u_i = tanh(g_I(x_i)), v_i = tanh(g_T(y_i)); database codes B in {-1,+1}^{n x k},
one row per database item, shared by its image and text. Over a sampled Omega (m rows of the
training subset, resampled each outer iteration):
    J = ||U B^T - k S_Omega||^2 + ||V B^T - k S_Omega||^2 + gamma (||B_Omega - U||^2 + ||B_Omega - V||^2)
Alternate (a) B fixed: train g_I, g_T by SGD on J; (b) networks fixed: for each bit column c,
    Q = -2k S_Omega^T (U + V) - 2 gamma (U_bar + V_bar)        (n x k; U_bar: U in Omega's rows)
    B_c = -sign(2 B^_c (U^_c^T U_c + V^_c^T V_c) + Q_c)        (X^_c: X without column c)
which is the exact minimiser of J over column c with the others fixed (terms ||B_c||^2 = n
are constant), so no DCC sweep increases J, for any real S. A zero argument keeps the current
bit, so B stays exactly +-1.

S: the graph's affinity A in [0, 1] (`dudch.similarity`) becomes S = A (1 + r) - r. With
`soft_constraint` (ADSH's public code, in the network loss and in DCC alike) r = sum(A) /
sum(1 - A) over S_Omega, so similar pairs weigh as much in total as dissimilar ones: +1 for
similar, -r for dissimilar. Without it r = 1, S in {-1, +1}, and a sparse graph is dominated
by "dissimilar" until the codes collapse.

Departures from ADSH, on purpose: the image network is an MLP on frozen backbone features
(ADSH fine-tunes a CNN); u and v for DCC are recomputed in eval mode after the network phase
(ADSH reuses the training-mode outputs of its last epoch); database codes may start from the
teacher's joint codes (`init="teacher"`, the distilled knowledge; ADSH starts B at zeros,
`init="zeros"`); the optimiser is Adam (lr 1e-3, weight decay 1e-5), since ADSH's SGD (lr 1e-3,
/10 every 10 outer iterations, weight decay 5e-4: `optimizer="sgd", lr_step=10,
weight_decay=5e-4`) fits these MLPs on frozen features too slowly in 30 outer iterations
(benchmarks/results/tuning-openclipart.md).

With `discrete=False` (the relax-then-binarise ablation, as DCMH and UKD train) there is no DCC:
the database side is relaxed to the networks' own continuous outputs W = (u + v) / 2 of every
database item (refreshed each outer iteration), the quantization loss gamma ||sign(W) - u||^2
pulls the outputs towards binary, and the codes are B = sign(W) at the end.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch

from dudch import DudchError
from dudch.nets import HashNets, check_pairs, default_device, resume, save_checkpoint

INITS = ("teacher", "zeros", "random")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class StudentConfig:
    bits: int = 64
    outer_iterations: int = 30  # ADSH: 50 on ~20k items
    inner_epochs: int = 3  # ADSH: 3
    omega_size: int = 2000  # ADSH: 2,000 (capped at the training subset's size)
    batch_size: int = 256  # ADSH: 64; same validation mAP on OpenClipart, 1.5x faster on CPU
    gamma: float = 800.0  # ADSH: 200; 800 ties u, v to the codes better here (tuning-openclipart.md)
    soft_constraint: bool = True  # ADSH's class balance of S
    optimizer: str = "adam"  # ADSH: SGD, too slow for these MLPs (benchmarks/results/tuning-openclipart.md)
    lr: float = 1e-3  # ADSH: 1e-3
    lr_step: int = 0  # lr / 10 every this many outer iterations (0: constant); ADSH: 10
    weight_decay: float = 1e-5  # ADSH: 5e-4 (with SGD)
    init: str = "teacher"  # database codes start from: the teacher's codes, zeros (ADSH), random
    discrete: bool = True  # False: relax-then-binarise instead of DCC (ablation)
    image_hidden: int = 1024
    text_hidden: int = 4096
    seed: int = 0


def balance(levels, max_level, soft_constraint=True):
    """(scale, offset) with S = scale * levels + offset: the affinity levels / max_level in
    [0, 1] turned into S = A (1 + r) - r, r = sum(A) / sum(1 - A) (soft constraint) or 1."""
    r = 1.0
    if soft_constraint:
        similar = levels.sum(dtype=np.float64) / max_level
        r = similar / max(levels.size - similar, 1.0)
    return (1.0 + r) / max_level, -r


def objective(u, v, codes, levels, omega, gamma, scale=2.0, offset=-1.0, chunk=8192):
    """J above, in float64, with S = scale * levels + offset (the defaults read levels in
    {0, 1} as S in {-1, +1}). u, v: (m, k); codes: (n, k); levels: int8 (m, n); omega: the m
    database rows that u and v belong to. Over column chunks of S: memory O(m x chunk)."""
    k = codes.shape[1]
    b = codes.astype(np.float64)
    fit = 0.0
    for start in range(0, len(b), chunk):
        s = k * (scale * levels[:, start:start + chunk].astype(np.float64) + offset)
        fit += ((u @ b[start:start + chunk].T - s) ** 2).sum() + ((v @ b[start:start + chunk].T - s) ** 2).sum()
    return float(fit + gamma * (((b[omega] - u) ** 2).sum() + ((b[omega] - v) ** 2).sum()))


def dcc_sweep(codes, u, v, levels, omega, gamma, scale=2.0, offset=-1.0, chunk=8192):
    """One DCC sweep over all k bit columns; returns the new codes (int8, exactly +-1).

    codes: (n, k) in {-1, +1} (or 0 for undecided bits); u, v: (m, k) float; levels: int8
    (m, n), S = scale * levels + offset; omega: (m,) rows. S^T (U + V) = scale levels^T (U + V)
    + offset 1 (sum of U + V), accumulated over column chunks: memory O(m x chunk + n x k).
    """
    n, k = codes.shape
    b = codes.astype(np.float64)
    u, v = u.astype(np.float64), v.astype(np.float64)
    both = u + v
    q = np.empty((n, k))
    for start in range(0, n, chunk):
        q[start:start + chunk] = levels[:, start:start + chunk].T.astype(np.float64) @ both
    q = -2.0 * k * (scale * q + offset * both.sum(axis=0))
    q[omega] -= 2.0 * gamma * both
    # U^_c^T U_c + V^_c^T V_c is column c of this Gram matrix without its own entry: one k x k
    # product per sweep instead of copying B^_c (n x (k - 1)) for every column.
    gram = u.T @ u + v.T @ v
    for c in range(k):
        grad = 2.0 * (b @ gram[c] - b[:, c] * gram[c, c]) + q[:, c]
        keep = np.where(b[:, c] == 0, 1.0, b[:, c])
        b[:, c] = np.where(grad > 0, -1.0, np.where(grad < 0, 1.0, keep))
    return b.astype(np.int8)


def initial_codes(init, n, k, rng, teacher_codes=None):
    """Database codes to start from, int8 (n, k): the teacher's, zeros or random +-1."""
    if init not in INITS:
        raise DudchError(f"unknown student init {init!r}; use one of {', '.join(INITS)}")
    if init == "teacher":
        if teacher_codes is None or np.shape(teacher_codes) != (n, k):
            raise DudchError(f"student init 'teacher' needs the teacher's {k}-bit codes of the "
                             f"{n} database items in the similarity graph (a graph from the raw "
                             f"features has none); use student_init=zeros")
        return np.asarray(teacher_codes, dtype=np.int8).copy()
    if init == "zeros":
        return np.zeros((n, k), dtype=np.int8)
    return np.where(rng.standard_normal((n, k)) >= 0, 1, -1).astype(np.int8)


def fit(image, text, train_rows, graph, config=StudentConfig(), on_iteration=None, device=None,
        checkpoint=None):
    """Train the student on the database.

    image: float32 (n, d_image), text: float32 (n, d_text): the database items, row j of both
    being item j; train_rows: rows of the training subset (Omega is drawn from them); graph:
    a SimilarityGraph over the same n items. Labels are not an input.
    on_iteration(iteration, network_loss, objective_after_dcc, seconds) after each iteration.
    checkpoint: a file path; the state (networks, optimiser, codes, generator) is saved there
    after every outer iteration and training resumes from it when it exists.
    The networks train on CUDA when there is a GPU (bf16 autocast where supported); DCC runs
    in numpy. Returns (HashNets in eval mode on the CPU, codes int8 (n, bits) in {-1, +1}).
    """
    image, text = check_pairs(image, text)
    if len(graph) != len(image):
        raise DudchError(f"similarity graph covers {len(graph)} items but the database has "
                         f"{len(image)}; rerun the similarity stage on this dataset")
    if config.optimizer not in OPTIMIZERS:
        raise DudchError(f"unknown student optimizer {config.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    device = torch.device(device or default_device())
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    k, n = config.bits, len(image)
    nets = HashNets(image.shape[1], text.shape[1], k, config.text_hidden, config.image_hidden).to(device)
    if config.optimizer == "sgd":
        optimiser = torch.optim.SGD(nets.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimiser = torch.optim.Adam(nets.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    codes = initial_codes(config.init, n, k, rng, graph.teacher_codes)
    x_i, x_t = torch.from_numpy(image).to(device), torch.from_numpy(text).to(device)
    train_rows = np.asarray(train_rows)
    m = min(config.omega_size, len(train_rows))
    first_iteration, saved = resume(checkpoint, nets, optimiser, rng)
    codes = saved.get("codes", codes)
    relaxed = None if config.discrete else _outputs(nets, x_i, x_t, np.arange(n))

    for iteration in range(first_iteration, config.outer_iterations):
        started = time.perf_counter()
        for group in optimiser.param_groups:
            group["lr"] = config.lr * 0.1 ** (iteration // config.lr_step if config.lr_step else 0)
        omega = np.sort(rng.choice(train_rows, size=m, replace=False))
        levels = graph.rows(omega)
        scale, offset = balance(levels, graph.levels, config.soft_constraint)
        if config.discrete:
            database = codes
        else:  # relaxed: compare with the continuous outputs, quantize towards their sign
            database = (relaxed[0] + relaxed[1]) / 2
            codes = np.where(database >= 0, 1, -1).astype(np.int8)
        network_loss = _train_networks(nets, optimiser, x_i, x_t, omega, levels, scale, offset,
                                       database, codes, config, rng, device)
        if config.discrete:
            u, v = _outputs(nets, x_i, x_t, omega)
            codes = dcc_sweep(codes, u, v, levels, omega, config.gamma, scale, offset)
        else:
            relaxed = _outputs(nets, x_i, x_t, np.arange(n))
            codes = np.where(relaxed[0] + relaxed[1] >= 0, 1, -1).astype(np.int8)
            u, v = relaxed[0][omega], relaxed[1][omega]
        if checkpoint:
            save_checkpoint(checkpoint, iteration, nets, optimiser, rng, codes=codes)
        if on_iteration:
            value = objective(u, v, codes, levels, omega, config.gamma, scale, offset) / (m * n)
            on_iteration(iteration, network_loss, value, time.perf_counter() - started)
    return nets.cpu().eval(), codes


def _train_networks(nets, optimiser, x_i, x_t, omega, levels, scale, offset, database, codes,
                    config, rng, device):
    """Network phase: `database` (n, k) is what u and v are compared with (B, or the relaxed
    outputs), `codes` the binary targets of the quantization term."""
    k, n = config.bits, len(codes)
    d = torch.from_numpy(np.asarray(database, dtype=np.float32)).to(device)
    b = torch.from_numpy(codes.astype(np.float32)).to(device)
    s = torch.from_numpy(levels).to(device)  # int8: a float copy would cost 4 bytes x m x n
    omega_t = torch.from_numpy(omega).to(device)
    nets.train()
    total, batches = 0.0, 0
    for _ in range(config.inner_epochs):
        for batch in np.array_split(rng.permutation(len(omega)), max(1, len(omega) // config.batch_size)):
            pos = torch.from_numpy(batch).to(device)
            rows = omega_t[pos]
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=device.type == "cuda" and torch.cuda.is_bf16_supported()):
                h_i, h_t = nets(x_i[rows], x_t[rows])
            u, v = torch.tanh(h_i.float()), torch.tanh(h_t.float())
            target = k * (scale * s[pos].float() + offset)
            loss = (((u @ d.T - target) ** 2).sum() + ((v @ d.T - target) ** 2).sum()
                    + config.gamma * (((b[rows] - u) ** 2).sum() + ((b[rows] - v) ** 2).sum()))
            loss = loss / (n * len(batch))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total, batches = total + loss.item(), batches + 1
    return total / batches


@torch.no_grad()
def _outputs(nets, x_i, x_t, rows):
    nets.eval()
    index = torch.from_numpy(rows).to(x_i.device)
    h_i, h_t = nets(x_i[index], x_t[index])
    return torch.tanh(h_i).float().cpu().numpy(), torch.tanh(h_t).float().cpu().numpy()
