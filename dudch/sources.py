"""Datasets named by a SOURCE string, each read into one `Source`: items, their images (to
decode) or image features (given), their text (words, or a given bag-of-words), and labels.

  openclipart[:DIR]        the embedded default (DIR: data/openclipart)
  mirflickr25k:DIR         Cleared-Set .mat files: IAll (or XAll features), YAll, LAll
  nuswide:DIR              the same layout for NUS-WIDE TC-10
  mirflickr25k-zip:FILE    the original release, turned into the standard protocol
  manifest:FILE            own data: JSONL or CSV, one {"image", "text", "labels"?} per pair

Loading reads metadata and text only; images are decoded later, in batches, by `prepare`.
Labels are carried along for evaluation: `prepare` writes them to a separate output that
training never reads.
"""

import csv
import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from dudch import DudchError, matfile, openclipart, shown
from dudch.features import IMAGE_SUFFIXES, read_image
from dudch.storage import sha256_of

KINDS = ("openclipart", "mirflickr25k", "nuswide", "mirflickr25k-zip", "manifest")
DEFAULT_OPENCLIPART = Path("data") / "openclipart"
MAT_PREFIX = {"mirflickr25k": "mirflickr25k-", "nuswide": "nus-wide-tc10-"}
ZIP_MIN_TAG_COUNT = 20  # MIRFLICKR-25K protocol (DCMH, DJSRH): tags used by >= 20 images


@dataclass
class Source:
    """A dataset of n image-text pairs, before features. Per-item fields are aligned.

    item_id: str (n,), stable across runs.  path: str (n,), where the item came from (display).
    content_keys: str (n,), the identity of each image's content (keys the feature cache).
    images: an image reader (`batch(rows, size)` -> uint8 (size, size, 3) or None each), or None
      when the dataset gives image features instead: image_features float32 (n, d).
    texts: one list of strings per item (tags or a sentence), or None when the dataset gives a
      bag-of-words instead: text_bow float32 (n, V), with its vocabulary (its words) when known.
    labels: uint8 (n, L) with label_names, or None for a label-less dataset.
    rows: int (n,), each item's row in the reader (kept through `subset`).
    """
    kind: str
    item_id: np.ndarray
    path: np.ndarray
    content_keys: np.ndarray
    images: object = None
    image_features: np.ndarray = None
    texts: list = None
    text_bow: np.ndarray = None
    vocabulary: list = None
    drop_words: tuple = ()
    labels: np.ndarray = None
    label_names: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    rows: np.ndarray = None

    def __post_init__(self):
        if self.rows is None:
            self.rows = np.arange(len(self.item_id))

    def __len__(self):
        return len(self.item_id)

    def display_text(self):
        """str (n,): each item's text as people read it (tags joined, or its BoW words)."""
        if self.texts is not None:
            return np.array([", ".join(t) for t in self.texts], dtype=str)
        if self.vocabulary is None:
            return np.full(len(self), "", dtype=str)
        words = np.array(self.vocabulary)
        return np.array([" ".join(words[row > 0]) for row in self.text_bow], dtype=str)

    def image_sha256(self):
        """str (n,): the SHA-256 of each item's image file, as a query by that file hashes it
        (`dudch.retrieval` ranks such exact matches first); "" for items given as features."""
        if self.images is None:
            return np.full(len(self), "", dtype=str)
        return np.array(self.images.sha256(self.rows), dtype=str)

    def subset(self, keep):
        """The items selected by `keep` (a boolean mask or index array), in order."""
        keep = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, dtype=int)
        pick = lambda a: None if a is None else a[keep]
        return replace(self, item_id=self.item_id[keep], path=self.path[keep],
                       content_keys=self.content_keys[keep], image_features=pick(self.image_features),
                       texts=None if self.texts is None else [self.texts[i] for i in keep],
                       text_bow=pick(self.text_bow), labels=pick(self.labels), rows=self.rows[keep],
                       warnings=list(self.warnings))


def parse(source):
    """'KIND[:PATH]' -> (kind, Path or None). Only openclipart may omit the path."""
    kind, _, path = str(source).partition(":")
    if kind not in KINDS:
        raise DudchError(f"unknown dataset {source!r}; use one of: openclipart, mirflickr25k:DIR, "
                         f"nuswide:DIR, mirflickr25k-zip:FILE, manifest:FILE")
    if not path and kind != "openclipart":
        raise DudchError(f"dataset {kind} needs a path: {kind}:{'FILE' if kind in ('manifest', 'mirflickr25k-zip') else 'DIR'}")
    return kind, Path(path) if path else None


def load(source, min_label_size=30):
    """Read the dataset named by `source` (see the module docstring) into a `Source`.

    Rows without any label are left out of the protocol (as DJSRH does) and counted in
    `warnings`, unless the dataset has no labels at all (then `labels` is None).
    """
    kind, path = parse(source)
    if kind == "openclipart":
        data = _openclipart(path or DEFAULT_OPENCLIPART, min_label_size)
    elif kind in MAT_PREFIX:
        data = _cleared_set(path, MAT_PREFIX[kind], kind)
    elif kind == "mirflickr25k-zip":
        data = _mirflickr_zip(path)
    else:
        data = _manifest(path)
    if data.labels is not None:
        unlabelled = data.labels.sum(axis=1) == 0
        if unlabelled.all():
            raise DudchError(f"no item of {source} has a label; fix the labels, or drop them "
                             f"altogether for a label-less run (no mAP)")
        if unlabelled.any():
            data = data.subset(~unlabelled)
            data.warnings.append(f"{int(unlabelled.sum())} items without labels were left out "
                                 f"(DJSRH protocol)")
    return data


# ---- OpenClipart --------------------------------------------------------------------------

def _openclipart(root, min_label_size):
    root = Path(root)
    if not root.is_dir():
        raise DudchError(f"OpenClipart not found at {root}; run `dudch data openclipart`")
    drawings = openclipart.scan(root)
    merged = {}  # one item per distinct file: all its folders' categories, the union of its tags
    for d in drawings:
        item = merged.setdefault(d.sha1, dict(paths=[], tags=[], categories=[]))
        item["paths"].append(d.path)
        item["tags"] += [t for t in d.tags if t not in item["tags"]]
        item["categories"] += [c for c in openclipart.categories(d.path) if c not in item["categories"]]
    ids = sorted(merged)
    items = [merged[k] for k in ids]
    counts = {}
    for it in items:
        for c in it["categories"]:
            counts[c] = counts.get(c, 0) + 1
    label_names = sorted(c for c, n in counts.items() if n >= min_label_size)
    labels = _multi_hot([it["categories"] for it in items], label_names)
    paths = np.array([it["paths"][0] for it in items])
    return Source(kind="openclipart", item_id=np.array(ids), path=paths, content_keys=np.array(ids),
                  images=FileImages([root / p for p in paths]), texts=[it["tags"] for it in items],
                  drop_words=tuple(openclipart.folder_words(d.path for d in drawings)),
                  labels=labels, label_names=label_names)


def _multi_hot(label_lists, label_names):
    index = {name: j for j, name in enumerate(label_names)}
    labels = np.zeros((len(label_lists), len(label_names)), dtype=np.uint8)
    for i, names in enumerate(label_lists):
        labels[i, [index[c] for c in names if c in index]] = 1
    return labels


# ---- Cleared-Set .mat files (MIRFLICKR-25K, NUS-WIDE TC-10) ---------------------------------

def _cleared_set(folder, prefix, kind):
    folder = Path(folder)
    if not folder.is_dir():
        raise DudchError(f"{folder} is not a folder; {kind}:DIR needs the folder holding the "
                         f"{prefix}*.mat files")
    files = sorted(folder.glob("*.mat"))
    if not files:
        raise DudchError(f"no .mat files in {folder}; expected {prefix}iall.mat (or xall), "
                         f"{prefix}yall.mat and {prefix}lall.mat")
    found = {}  # variable name -> the file holding it, named files first
    for path in sorted(files, key=lambda p: not p.name.startswith(prefix)):
        for name in matfile.names(path):
            found.setdefault(name, path)

    def variable(*names):
        for name in names:
            if name in found:
                return matfile.Variable(found[name], name)
        expected = " or ".join(f"{n} (in {prefix}{n.lower()}.mat)" for n in names)
        raise DudchError(f"{folder} has no {expected}; check the download")

    image, text, labels = variable("IAll", "XAll"), variable("YAll"), variable("LAll")
    n = _row_count(image, text, labels)
    warnings = []
    text_rows, text_note = _matrix(text, n)
    label_rows, label_note = _matrix(labels, n)
    warnings += [note for note in (text_note, label_note) if note]
    _check_finite(text.name, text_rows, text.path)
    if not np.isin(label_rows, (0, 1)).all():
        raise DudchError(f"LAll in {labels.path} holds values other than 0 and 1; it must be a "
                         f"multi-hot label matrix")
    digest = sha256_of(image.path)[:16]
    common = dict(kind=kind, item_id=np.array([str(i) for i in range(n)]),
                  path=np.array([f"{image.path.name}#{i}" for i in range(n)]),
                  content_keys=np.array([f"{digest}:{i}" for i in range(n)]),
                  text_bow=text_rows.astype(np.float32),
                  labels=label_rows.astype(np.uint8), label_names=[f"label{j}" for j in range(label_rows.shape[1])],
                  warnings=warnings)
    if image.name == "XAll":
        features, note = _matrix(image, n)
        _check_finite("XAll", features, image.path)
        return Source(image_features=features.astype(np.float32), **common,
                      **({"warnings": warnings + [note]} if note else {}))
    return Source(images=MatImages(image, n), **common)


def _row_count(image, text, labels):
    """The number of items: the row count all three variables agree on, whichever way round
    each is stored (items as MATLAB's first or last axis)."""
    candidates = [{v.shape[0], v.shape[-1]} for v in (image, text, labels)]
    common = set.intersection(*candidates)
    if not common:
        shapes = ", ".join(f"{v.name} {'x'.join(map(str, v.shape))}" for v in (image, text, labels))
        raise DudchError(f"mismatched row counts between modalities ({shapes}); the files must "
                         f"describe the same items")
    return text.shape[0] if text.shape[0] in common else common.pop()


def _matrix(variable, n):
    """A 2-D variable as (n, d); a d x n file is transposed, with a note saying so."""
    if len(variable.shape) != 2:
        raise DudchError(f"{variable.name} in {variable.path} has shape {variable.shape}; expected "
                         f"a 2-D matrix with one row per item")
    values = variable.read()
    if values.shape[0] == n:
        return values, None
    return values.T, f"{variable.name} was stored items-as-columns ({values.shape[0]} x {n}); transposed"


class MatImages:
    """Pixels from a 4-D .mat variable: items along MATLAB's first or last axis, the other three
    (h, w, 3) or (3, h, w)."""

    def __init__(self, variable, n):
        self.variable = variable
        self.axis = 0 if variable.shape[0] == n else len(variable.shape) - 1
        rest = [s for a, s in enumerate(variable.shape) if a != self.axis]
        if len(variable.shape) != 4 or 3 not in (rest[0], rest[-1]):
            raise DudchError(f"{variable.name} in {variable.path} has shape {variable.shape}; expected "
                             f"images as h x w x 3 x n (or n x h x w x 3) uint8")
        self.channel_last = rest[-1] == 3
        self.shape = (n, *(rest if self.channel_last else rest[1:] + rest[:1]))

    def sha256(self, rows):
        return [""] * len(rows)  # pixels, not files: no query file is one of them

    def batch(self, rows, size):
        start, stop = int(min(rows)), int(max(rows)) + 1
        block = np.moveaxis(self.variable.take(self.axis, start, stop), self.axis, 0)
        if not self.channel_last:
            block = np.moveaxis(block, 1, -1)
        images = []
        for r in rows:
            image = np.ascontiguousarray(block[r - start]).astype(np.uint8)
            if image.shape[:2] != (size, size):
                from PIL import Image

                image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
            images.append(image)
        return images


def _check_finite(name, values, path):
    if not np.issubdtype(values.dtype, np.number) or not np.isfinite(values).all():
        raise DudchError(f"{name} in {path} contains NaN or infinite values; fix or regenerate the file")


# ---- The original MIRFLICKR-25K release --------------------------------------------------

_ZIP_IMAGE = re.compile(r"(?:^|/)im(\d+)\.jpg$")
_ZIP_TAGS = re.compile(r"(?:^|/)meta/tags/tags(\d+)\.txt$")
_ZIP_LABEL = re.compile(r"(?:^|/)mirflickr25k_annotations_v080/([a-z_]+)\.txt$")


def _mirflickr_zip(path):
    """mirflickr25k.zip as the standard protocol: the images with at least one tag among those
    used by >= 20 images, a bag-of-words over those tags, the 24 concept labels (the `_r1`
    'relevant' subsets are not separate labels)."""
    path = Path(path)
    if not path.is_file():
        raise DudchError(f"{path} not found; give the path of mirflickr25k.zip")
    try:
        archive = zipfile.ZipFile(path)
        members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        raise DudchError(f"{path} is not a readable zip ({error}); download it again") from None
    images, tags, concepts = {}, {}, {}
    for info in members:
        if m := _ZIP_IMAGE.search(info.filename):
            images[int(m[1])] = info
        elif m := _ZIP_TAGS.search(info.filename):
            tags[int(m[1])] = info
        elif (m := _ZIP_LABEL.search(info.filename)) and not m[1].endswith("_r1") and m[1] != "readme":
            concepts[m[1]] = info
    for what, found in (("im*.jpg images", images), ("meta/tags/tags*.txt files", tags),
                        ("mirflickr25k_annotations_v080/*.txt label files", concepts)):
        if not found:
            raise DudchError(f"{path} has no {what}; expected the MIRFLICKR-25K release layout")
    missing = sorted(set(images) - set(tags))
    if missing:
        raise DudchError(f"{path}: im{missing[0]}.jpg has no meta/tags/tags{missing[0]}.txt "
                         f"({len(missing)} images lack tags); the archive is incomplete")
    try:
        numbers = sorted(images)
        item_tags = {i: sorted({t.strip() for t in archive.read(tags[i]).decode("utf-8", "replace").splitlines() if t.strip()})
                     for i in numbers}
        label_names = sorted(concepts)
        members_of = {c: {int(x) for x in archive.read(concepts[c]).split()} for c in label_names}
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise DudchError(f"{path} is damaged ({error}); download it again") from None
    counts = {}
    for words in item_tags.values():
        for t in words:
            counts[t] = counts.get(t, 0) + 1
    vocabulary = sorted(t for t, c in counts.items() if c >= ZIP_MIN_TAG_COUNT)
    column = {t: j for j, t in enumerate(vocabulary)}
    kept = [i for i in numbers if any(t in column for t in item_tags[i])]
    if not kept:
        raise DudchError(f"{path}: no image has a tag used by {ZIP_MIN_TAG_COUNT} or more images")
    bow = np.zeros((len(kept), len(vocabulary)), dtype=np.float32)
    for row, i in enumerate(kept):
        bow[row, [column[t] for t in item_tags[i] if t in column]] = 1
    labels = np.array([[i in members_of[c] for c in label_names] for i in kept], dtype=np.uint8)
    warnings = [f"{len(numbers) - len(kept)} images have no tag used by >= {ZIP_MIN_TAG_COUNT} "
                f"images and were left out (protocol)"] if len(kept) < len(numbers) else []
    names = [images[i].filename for i in kept]
    return Source(kind="mirflickr25k-zip", item_id=np.array([f"im{i}" for i in kept]),
                  path=np.array(names), content_keys=np.array([f"{images[i].filename}:{images[i].CRC}" for i in kept]),
                  images=ZipImages(path, names), text_bow=bow, vocabulary=vocabulary,
                  labels=labels, label_names=label_names, warnings=warnings)


class ZipImages:
    """JPEG members of a zip; `batch` gives None for one that cannot be decoded."""

    def __init__(self, path, names):
        self.path, self.names = path, names

    def batch(self, rows, size):
        with zipfile.ZipFile(self.path) as archive:
            return [read_image(archive.read(self.names[r]), size, svg=False) for r in rows]

    def sha256(self, rows):
        with zipfile.ZipFile(self.path) as archive:
            return [hashlib.sha256(archive.read(self.names[r])).hexdigest() for r in rows]


# ---- Own data: a manifest -----------------------------------------------------------------

MANIFEST_EXAMPLE = '{"image": "images/cat.jpg", "text": "a cat on a sofa", "labels": ["cat"]}'


def _manifest(path):
    """JSONL (one object per line) or CSV (columns image,text[,labels]; labels '|'-separated).
    Image paths are relative to the manifest's folder and may not leave it."""
    path = Path(path)
    if not path.is_file():
        raise DudchError(f"manifest {path} not found; give manifest:FILE with one record per pair, "
                         f"e.g. {MANIFEST_EXAMPLE}")
    records = list(_manifest_records(path))
    if not records:
        raise DudchError(f"manifest {path} is empty; add one record per image-text pair, e.g. "
                         f"{MANIFEST_EXAMPLE}")
    folder = path.parent.resolve()
    images, texts, label_lists, ids, seen = [], [], [], [], {}
    has_labels = any(r.get("labels") not in (None, "", []) for _, r in records)
    for line, record in records:
        where = f"{path}:{line}"
        if not isinstance(record.get("image"), str) or not record["image"]:
            raise DudchError(f"{where}: no \"image\" path; each record needs one, e.g. {MANIFEST_EXAMPLE}")
        if not isinstance(record.get("text"), str):
            raise DudchError(f"{where}: no \"text\" string; each record needs one (it may be empty)")
        try:
            image = (folder / record["image"]).resolve()
        except (ValueError, OSError, RuntimeError):  # a NUL byte, a symlink loop
            raise DudchError(f"{where}: image {shown(record['image'])} is not a usable path (a NUL "
                             f"byte or a symlink loop); fix the record") from None
        if not image.is_relative_to(folder):
            raise DudchError(f"{where}: image {record['image']!r} is outside the manifest's folder "
                             f"{folder}; move it below that folder")
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            raise DudchError(f"{where}: {record['image']} is not PNG, JPEG or SVG")
        if not image.is_file():
            raise DudchError(f"{where}: image {record['image']} not found (looked in {folder})")
        labels = record.get("labels") or []
        if isinstance(labels, str):
            labels = [x for x in labels.split("|") if x]
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise DudchError(f"{where}: \"labels\" must be a list of strings")
        name = record["image"]
        seen[name] = seen.get(name, 0) + 1
        ids.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
        images.append(image)
        texts.append([record["text"]])
        label_lists.append(labels)
    label_names = sorted({x for labels in label_lists for x in labels})
    digest_of = {}  # a file listed many times is hashed once
    for image in images:
        if image not in digest_of:
            digest_of[image] = sha256_of(image)[:16]
    content_keys = np.array([digest_of[image] for image in images])
    first_row = {}
    repeats = [row for row, key in enumerate(content_keys) if first_row.setdefault(key, row) != row]
    warnings = [f"{len(repeats)} of {len(records)} records repeat an image listed before (first "
                f"{ids[repeats[0]]}, the same file as {ids[first_row[content_keys[repeats[0]]]]}); list each "
                f"pair once: duplicates can inflate mAP"] if repeats else []
    return Source(kind="manifest", item_id=np.array(ids), path=np.array([str(p.relative_to(folder)) for p in images]),
                  content_keys=content_keys, images=FileImages(images), texts=texts,
                  labels=_multi_hot(label_lists, label_names) if has_labels else None,
                  label_names=label_names if has_labels else [], warnings=warnings)


def _manifest_records(path):
    """(line number, record dict) for each non-blank record."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheets start CSV files with a BOM
    except (OSError, UnicodeDecodeError) as error:
        raise DudchError(f"cannot read manifest {path} ({error}); it must be UTF-8 text") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"image", "text"} <= set(reader.fieldnames):
            raise DudchError(f"{path}: the CSV header must name the columns image,text[,labels]")
        for line, row in enumerate(reader, start=2):
            if any((v or "").strip() for v in row.values()):
                yield line, row
        return
    for line, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as error:
                raise DudchError(f"{path}:{line} is not valid JSON ({error.msg}); write one object "
                                 f"per line, e.g. {MANIFEST_EXAMPLE}") from None
            if not isinstance(record, dict):
                raise DudchError(f"{path}:{line} is not a JSON object; e.g. {MANIFEST_EXAMPLE}")
            yield line, record


class FileImages:
    """Image files (SVG, PNG, JPEG); `batch` gives None for one that cannot be decoded."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]

    def batch(self, rows, size):
        return [read_image(self.paths[r], size) for r in rows]

    def sha256(self, rows):
        return [sha256_of(self.paths[r]) for r in rows]

    def problems(self):
        """{path: why it will not decode} from what can be seen without decoding: the file's
        size, and a raster's header (its format and pixel count)."""
        from PIL import Image

        from dudch.features import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

        found = {}
        for path in self.paths:
            size = path.stat().st_size
            if size == 0 or size > MAX_IMAGE_BYTES:
                found[path] = "empty" if size == 0 else f"over {MAX_IMAGE_BYTES // 2**20} MiB"
            elif path.suffix.lower() != ".svg":
                try:
                    with Image.open(path) as image:
                        pixels = image.width * image.height
                except Image.DecompressionBombError:  # PIL's own guard, far above ours
                    pixels = MAX_IMAGE_PIXELS + 1
                except Exception:  # PIL raises several types for what is no image
                    found[path] = "not a PNG or JPEG"
                    continue
                if pixels > MAX_IMAGE_PIXELS:
                    found[path] = f"over {MAX_IMAGE_PIXELS:,} pixels"
        return found
