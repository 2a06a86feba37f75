"""The hashing networks shared by teacher and student, their persistence, and `sign`."""

import pickle
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dudch import DudchError, first_line


def default_device():
    """CUDA when there is a GPU, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class HashNets(nn.Module):
    """An image and a text hashing network, returning continuous hash-layer outputs h.

    Each branch is an MLP: its input, ReLU hidden layers of the widths `image_hidden` /
    `text_hidden` (an int for one layer, a list for several, 0 or [] for none), then the hash
    layer (`bits`). The image branch takes backbone features (n, image_dim) by default; with
    image_backbone="efficientnet-lite0" it takes uint8 pixels (n, h, w, 3) through a trainable
    EfficientNet-Lite0 (end-to-end fine-tuning, for GPU nodes)."""

    def __init__(self, image_dim, text_dim, bits, text_hidden=4096, image_hidden=0, image_backbone=""):
        super().__init__()
        self.dims = dict(image_dim=image_dim, text_dim=text_dim, bits=bits, text_hidden=text_hidden,
                         image_hidden=image_hidden, image_backbone=image_backbone)
        self.image = _mlp(image_dim, image_hidden, bits)
        if image_backbone:
            if image_backbone != "efficientnet-lite0":
                raise DudchError(f"unknown image backbone {image_backbone!r}; use efficientnet-lite0")
            from dudch.features import efficientnet_backbone

            self.image = nn.Sequential(efficientnet_backbone(), self.image)
        self.text = _mlp(text_dim, text_hidden, bits)

    @property
    def takes_pixels(self):
        return bool(self.dims["image_backbone"])

    def forward(self, image, text):
        return self.image(image), self.text(text)


def _mlp(in_dim, hidden, out_dim):
    """Linear layers through the `hidden` widths (int or list; 0 or [] for none), ReLU between.
    With no hidden layer the branch is a bare nn.Linear (the layout saved models have)."""
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    widths = [in_dim, *(w for w in widths if w), out_dim]
    layers = [nn.Linear(widths[0], widths[1])]
    for a, b in zip(widths[1:-1], widths[2:]):
        layers += [nn.ReLU(), nn.Linear(a, b)]
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def check_pairs(image, text, pixels=False):
    """Validate a pair of feature matrices: 2-D, same row count, finite. Returns float32 arrays.
    With pixels=True `image` holds uint8 images (n, h, w, 3), checked for their count only and
    returned as they are (possibly memory-mapped)."""
    if pixels:
        if len(image) != len(text):
            raise DudchError(f"{len(image)} images but {len(text)} text rows; rerun the prepare stage")
        return image, check_pairs(np.zeros((len(text), 1)), text)[1]
    image, text = np.asarray(image, dtype=np.float32), np.asarray(text, dtype=np.float32)
    if image.ndim != 2 or text.ndim != 2:
        raise DudchError(f"features must be 2-D (items x dims), got image {image.shape} and text "
                         f"{text.shape}; rerun the prepare stage")
    if len(image) != len(text):
        raise DudchError(f"{len(image)} image rows but {len(text)} text rows: the modalities "
                         f"must pair row by row; rerun the prepare stage")
    for name, array in (("image", image), ("text", text)):
        if not np.isfinite(array).all():
            raise DudchError(f"{name} features contain NaN or infinite values; fix the input "
                             f"data and rerun the prepare stage")
    return image, text


def image_input(nets, features):
    """The image array `nets` takes from a features dict: 'pixels' or 'image' (features)."""
    if not nets.takes_pixels:
        return features["image"]
    if "pixels" not in features:
        raise DudchError("this teacher fine-tunes its backbone on pixels, but the dataset was "
                         "prepared without them; rerun with teacher_image_input=pixels")
    return features["pixels"]


@torch.no_grad()
def _batched(nets, function, *arrays, batch_size=None):
    """`function` over row batches of `arrays`, as tensors on the networks' device; returns its
    outputs (a tuple) concatenated into float32 numpy arrays. Pixels go in smaller batches."""
    batch_size = batch_size or (128 if nets.takes_pixels else 4096)
    device = next(nets.parameters()).device
    outputs = [function(*(torch.from_numpy(np.asarray(a[s:s + batch_size])).to(device) for a in arrays))
               for s in range(0, len(arrays[0]), batch_size)]
    return tuple(torch.cat([o[m] for o in outputs]).float().cpu().numpy() for m in range(len(outputs[0])))


def hash_outputs(nets, image, text, batch_size=None):
    """Continuous hash-layer outputs (h_image, h_text), float32 arrays (n, bits) each.
    `image` is what the image branch takes: features (n, d) or uint8 pixels (n, h, w, 3)."""
    image, text = check_pairs(image, text, pixels=nets.takes_pixels)
    return _batched(nets, nets, image, text, batch_size=batch_size)


def branch_outputs(nets, modality, x, batch_size=None):
    """Continuous hash-layer outputs float32 (n, bits) of one modality alone ("image" or
    "text"), before tanh and sign. `x` is what that branch takes (features, or pixels for a
    fine-tuned image branch); checked for shape and finite values."""
    branch = {"image": nets.image, "text": nets.text}[modality]
    if modality == "text" or not nets.takes_pixels:
        width = nets.dims[f"{modality}_dim"]
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != width:
            raise DudchError(f"{modality} features must be (n, {width}), got {x.shape}")
        if not np.isfinite(x).all():
            raise DudchError(f"{modality} features contain NaN or infinite values")
    return _batched(nets, lambda batch: (branch(batch),), x, batch_size=batch_size)[0]


def branch_codes(nets, modality, x, batch_size=None):
    """Codes int8 (n, bits), exactly +-1, of one modality alone: the sign of `branch_outputs`."""
    return sign(branch_outputs(nets, modality, x, batch_size))


def sign(values):
    """Binary codes in {-1, +1} (int8); zero maps to +1 so that every bit is decided."""
    return np.where(np.asarray(values) >= 0, 1, -1).astype(np.int8)


def save(path, nets, config):
    """Write the networks and the config (a dataclass) that trained them."""
    torch.save(dict(dims=nets.dims, state_dict=nets.state_dict(), config=asdict(config)), path)


def load(path):
    """(HashNets in eval mode, config dict) from a file written by `save`. Only tensors and
    plain values are read (`weights_only`): a file that holds anything else, code included, is
    refused, not run."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        nets = HashNets(**saved["dims"])
        nets.load_state_dict(saved["state_dict"])
    except pickle.UnpicklingError:
        raise DudchError(f"refused to load model {path}: it holds objects other than tensors and "
                         f"plain values (not a file dudch wrote); rerun the stage that trains it") from None
    except (OSError, RuntimeError, EOFError, KeyError, TypeError) as error:
        raise DudchError(f"cannot load model {path} ({first_line(error)}); rerun the stage that trains it") from None
    return nets.eval(), saved["config"]


def hidden_features(nets, image, text, batch_size=None):
    """The activations feeding each branch's hash layer (its 'deep features'): float32 arrays
    (n, hidden) per modality. A branch with no hidden layer returns its input features."""
    image, text = check_pairs(image, text, pixels=nets.takes_pixels)

    def below_hash_layer(branch, x):
        if not isinstance(branch, nn.Sequential):
            return np.asarray(x, dtype=np.float32)
        return _batched(nets, lambda batch: (branch[:-1](batch),), x, batch_size=batch_size)[0]

    return below_hash_layer(nets.image, image), below_hash_layer(nets.text, text)


def save_checkpoint(path, step, nets, optimiser, rng, **arrays):
    """Everything needed to continue training after `step` exactly as if never interrupted:
    network and optimiser state, the numpy generator's state, and any arrays (atomic write)."""
    from dudch.storage import atomic_file

    with atomic_file(path) as tmp:
        torch.save(dict(step=step, nets=nets.state_dict(), optimiser=optimiser.state_dict(),
                        rng=rng.bit_generator.state,
                        arrays={k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}), tmp)


def resume(path, nets, optimiser, rng):
    """Restore a checkpoint written by `save_checkpoint` into nets, optimiser and rng; returns
    (the step to start from, the saved arrays), or (0, {}) when there is none."""
    if path is None or not Path(path).exists():
        return 0, {}
    saved = torch.load(path, map_location=next(nets.parameters()).device, weights_only=True)
    nets.load_state_dict(saved["nets"])
    optimiser.load_state_dict(saved["optimiser"])
    rng.bit_generator.state = saved["rng"]
    return saved["step"] + 1, {k: v.cpu().numpy() for k, v in saved["arrays"].items()}
