"""Retrieval with trained codes: encode queries (raw text, image files or feature rows) with the
student's networks, and rank the database by Hamming distance, items as near ordered by how
much the query's output before rounding agrees with their codes. Items that hold exactly the
query (its image file, or its text) can be ranked first (`Retriever.exact_matches`): codes are
short, many items share one, and a catalogue should find its own item.

A `Retriever` is saved as a folder (`save`/`load`):
  student.pt     the student networks (`dudch.nets.save`)
  encoders.json  how raw inputs become features: {"text": {"kind": "bow", "vocabulary": [...]}
                 | {"kind": "minilm"} | {"kind": "given"}, "image": {"kind": "efficientnet-lite0",
                 "size": 224} | {"kind": "given"}}
  database.npz   codes bit-packed uint8 (n, bits/8), bits, item_id str (n,), text str (n,),
                 image_sha256 str (n,): each item's image file's SHA-256, "" where it has none
                 (given features; a model registered before these were kept)
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from dudch import DudchError, first_line, nets
from dudch.storage import save_json, save_npz, sha256_of

EXACT_LIMIT = 1_000_000  # above this many database items, search an approximate index
ENCODE_BATCH = 64  # images encoded at once by a query


def pack(codes):
    """Codes (n, bits) in {-1, +1} -> uint8 (n, ceil(bits / 8)), bit 1 for +1 (numpy bit order)."""
    return np.packbits(np.asarray(codes) > 0, axis=1)


def unpack(packed, bits):
    """The inverse of `pack`: int8 (n, bits) in {-1, +1}."""
    return np.unpackbits(packed, axis=1, count=bits).astype(np.int8) * 2 - 1


def normalised_text(text):
    """A text as exact matching compares it: case and runs of white space aside."""
    return " ".join(str(text).casefold().split())


def agreement(query, codes):
    """q . b for one query's outputs q float (bits,) and each code b of codes (m, bits): among
    codes at one Hamming distance from sign(q), the larger, the more of q's weight lies on the
    bits they share with it. Each row is summed alone, so equal codes score exactly equal."""
    return (codes * np.asarray(query, dtype=np.float64)).sum(axis=1)


def hamming_ranking(queries, database_codes, k):
    """Brute force, the reference for `HammingIndex`: (distances int (q, k), rows int (q, k)),
    nearest first, items as near by `agreement` with the query, then by row. queries (q, bits):
    codes in {-1, +1} (whose ties then go by row alone) or continuous outputs."""
    queries, codes = np.asarray(queries, dtype=np.float64), np.asarray(database_codes)
    distances = (queries.shape[1] - nets.sign(queries).astype(np.int32) @ codes.astype(np.int32).T) // 2
    rows = np.stack([np.lexsort((np.arange(len(codes)), -agreement(query, codes), d))[:k]
                     for query, d in zip(queries, distances)])
    return np.take_along_axis(distances, rows, axis=1), rows


class HammingIndex:
    """A faiss binary index over packed codes. "exact" (IndexBinaryFlat) by default; "hnsw" for
    databases over EXACT_LIMIT items (or when asked), approximate and much faster there.
    Exact results rank by Hamming distance, then by `agreement` (for +-1 queries the same for
    every item as near, so those give `hamming_ranking`), then by row."""

    def __init__(self, packed, bits, method="auto"):
        import faiss

        if method == "auto":
            method = "exact" if len(packed) <= EXACT_LIMIT else "hnsw"
        if method not in ("exact", "hnsw"):
            raise DudchError(f"unknown index {method!r}: exact or hnsw")
        width = packed.shape[1] * 8
        self.method, self.bits, self.size, self.packed = method, bits, len(packed), packed
        self.index = faiss.IndexBinaryFlat(width) if method == "exact" else faiss.IndexBinaryHNSW(width, 32)
        self.index.add(np.ascontiguousarray(packed, dtype=np.uint8))

    def search(self, queries, k):
        """(distances int32 (q, k), rows int64 (q, k)), nearest first. queries (q, bits): codes
        in {-1, +1}, or a query's continuous outputs (their signs are its code)."""
        k = min(k, self.size)
        queries = np.asarray(queries, dtype=np.float64)
        packed = np.ascontiguousarray(pack(nets.sign(queries)), dtype=np.uint8)
        distances, rows = self.index.search(packed, k)
        if self.method != "exact":
            return distances, rows
        # faiss orders ties arbitrarily: take every item within the k-th distance, sort by
        # (distance, -agreement, row), keep k. Deterministic; ties that remain go by row.
        out_d, out_r = np.empty_like(distances), np.empty_like(rows)
        for i in range(len(queries)):  # faiss takes one (strict) radius per call
            _, d, r = self.index.range_search(packed[i:i + 1], int(distances[i, -1]) + 1)
            order = np.lexsort((r, -agreement(queries[i], unpack(self.packed[r], self.bits)), d))[:k]
            out_d[i], out_r[i] = d[order], r[order]
        return out_d, out_r

    def count_at(self, packed_query, distance):
        """How many database items are at exactly `distance` from one packed query code."""
        differing = np.unpackbits(self.packed ^ np.asarray(packed_query, dtype=np.uint8), axis=1).sum(axis=1)
        return int((differing == distance).sum())


class Retriever:
    """The student's encoders plus the database it retrieves from."""

    def __init__(self, student, encoders, packed, bits, item_id, text, image_sha256=None, index="auto"):
        self.student, self.encoders, self.bits = student, encoders, bits
        self.packed, self.item_id, self.text = packed, np.asarray(item_id), np.asarray(text)
        self.image_sha256 = np.full(len(packed), "") if image_sha256 is None else np.asarray(image_sha256)
        self.index = HammingIndex(packed, bits, index)
        self._image_encoder, self._rows_of = None, None

    def outputs(self, texts=None, images=None, text_features=None, image_features=None):
        """The student's continuous outputs u = tanh(g(x)), float32 (n, bits) in (-1, 1), for
        exactly one kind of query: raw texts (list of str), images (list of file paths or of the
        files' bytes), or feature rows (n, d) of either modality. Their signs are the codes."""
        given = {k: v for k, v in dict(texts=texts, images=images, text_features=text_features,
                                       image_features=image_features).items() if v is not None}
        if len(given) != 1:
            raise DudchError("give exactly one of: texts, images, text_features, image_features")
        (kind, values), = given.items()
        if kind == "texts":
            modality, x = "text", self._text_features(list(values))
        elif kind == "images":
            modality, x = "image", self._image_features(list(values))
        else:
            modality, x = kind.split("_")[0], np.asarray(values, dtype=np.float32)
        return np.tanh(nets.branch_outputs(self.student, modality, x))

    def encode(self, **query):
        """Codes int8 (n, bits) of a query, as `outputs` takes it: the signs of its outputs."""
        return nets.sign(self.outputs(**query))

    def search(self, queries, k=10, first=None):
        """(Hamming distances, database rows) of the k nearest to each query, nearest first:
        queries are codes int8 (q, bits), or `outputs` (q, bits), which also order the items
        as near by their agreement with the query (`agreement`). first: for each query, rows
        (as `exact_matches` gives them) that come before all others, ranked among themselves
        as the others are (Hamming distance, agreement, row)."""
        distances, rows = self.index.search(queries, k)
        if first is None:
            return distances, rows
        out_d, out_r = distances.copy(), rows.copy()
        for i, lead in enumerate(first):
            lead = np.asarray(lead, dtype=rows.dtype)
            if len(lead):
                query, codes = np.asarray(queries[i], dtype=np.float64), self.database_codes_of(lead)
                lead_d = (self.bits - codes.astype(np.int32) @ nets.sign(query).astype(np.int32)) // 2
                order = np.lexsort((lead, -agreement(query, codes), lead_d))[:rows.shape[1]]
                lead, lead_d = lead[order], lead_d[order]
                rest = ~np.isin(rows[i], lead)  # leaves at least k - len(lead) rows
                out_r[i] = np.concatenate([lead, rows[i][rest]])[:rows.shape[1]]
                out_d[i] = np.concatenate([lead_d, distances[i][rest]])[:rows.shape[1]]
        return out_d, out_r

    def exact_matches(self, texts=None, images=None):
        """For each query, the database rows (int64, in database order) that hold exactly it:
        its text (case and white space aside, `normalised_text`) for texts (list of str), its
        image file (the same bytes) for images (list of file paths or of the files' bytes). An
        empty text matches nothing (items without text are not each other's copies)."""
        if (texts is None) == (images is None):
            raise DudchError("give exactly one of: texts, images")
        if self._rows_of is None:
            self._rows_of = {"text": {}, "image": {}}
            for row, (text, digest) in enumerate(zip(self.text.tolist(), self.image_sha256.tolist())):
                for kind, key in (("text", normalised_text(text)), ("image", digest)):
                    if key:  # an empty text or a missing digest matches nothing
                        self._rows_of[kind].setdefault(key, []).append(row)
        if texts is not None:
            keys, rows_of = [normalised_text(t) for t in texts], self._rows_of["text"]
        else:
            keys, rows_of = [image_digest(i) for i in images], self._rows_of["image"]
        return [np.array(rows_of.get(key, []), dtype=np.int64) for key in keys]

    def unknown_words(self, text):
        """The words of a text query that the model's bag-of-words vocabulary lacks (they are
        ignored when encoding it); empty for other text encoders."""
        from dudch.features import tokenize

        spec = self.encoders["text"]
        if spec["kind"] != "bow":
            return []
        known = set(spec["vocabulary"])
        return [w for w in tokenize(text) if w not in known]

    def warnings(self, code, distances, text=None):
        """What a person should know about one query's results, in words: query words the model
        does not know (for a text), and items at the last distance shown that did not make the
        cut. code: int8 (bits,); distances: the results' Hamming distances."""
        from dudch.features import tokenize

        notes = []
        if text is not None and self.encoders["text"]["kind"] == "bow":
            unknown, size = self.unknown_words(text), len(self.encoders["text"]["vocabulary"])
            if len(unknown) == len(tokenize(text)):
                notes.append(f"no query word is in the model's vocabulary of {size} words, so the "
                             f"ranking is arbitrary")
            elif unknown:
                notes.append(f"not in the model's vocabulary of {size} words, ignored: {', '.join(unknown)}")
        if len(distances):
            cut = int(distances[-1])
            tied, shown = self.index.count_at(pack(code[None])[0], cut), int((np.asarray(distances) == cut).sum())
            if tied > shown:
                kept = "the one of them that agrees" if shown == 1 else f"the {shown} of them that agree"
                notes.append(f"{tied} items tie at the cut-off distance {cut}; the results keep {kept} most "
                             f"with the query before rounding")
        return "; ".join(notes)

    def _text_features(self, texts):
        from dudch.features import bag_of_words_for, minilm_embeddings

        spec = self.encoders["text"]
        if spec["kind"] == "bow":
            return bag_of_words_for(texts, spec["vocabulary"])
        if spec["kind"] == "minilm":
            return minilm_embeddings(texts)
        raise DudchError("this model was trained on given text features, not text: query with "
                         "text feature rows instead")

    def _image_features(self, images):
        from dudch.features import ImageEncoder, read_image

        spec = self.encoders["image"]
        if spec["kind"] == "given":
            raise DudchError("this model was trained on given image features, not images: query "
                             "with image feature rows instead")
        pixels = []
        for number, image in enumerate(images):
            name = f"image {image}" if not isinstance(image, bytes) else f"image {number}"
            if not isinstance(image, bytes) and not Path(image).is_file():
                raise DudchError(f"{name} not found")
            decoded = read_image(image, spec["size"])
            if decoded is None:
                raise DudchError(f"cannot decode {name}; PNG, JPEG or SVG (up to 32 MiB, 64 megapixels)")
            pixels.append(decoded)
        if self._image_encoder is None:
            self._image_encoder = ImageEncoder()
        # In batches, as the prepare stage encodes: 256 images at once hold about a GB of activations.
        return np.concatenate([self._image_encoder.encode(np.stack(pixels[start:start + ENCODE_BATCH]))
                               for start in range(0, len(pixels), ENCODE_BATCH)])

    def database_codes(self):
        return unpack(self.packed, self.bits)

    def database_codes_of(self, rows):
        return unpack(self.packed[rows], self.bits)


def image_digest(image):
    """Hex SHA-256 of an image file (a path) or of its bytes, as the database keeps it."""
    return hashlib.sha256(image).hexdigest() if isinstance(image, bytes) else sha256_of(image)


def save(directory, student_path, encoders, codes, item_id, text, image_sha256):
    """Write a retriever folder from a trained student (its `nets.save` file) and the database's
    codes (int8 (n, bits)), ids, texts and image digests (str (n,), "" for none)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "student.pt").write_bytes(Path(student_path).read_bytes())
    save_json(directory / "encoders.json", encoders)
    _save_database(directory, pack(codes), codes.shape[1], item_id, text, image_sha256)


def _save_database(directory, packed, bits, item_id, text, image_sha256):
    save_npz(Path(directory) / "database.npz", codes=packed, bits=np.array(bits),
             item_id=np.asarray(item_id, dtype=str), text=np.asarray(text, dtype=str),
             image_sha256=np.asarray(image_sha256, dtype=str))


def joint_codes(student, image, text):
    """Database codes int8 (n, bits) for new pairs from the student's networks alone:
    sign(u + v), u = tanh(g_I(x)), v = tanh(g_T(y)) (image float32 (n, d_image), text float32
    (n, d_text)). A new item has no similarity to the others (the teacher is not part of the
    model), so of the student's objective only gamma (||b - u||^2 + ||b - v||^2) speaks about its
    code, and sign(u + v) is its minimiser over {-1, +1}^bits: one code serving both directions,
    as the DCC codes do. benchmarks/index_growth.py measures it against either modality alone."""
    h_image, h_text = nets.hash_outputs(student, image, text)
    return nets.sign(np.tanh(h_image) + np.tanh(h_text))


def item_features(source, encoders, student, cache_dir, progress=True):
    """The items of a dataset (a SOURCE, `dudch.sources`) as a model's encoders make them, for
    adding to its database: {"item_id": str (n,), "text": str (n,) as shown in results,
    "image_sha256": str (n,) (`image_digest`, "" for given features), "image": float32
    (n, image_dim), "text_features": float32 (n, text_dim), "warnings": [str]}.
    Images go through the same decoding, encoder and feature cache as the prepare stage; items
    whose image cannot be decoded are left out and counted in the warnings. A dataset whose
    features cannot be the model's (other image features, a bag-of-words of unknown words or
    another width) is refused with a DudchError."""
    from dudch import prepare, sources
    from dudch.features import bag_of_words_for, minilm_embeddings

    data = sources.load(source, min_label_size=1)  # labels play no part here
    warnings = list(data.warnings)
    dims, text_spec, image_spec = student.dims, encoders["text"], encoders["image"]
    if image_spec["kind"] == "given":
        image = _given_features(source, data.image_features, dims["image_dim"], "image", "images")
    else:
        if data.images is None:
            raise DudchError(f"{source} gives image features, but the model encodes images with "
                             f"{image_spec['kind']}; add items as image files")
        config = prepare.PrepareConfig(image_size=image_spec["size"])
        image, decoded, _, _ = prepare.cached_image_features(data, cache_dir, config, progress, None, warnings)
        if not decoded.all():
            bad = data.path[~decoded]
            warnings.append(f"{len(bad)} images could not be decoded and were left out: {', '.join(bad[:3])}"
                            + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))
            data, image = data.subset(decoded), image[decoded]
    words_known = data.texts is not None or data.vocabulary is not None
    if text_spec["kind"] == "given":
        text = _given_features(source, data.text_bow, dims["text_dim"], "text", "texts")
    elif not words_known or (text_spec["kind"] == "minilm" and data.texts is None):
        raise DudchError(f"{source} gives a bag-of-words without its words, but the model encodes "
                         f"{'sentences' if text_spec['kind'] == 'minilm' else 'words of its vocabulary'}; "
                         f"add items with their texts (e.g. a manifest)")
    elif text_spec["kind"] == "bow":
        text = bag_of_words_for(data.display_text().tolist(), text_spec["vocabulary"])
    else:
        text = minilm_embeddings(data.display_text().tolist())
    image, text = nets.check_pairs(image, text)
    return dict(item_id=data.item_id, text=data.display_text(), image_sha256=data.image_sha256(), image=image,
                text_features=text, warnings=warnings)


def _given_features(source, values, width, modality, instead):
    """The dataset's given `modality` features when they are as wide as the model's, else a
    DudchError (`instead`: what the dataset gives when it gives none)."""
    if values is None or values.shape[1] != width:
        given = instead if values is None else f"{modality} features of width {values.shape[1]}"
        raise DudchError(f"{source} gives {given}, but the model was trained on given {modality} features of "
                         f"width {width}; add items with the same {modality} features (the same columns)")
    return values


def grow(retriever, directory, codes, item_id, text, image_sha256):
    """Write the database of `retriever` with items appended into the retriever folder
    `directory` (a copy of its own folder: networks and encoders stay as they are): codes int8
    (m, bits), ids, texts and image digests str (m,). Ids it holds already, or given twice, are
    refused."""
    item_id = np.asarray(item_id, dtype=str)
    if codes.shape[1] != retriever.bits or not len(codes) == len(item_id) == len(text) == len(image_sha256):
        raise DudchError(f"new items need {retriever.bits}-bit codes, one per id, text and image digest")
    held = np.isin(item_id, retriever.item_id)
    if held.any() or len(set(item_id)) < len(item_id):
        raise DudchError(f"item {item_id[held][0] if held.any() else item_id[0]} is already in the index "
                         f"(or given twice); an id is added once")
    _save_database(directory, np.concatenate([retriever.packed, pack(codes)]), retriever.bits,
                   np.concatenate([retriever.item_id.astype(str), item_id]),
                   np.concatenate([retriever.text.astype(str), np.asarray(text, dtype=str)]),
                   np.concatenate([retriever.image_sha256.astype(str), np.asarray(image_sha256, dtype=str)]))


def shrink(retriever, directory, item_ids):
    """Write the database of `retriever` without the items `item_ids` (ids it does not hold are
    ignored) into the retriever folder `directory`, as `grow` does. At least one item stays."""
    keep = ~np.isin(retriever.item_id, np.asarray(item_ids, dtype=str))
    if not keep.any():
        raise DudchError("that would remove every item of the index; keep at least one")
    _save_database(directory, retriever.packed[keep], retriever.bits, retriever.item_id[keep],
                   retriever.text[keep], retriever.image_sha256[keep])


def load(directory, index="auto"):
    """The Retriever saved in `directory` (see the module docstring). Its arrays are checked:
    a file that is missing, unreadable, holds objects (pickles) or arrays of the wrong kind is a
    DudchError, never loaded."""
    directory = Path(directory)
    student, _ = nets.load(directory / "student.pt")
    try:
        encoders = json.loads((directory / "encoders.json").read_text())
        with np.load(directory / "database.npz", allow_pickle=False) as saved:
            arrays = {k: saved[k] for k in ("codes", "bits", "item_id", "text", "image_sha256") if k in saved.files}
    except (OSError, ValueError) as error:
        raise DudchError(f"cannot read the retrieval model in {directory} ({first_line(error)}); register it "
                         f"again with `dudch promote`") from None
    problem = _database_problem(arrays)
    if problem:
        raise DudchError(f"the retrieval model in {directory} is damaged: database.npz {problem}; register it "
                         f"again with `dudch promote`")
    return Retriever(student, encoders, arrays["codes"], int(arrays["bits"]), arrays["item_id"], arrays["text"],
                     arrays.get("image_sha256"), index)


def _database_problem(arrays):
    """Why database.npz arrays cannot be a database, or None."""
    missing = [k for k in ("codes", "bits", "item_id", "text") if k not in arrays]
    if missing:
        return f"lacks {', '.join(missing)}"
    codes, bits, item_id, text = (arrays[k] for k in ("codes", "bits", "item_id", "text"))
    if bits.shape != () or bits.dtype.kind not in "iu" or not 1 <= int(bits) <= 8 * max(1, codes.shape[-1]):
        return f"has bits {bits!r}, not a code length"
    if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != (int(bits) + 7) // 8 or not len(codes):
        return f"has codes {codes.dtype} {codes.shape}, not {int(bits)}-bit codes packed as uint8 rows"
    if item_id.dtype.kind != "U" or text.dtype.kind != "U" or item_id.shape != (len(codes),) or text.shape != (len(codes),):
        return f"has ids {item_id.dtype} {item_id.shape} and texts {text.dtype} {text.shape}, not one string each per code"
    digests = arrays.get("image_sha256")
    if digests is not None and (digests.dtype.kind != "U" or digests.shape != (len(codes),)):
        return f"has image_sha256 {digests.dtype} {digests.shape}, not one string per code"
    return None
