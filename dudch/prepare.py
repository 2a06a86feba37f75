"""Stage 1: turn the raw OpenClipart tree into features, a split, and (separately) labels.

Outputs two things on purpose. `features` (image features, text bag-of-words, item ids, the
split) is all that training ever reads. `labels` (category multi-hot rows and the file paths,
which name the categories) is read by evaluation alone.
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dudch import DudchError, openclipart
from dudch.features import IMAGE_EXTRACTOR, IMAGE_FEATURE_DIM, ImageEncoder, bag_of_words, render_svg
from dudch.storage import save_json, save_npy, save_npz


@dataclass(frozen=True)
class PrepareConfig:
    seed: int = 0
    max_items: int = 0  # 0: all; else the first N labelled items by content hash (a fixed subset)
    min_word_count: int = 5  # a tag word enters the vocabulary when this many drawings use it
    min_label_size: int = 30  # a category folder becomes a label when it holds this many drawings
    image_size: int = 224
    query_fraction: float = 0.15  # DJSRH: 2,000 queries of ~20,000; scaled down, capped at 2,000
    train_fraction: float = 0.6  # of the database; DJSRH: 5,000, the cap
    validation_fraction: float = 0.15  # of all items, from the database outside the training set
    batch_size: int = 64
    keep_pixels: bool = False  # also output the rendered images (for teacher fine-tuning)


def prepare(raw_root, cache_dir, config=PrepareConfig(), progress=True):
    """Build the dataset from the SVG tree at `raw_root`.

    Returns (features, labels, info): two dicts of numpy arrays and a JSON-able summary.
      features: image float32 (n, 1280); text float32 (n, V); item_id str (n,);
                query, database, train, validation int64 index arrays into the n items.
      labels:   labels uint8 (n, L); label_names str (L,); path str (n,).
    Image features are cached in `cache_dir` by (the items' content hashes, extractor
    settings), so a rerun on the same data does not render or encode again.
    """
    drawings = openclipart.scan(raw_root)
    items = _merge_duplicates(drawings)
    label_names = _label_names(items, config.min_label_size)
    label_index = {name: j for j, name in enumerate(label_names)}
    items = [it for it in items if any(c in label_index for c in it["categories"])]
    if config.max_items:
        items = items[:config.max_items]
    warnings = []

    image, rendered, pixels = _images(raw_root, items, cache_dir, config, progress)
    if not rendered.all():
        warnings.append(f"{int((~rendered).sum())} drawings could not be rendered and were left out")
        items = [it for it, ok in zip(items, rendered) if ok]
        image = image[rendered]
        pixels = pixels[rendered] if pixels is not None else None

    text, vocabulary = bag_of_words([it["tags"] for it in items], config.min_word_count,
                                    drop_words=openclipart.folder_words(d.path for d in drawings))
    empty_text = int((text.sum(axis=1) == 0).sum())
    if empty_text:
        warnings.append(f"{empty_text} drawings have no tag word in the vocabulary (all-zero text)")

    labels = np.zeros((len(items), len(label_names)), dtype=np.uint8)
    for i, it in enumerate(items):
        labels[i, [label_index[c] for c in it["categories"] if c in label_index]] = 1

    split = make_split(len(items), config)
    _check_finite(image=image, text=text)
    features = dict(image=image, text=text, item_id=np.array([it["sha1"] for it in items]), **split)
    if pixels is not None:
        features["pixels"] = pixels
    label_data = dict(labels=labels, label_names=np.array(label_names),
                      path=np.array([it["paths"][0] for it in items]))
    info = dict(dataset="openclipart", items=len(items), image_dim=int(image.shape[1]),
                text_dim=len(vocabulary), num_labels=len(label_names),
                split={k: len(v) for k, v in split.items()}, warnings=warnings,
                config=asdict(config), vocabulary_head=vocabulary[:20])
    return features, label_data, info


def _merge_duplicates(drawings):
    """One item per distinct file content; a file found in several folders gets all their
    categories and the union of its tags. Sorted by content hash."""
    merged = {}
    for d in drawings:
        item = merged.setdefault(d.sha1, dict(sha1=d.sha1, paths=[], tags=[], categories=[]))
        item["paths"].append(d.path)
        item["tags"] += [t for t in d.tags if t not in item["tags"]]
        item["categories"] += [c for c in openclipart.categories(d.path) if c not in item["categories"]]
    return [merged[k] for k in sorted(merged)]


def _label_names(items, min_size):
    counts = {}
    for it in items:
        for c in it["categories"]:
            counts[c] = counts.get(c, 0) + 1
    return sorted(c for c, n in counts.items() if n >= min_size)


def make_split(n, config):
    """Seeded DJSRH-style split, scaled to n: queries, the database (all the rest), a training
    subset of the database, and a validation subset of the database disjoint from the
    queries and from the training subset. Index arrays are sorted."""
    if n < 10:
        raise DudchError(f"only {n} usable items: too few to split; use more data (--max-items)")
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(n)
    n_query = max(1, min(2000, round(config.query_fraction * n)))
    database = order[n_query:]
    n_train = max(1, min(5000, round(config.train_fraction * len(database))))
    n_val = max(1, min(2000, round(config.validation_fraction * n), len(database) - n_train))
    return dict(query=np.sort(order[:n_query]), database=np.sort(database),
                train=np.sort(database[:n_train]),
                validation=np.sort(database[n_train:n_train + n_val]))


def _cache_key(items, **settings):
    source = json.dumps(dict(items=[it["sha1"] for it in items], **settings), sort_keys=True)
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def _images(raw_root, items, cache_dir, config, progress):
    """(features float32 (n, 1280), rendered bool (n,), pixels uint8 (n, size, size, 3) when
    config.keep_pixels else None). Both are cached by the items' content hashes and the
    extractor settings (pixels as a memory-mappable .npy); whatever the cache lacks is
    computed in one rendering pass."""
    cache = Path(cache_dir)
    features_path = cache / f"image-features-{_cache_key(items, extractor=IMAGE_EXTRACTOR, size=config.image_size, normalisation='[-1,1]')}.npz"
    pixels_path = cache / f"pixels-{_cache_key(items, size=config.image_size)}.npy"
    encode = not features_path.exists()
    keep = config.keep_pixels and not pixels_path.exists()
    if encode or keep:
        _render(raw_root, items, config, progress, features_path if encode else None,
                pixels_path if keep else None)
    with np.load(features_path) as cached:
        features, rendered = cached["features"], cached["rendered"]
    return features, rendered, np.load(pixels_path, mmap_mode="r") if config.keep_pixels else None


def _render(raw_root, items, config, progress, features_path, pixels_path):
    """Render every drawing once; encode the batches into `features_path` and/or keep the pixels
    (white where rendering failed) in `pixels_path`, whichever is given."""
    from tqdm import tqdm

    encoder = ImageEncoder() if features_path else None
    features = np.zeros((len(items), IMAGE_FEATURE_DIM), dtype=np.float32)
    rendered = np.zeros(len(items), dtype=bool)
    size = config.image_size
    pixels = np.full((len(items), size, size, 3), 255, dtype=np.uint8) if pixels_path else None
    with tqdm(total=len(items), desc="render + encode images" if encoder else "render images",
              unit="img", disable=not progress) as bar:
        for start in range(0, len(items), config.batch_size):
            rows = range(start, min(start + config.batch_size, len(items)))
            images = {i: render_svg(Path(raw_root) / items[i]["paths"][0], size) for i in rows}
            ok = [i for i, image in images.items() if image is not None]
            if ok:
                batch = np.stack([images[i] for i in ok])
                rendered[ok] = True
                if encoder:
                    features[ok] = encoder.encode(batch)
                if pixels is not None:
                    pixels[ok] = batch
            bar.update(len(rows))
    if encoder:
        save_npz(features_path, features=features, rendered=rendered)
    if pixels is not None:
        save_npy(pixels_path, pixels)


def _check_finite(**arrays):
    for name, array in arrays.items():
        if not np.isfinite(array).all():
            raise DudchError(f"{name} features contain NaN or infinite values; check the input "
                             f"data or delete the feature cache and rerun")


def save(directory, features=None, labels=None, info=None):
    """Write whichever of the three outputs are given into `directory` (atomically each).
    Pixels, when present, go to pixels.npy (uncompressed, memory-mappable)."""
    directory = Path(directory)
    if features is not None:
        save_npz(directory / "features.npz", **{k: v for k, v in features.items() if k != "pixels"})
        if "pixels" in features:
            save_npy(directory / "pixels.npy", features["pixels"])
    if labels is not None:
        save_npz(directory / "labels.npz", **labels)
    if info is not None:
        save_json(directory / "info.json", info)


def load_features(directory, expect):
    """features.npz of an artifact folder (checked for the keys in `expect`), plus its pixels
    (memory-mapped) when the folder has them."""
    features = load(Path(directory) / "features.npz", expect)
    if (Path(directory) / "pixels.npy").exists():
        features["pixels"] = np.load(Path(directory) / "pixels.npy", mmap_mode="r")
    return features


def load(path, expect):
    """Load `features.npz` or `labels.npz` from an artifact folder, checking its keys.

    `expect` is the tuple of keys the caller needs; a missing file or key is a DudchError.
    """
    path = Path(path)
    if not path.exists():
        raise DudchError(f"{path} not found; rerun the prepare stage")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as error:
        raise DudchError(f"cannot read {path} ({error}); rerun the prepare stage") from None
    missing = [k for k in expect if k not in arrays]
    if missing:
        raise DudchError(f"{path} lacks {', '.join(missing)}; rerun the prepare stage")
    return arrays
