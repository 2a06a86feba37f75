"""Retrieval with trained codes: encode queries (raw text, image files or feature rows) with the
student's networks, and rank the database by Hamming distance.

A `Retriever` is saved as a folder (`save`/`load`):
  student.pt     the student networks (`dudch.nets.save`)
  encoders.json  how raw inputs become features: {"text": {"kind": "bow", "vocabulary": [...]}
                 | {"kind": "minilm"} | {"kind": "given"}, "image": {"kind": "efficientnet-lite0",
                 "size": 224} | {"kind": "given"}}
  database.npz   codes bit-packed uint8 (n, bits/8), bits, item_id str (n,), text str (n,)
"""

import json
from pathlib import Path

import numpy as np

from dudch import DudchError, nets
from dudch.storage import save_json, save_npz

EXACT_LIMIT = 1_000_000  # above this many database items, search an approximate index


def pack(codes):
    """Codes (n, bits) in {-1, +1} -> uint8 (n, ceil(bits / 8)), bit 1 for +1 (numpy bit order)."""
    return np.packbits(np.asarray(codes) > 0, axis=1)


def unpack(packed, bits):
    """The inverse of `pack`: int8 (n, bits) in {-1, +1}."""
    return np.unpackbits(packed, axis=1, count=bits).astype(np.int8) * 2 - 1


def hamming_ranking(query_codes, database_codes, k):
    """Brute force: (distances int (q, k), rows int (q, k)), nearest first, ties by row."""
    q, d = np.asarray(query_codes, dtype=np.int32), np.asarray(database_codes, dtype=np.int32)
    distances = (q.shape[1] - q @ d.T) // 2
    rows = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, rows, axis=1), rows


class HammingIndex:
    """A faiss binary index over packed codes. "exact" (IndexBinaryFlat) by default; "hnsw" for
    databases over EXACT_LIMIT items (or when asked), approximate and much faster there.
    Exact results equal `hamming_ranking`: ties at the k-th distance are broken by row."""

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

    def search(self, packed_queries, k):
        """(distances int32 (q, k), rows int64 (q, k)), nearest first."""
        k = min(k, self.size)
        queries = np.ascontiguousarray(packed_queries, dtype=np.uint8)
        distances, rows = self.index.search(queries, k)
        if self.method != "exact":
            return distances, rows
        # faiss orders ties arbitrarily: take every item within the k-th distance, sort by
        # (distance, row), keep k. Deterministic, and equal to the brute-force ranking.
        out_d, out_r = np.empty_like(distances), np.empty_like(rows)
        for i in range(len(queries)):  # faiss takes one (strict) radius per call
            _, d, r = self.index.range_search(queries[i:i + 1], int(distances[i, -1]) + 1)
            order = np.lexsort((r, d))[:k]
            out_d[i], out_r[i] = d[order], r[order]
        return out_d, out_r

    def count_at(self, packed_query, distance):
        """How many database items are at exactly `distance` from one packed query code."""
        differing = np.unpackbits(self.packed ^ np.asarray(packed_query, dtype=np.uint8), axis=1).sum(axis=1)
        return int((differing == distance).sum())


class Retriever:
    """The student's encoders plus the database it retrieves from."""

    def __init__(self, student, encoders, packed, bits, item_id, text, index="auto"):
        self.student, self.encoders, self.bits = student, encoders, bits
        self.packed, self.item_id, self.text = packed, np.asarray(item_id), np.asarray(text)
        self.index = HammingIndex(packed, bits, index)
        self._image_encoder = None

    def encode(self, texts=None, images=None, text_features=None, image_features=None):
        """Codes int8 (n, bits) for exactly one kind of query: raw texts (list of str), images
        (list of file paths or of the files' bytes), or feature rows (n, d) of either modality."""
        given = {k: v for k, v in dict(texts=texts, images=images, text_features=text_features,
                                       image_features=image_features).items() if v is not None}
        if len(given) != 1:
            raise DudchError("give exactly one of: texts, images, text_features, image_features")
        (kind, values), = given.items()
        if kind == "texts":
            return nets.branch_codes(self.student, "text", self._text_features(list(values)))
        if kind == "images":
            return nets.branch_codes(self.student, "image", self._image_features(list(values)))
        return nets.branch_codes(self.student, kind.split("_")[0], np.asarray(values, dtype=np.float32))

    def search(self, codes, k=10):
        """(Hamming distances, database rows) of the k nearest to each query code, nearest first."""
        return self.index.search(pack(codes), k)

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
        does not know (for a text), and items that tie with the last one shown (their order is
        only the database's). code: int8 (bits,); distances: the results' Hamming distances."""
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
                notes.append(f"{tied} items tie at the cut-off distance {cut}; the results keep {shown} "
                             f"of them, in database order, not by relevance")
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
        return self._image_encoder.encode(np.stack(pixels))

    def database_codes(self):
        return unpack(self.packed, self.bits)


def save(directory, student_path, encoders, codes, item_id, text):
    """Write a retriever folder from a trained student (its `nets.save` file) and the database's
    codes (int8 (n, bits)), ids and texts."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "student.pt").write_bytes(Path(student_path).read_bytes())
    save_json(directory / "encoders.json", encoders)
    save_npz(directory / "database.npz", codes=pack(codes), bits=np.array(codes.shape[1]),
             item_id=np.asarray(item_id), text=np.asarray(text))


def load(directory, index="auto"):
    directory = Path(directory)
    student, _ = nets.load(directory / "student.pt")
    encoders = json.loads((directory / "encoders.json").read_text())
    with np.load(directory / "database.npz") as saved:
        return Retriever(student, encoders, saved["codes"], int(saved["bits"]), saved["item_id"],
                         saved["text"], index)
