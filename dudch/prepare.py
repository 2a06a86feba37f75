"""Stage 1: turn a dataset (a SOURCE, see `dudch.sources`) into features, a split, and
(separately) labels.

Outputs two things on purpose. `features` (image features, text features, item ids, the
split) is all that training ever reads. `labels` (multi-hot rows, label names and the items'
paths, which may name the categories) is read by evaluation alone.
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dudch import DudchError, sources
from dudch.features import IMAGE_EXTRACTOR, IMAGE_FEATURE_DIM, MINILM_DIM, ImageEncoder, encode_text
from dudch.storage import save_json, save_npy, save_npz, sha256_of

THUMBNAIL_SIZE = 64  # the images evaluation shows in its retrieval-examples grid
BAD_IMAGE_POLICIES = ("skip", "fail")
# Part of the image cache keys: how images are decoded. "entities" since SVGs with internal
# entities (Illustrator exports) are rendered instead of left out; "depth-exif" since 16-bit
# PNGs are scaled instead of clipped and photos are turned upright (SVGs decode as before).
DECODER = "entities-depth-exif"


@dataclass(frozen=True)
class PrepareConfig:
    seed: int = 0
    max_items: int = 0  # 0: all; else the dataset's first N labelled items (a fixed subset)
    min_word_count: int = 5  # a text word enters the bag-of-words when this many items use it
    min_label_size: int = 30  # OpenClipart: a category folder becomes a label at this many drawings
    image_size: int = 224
    query_fraction: float = 0.15  # DJSRH: 2,000 queries of ~20,000; scaled down, capped at 2,000
    train_fraction: float = 0.6  # of the database; DJSRH: 5,000, the cap
    validation_fraction: float = 0.15  # of all items, from the database outside the training set
    batch_size: int = 64
    keep_pixels: bool = False  # also output the decoded images (for teacher fine-tuning)
    text_features: str = "bow"  # "bow" or "minilm" (sentence embeddings)
    on_bad_image: str = "skip"  # "skip": leave undecodable images out and list them; "fail"
    max_bad_image_fraction: float = 0.1  # skip: fail anyway when more than this share is bad


def prepare(source, cache_dir, config=PrepareConfig(), progress=True, shared_cache=None):
    """Build the dataset named by `source` (e.g. "openclipart", "manifest:pairs.jsonl").

    Returns (features, labels, info): two dicts of numpy arrays and a JSON-able summary.
      features: image float32 (n, d_image); text float32 (n, d_text); item_id str (n,);
                query, database, train, validation int64 index arrays into the n items;
                pixels uint8 (n, size, size, 3) when config.keep_pixels.
      labels:   what only evaluation reads: labels uint8 (n, L) (L = 0 for a label-less
                dataset); label_names str (L,); path, text, item_id str (n,); image_sha256 str
                (n,) (each image file's, "" for given features; the retrieval model's exact
                matches); thumbnail uint8 (n, 64, 64, 3) when the dataset has images.
    Image features are cached in `cache_dir` by (the images' content, extractor settings), so
    a rerun on the same data does not decode or encode again. `progress`: True for a progress
    bar on stderr while images are decoded, False for none, or a function called with (images
    done, total) after each batch. `shared_cache` (a `dudch.storage.SharedCache`): where the
    cache entries are also fetched from and stored, for machines that share no file system.
    """
    data = sources.load(source, config.min_label_size)
    if config.max_items:
        data = data.subset(np.arange(min(config.max_items, len(data))))
    warnings = data.warnings

    bad_images = []
    if config.on_bad_image not in BAD_IMAGE_POLICIES:
        raise DudchError(f"unknown on_bad_image {config.on_bad_image!r}; use skip or fail")
    if data.images is None:
        if config.keep_pixels:
            raise DudchError(f"{source} gives image features, not images: the teacher cannot "
                             f"fine-tune on pixels; use teacher_image_input=features")
        image, pixels, thumbnails = data.image_features, None, None
    else:
        image, rendered, thumbnails, pixels = cached_image_features(data, cache_dir, config, progress, shared_cache, warnings)
        bad_images = _bad_image_policy(data, rendered, config)
        if bad_images:
            shown = ", ".join(bad_images[:3]) + (f" and {len(bad_images) - 3} more" if len(bad_images) > 3 else "")
            warnings.append(f"{len(bad_images)} images could not be decoded and were left out "
                            f"(on_bad_image=skip; all listed in prepare_info.json): {shown}")
            data = data.subset(rendered)
            image, thumbnails = image[rendered], thumbnails[rendered]
            pixels = pixels[rendered] if pixels is not None else None

    text, vocabulary = encode_text(data, config.min_word_count, config.text_features)
    warnings += _empty_text_warning(text)

    split = make_split(len(data), config)
    _check_finite(image=image, text=text)
    features = dict(image=image, text=text, item_id=data.item_id, **split)
    if pixels is not None:
        features["pixels"] = pixels
    labels = data.labels if data.labels is not None else np.zeros((len(data), 0), dtype=np.uint8)
    label_data = dict(labels=labels, label_names=np.array(data.label_names, dtype=str),
                      path=data.path, text=data.display_text(), item_id=data.item_id,
                      image_sha256=data.image_sha256())
    if thumbnails is not None:
        label_data["thumbnail"] = thumbnails
    info = dict(dataset=data.kind, source=str(source), digest=_digest(features), items=len(data), image_dim=int(image.shape[1]),
                text_dim=int(text.shape[1]), num_labels=int(labels.shape[1]),
                split={k: len(v) for k, v in split.items()}, warnings=warnings, bad_images=bad_images,
                config=asdict(config), vocabulary_head=vocabulary[:20],
                encoders=_encoders(data, config, vocabulary))
    return features, label_data, info


def _empty_text_warning(text):
    empty = int((np.abs(text).sum(axis=1) == 0).sum())
    return [f"{empty} items have no text word in the vocabulary (all-zero text); they are kept"] if empty else []


def _encoders(data, config, vocabulary):
    """How a query becomes features, for the retrieval model (`dudch.retrieval`)."""
    if config.text_features == "minilm":
        text = dict(kind="minilm")
    elif data.texts is not None or data.vocabulary:
        text = dict(kind="bow", vocabulary=vocabulary)
    else:
        text = dict(kind="given")  # a bag-of-words whose words are not known
    image = dict(kind=IMAGE_EXTRACTOR, size=config.image_size) if data.images is not None else dict(kind="given")
    return dict(text=text, image=image)


def _digest(features):
    """A content digest of what training reads (ids, features, split)."""
    digest = hashlib.sha256()
    for key in sorted(k for k in features if k != "pixels"):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(features[key]).tobytes())
    return digest.hexdigest()[:32]


def describe(source, config=PrepareConfig()):
    """What `dudch data inspect` prints, without decoding any image:
    {"n", "image": {"kind": "pixels"|"features", "shape"}, "text_dim", "num_labels", "warnings"}."""
    data = sources.load(source, config.min_label_size)
    if data.images is None:
        image = dict(kind="features", shape=list(data.image_features.shape))
    else:
        stored = getattr(data.images, "shape", None)  # .mat pixels have a stored size
        size = stored[1:] if stored else (config.image_size, config.image_size, 3)
        image = dict(kind="pixels", shape=[len(data), *map(int, size)])
    warnings = list(data.warnings)
    problems = data.images.problems() if hasattr(data.images, "problems") else {}
    if problems:
        path, why = next(iter(problems.items()))
        warnings.append(f"{len(problems)} images will not decode (first {path}: {why}); a run leaves them "
                        f"out (on_bad_image=skip) or stops (on_bad_image=fail): replace or remove them")
    if config.text_features == "minilm" and data.texts is not None:
        text_width = MINILM_DIM  # without running the sentence model
    else:
        text = encode_text(data, config.min_word_count, config.text_features)[0]
        text_width = text.shape[1]
        warnings += _empty_text_warning(text)
    return dict(n=len(data), image=image, text_dim=int(text_width),
                num_labels=0 if data.labels is None else int(data.labels.shape[1]), warnings=warnings)


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


def _cache_key(content_keys, **settings):
    source = json.dumps(dict(items=list(map(str, content_keys)), **settings), sort_keys=True)
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def _bad_image_policy(data, decoded, config):
    """The paths of the images that could not be decoded, when the policy lets the run go on
    without them; else a DudchError naming them."""
    bad = np.flatnonzero(~decoded)
    if not len(bad):
        return []
    if config.on_bad_image == "fail":
        raise DudchError(f"cannot decode image {data.path[bad[0]]} (item {data.item_id[bad[0]]}) and "
                         f"{len(bad) - 1} more; replace or remove them, or pass --param on_bad_image=skip")
    if len(bad) > config.max_bad_image_fraction * len(data):
        raise DudchError(f"{len(bad)} of {len(data)} images cannot be decoded (first {data.path[bad[0]]}), "
                         f"more than max_bad_image_fraction={config.max_bad_image_fraction} allows; check "
                         f"the data, or raise the fraction with --param max_bad_image_fraction=...")
    return data.path[bad].tolist()


def image_cache_paths(cache_dir, content_keys, config):
    """(image features entry, pixels entry) of the cache for these images and settings."""
    cache = Path(cache_dir)
    features = _cache_key(content_keys, extractor=IMAGE_EXTRACTOR, size=config.image_size, normalisation='[-1,1]',
                          thumbnail=THUMBNAIL_SIZE, decoder=DECODER)
    return (cache / f"image-features-{features}.npz",
            cache / f"pixels-{_cache_key(content_keys, size=config.image_size, decoder=DECODER)}.npy")


def cached_image_features(data, cache_dir, config, progress, shared_cache, warnings):
    """(features float32 (n, 1280), decoded bool (n,), thumbnails uint8 (n, 64, 64, 3), pixels
    uint8 (n, size, size, 3) when config.keep_pixels else None). All are cached by the images'
    content keys and the extractor settings (pixels as a memory-mappable .npy); whatever the
    cache lacks is computed in one decoding pass. Each cache entry has a seal (`_seal`): an
    entry that does not match it is reported in `warnings`, discarded and computed again."""
    keys = data.content_keys
    features_path, pixels_path = image_cache_paths(cache_dir, keys, config)
    items = hashlib.sha256("\n".join(map(str, keys)).encode()).hexdigest()
    missing = []
    for path in [features_path] + ([pixels_path] if config.keep_pixels else []):
        if not path.exists() and not (shared_cache and shared_cache.fetch(path) and shared_cache.fetch(_seal_path(path))):
            missing.append(path)
        elif problem := _seal_problem(path, items):
            warnings.append(f"feature cache entry {path} {problem}: discarded and computed again")
            path.unlink()
            missing.append(path)
    if missing:
        _decode(data, config, progress, features_path if features_path in missing else None,
                pixels_path if pixels_path in missing else None)
        for path in missing:
            _seal(path, items)
            for stored in (path, _seal_path(path)) if shared_cache else ():
                shared_cache.store(stored)
    with np.load(features_path) as cached:
        features, decoded, thumbnails = cached["features"], cached["rendered"], cached["thumbnails"]
    return features, decoded, thumbnails, np.load(pixels_path, mmap_mode="r") if config.keep_pixels else None


def _seal_path(path):
    return path.with_name(path.name + ".seal.json")


def _seal(path, items):
    """Record beside a cache entry the SHA-256 of its bytes and of the item list it holds."""
    save_json(_seal_path(path), dict(sha256=sha256_of(path), items=items))


def _seal_problem(path, items):
    """Why the cache entry at `path` cannot be trusted, or None when it matches its seal."""
    try:
        seal = json.loads(_seal_path(path).read_text())
    except (OSError, ValueError):
        return "has no readable seal"
    if seal.get("items") != items:
        return "was made for other items"
    if seal.get("sha256") != sha256_of(path):
        return "is corrupt (its content does not match its checksum)"
    return None


def _decode(data, config, progress, features_path, pixels_path):
    """Decode every image once; encode the batches into `features_path` and/or keep the pixels
    (white where decoding failed) in `pixels_path`, whichever is given. With on_bad_image=fail
    the first image that cannot be decoded stops it.
    The next batch is decoded in a thread while the network encodes this one (torch releases
    the GIL), so decoding and encoding overlap. Decoding stays in one thread, in item order:
    cairo keeps font state between renderings in a process, so a drawing with text can render
    slightly differently after certain others, and decoding in several processes changed the
    features of some drawings (3 of 640); one decoding process beside the encoder kept them
    but was no faster on 2 cores."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    encoder = ImageEncoder() if features_path else None
    n, size = len(data), config.image_size
    features = np.zeros((n, IMAGE_FEATURE_DIM), dtype=np.float32)
    decoded = np.zeros(n, dtype=bool)
    thumbnails = np.full((n, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3), 255, dtype=np.uint8)
    pixels = np.full((n, size, size, 3), 255, dtype=np.uint8) if pixels_path else None
    batches = [np.arange(start, min(start + config.batch_size, n)) for start in range(0, n, config.batch_size)]
    with tqdm(total=n, desc="decode + encode images" if encoder else "decode images",
              unit="img", disable=progress is not True) as bar, ThreadPoolExecutor(1) as reader:
        upcoming = reader.submit(data.images.batch, data.rows[batches[0]], size) if batches else None
        for number, rows in enumerate(batches):
            images = upcoming.result()
            if number + 1 < len(batches):
                upcoming = reader.submit(data.images.batch, data.rows[batches[number + 1]], size)
            ok = [i for i, image in zip(rows, images) if image is not None]
            if len(ok) < len(rows) and config.on_bad_image == "fail":
                bad = next(i for i, image in zip(rows, images) if image is None)
                raise DudchError(f"cannot decode image {data.path[bad]} (item {data.item_id[bad]}); "
                                 f"replace or remove it, or pass --param on_bad_image=skip")
            if ok:
                batch = np.stack([image for image in images if image is not None])
                decoded[ok] = True
                if encoder:
                    features[ok] = encoder.encode(batch)
                    thumbnails[ok] = [_thumbnail(image) for image in batch]
                if pixels is not None:
                    pixels[ok] = batch
            bar.update(len(rows))
            if callable(progress):
                progress(int(rows[-1]) + 1, n)
    if encoder:
        save_npz(features_path, features=features, rendered=decoded, thumbnails=thumbnails)
    if pixels is not None:
        save_npy(pixels_path, pixels)


def _thumbnail(image):
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.BILINEAR))


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
