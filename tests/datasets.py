"""Small datasets in the users' formats, built from real OpenClipart drawings: the Cleared-Set
.mat files (MATLAB v5 and v7.3/HDF5), the original MIRFLICKR-25K zip, and manifests."""

import io
import json
import zipfile

import h5py
import numpy as np
from PIL import Image
from scipy.io import savemat

from dudch import sources
from dudch.features import encode_text

MATLAB_73_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Thu Nov 26 12:00:00 2026 HDF5 schema 1.00 ."


def real_items(openclipart_root, n, size=224):
    """(pixels uint8 (n, size, size, 3), BoW float32 (n, V), labels uint8 (n, L), tags): the first
    n decodable labelled drawings."""
    data = sources.load(f"openclipart:{openclipart_root}", min_label_size=1)
    picked, pixels = [], []
    for row in range(len(data)):
        (image,) = data.images.batch([data.rows[row]], size)
        if image is not None:
            picked.append(row)
            pixels.append(image)
        if len(picked) == n:
            break
    data = data.subset(picked)
    bow, _ = encode_text(data, min_word_count=1)
    labels = data.labels[:, data.labels.sum(axis=0) > 0]
    return np.stack(pixels), bow, labels, data.texts


def write_mat(path, hdf5=False, **arrays):
    """Arrays given in MATLAB order, written as MATLAB does: v5 by scipy, or v7.3 as HDF5 with
    the axes reversed behind MATLAB's 512-byte header."""
    if not hdf5:
        savemat(str(path), arrays)
        return
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, array in arrays.items():
            f.create_dataset(name, data=np.asarray(array).transpose())
    with open(path, "r+b") as f:
        f.write(MATLAB_73_HEADER.ljust(128, b" "))


def cleared_set(folder, pixels, bow, labels, prefix="mirflickr25k-", hdf5=False, features=None):
    """IAll as h x w x 3 x n (or XAll n x d when `features` is given), YAll n x V, LAll n x L."""
    folder.mkdir(parents=True, exist_ok=True)
    if features is None:
        write_mat(folder / f"{prefix}iall.mat", hdf5, IAll=np.moveaxis(pixels, 0, -1))
    else:
        write_mat(folder / f"{prefix}xall.mat", hdf5, XAll=features)
    write_mat(folder / f"{prefix}yall.mat", hdf5, YAll=bow)
    write_mat(folder / f"{prefix}lall.mat", hdf5, LAll=labels.astype(np.float64))
    return folder


def jpeg_bytes(pixels):
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


def mirflickr_zip(path, pixels, tags, concepts):
    """The release layout: mirflickr/im{i}.jpg, mirflickr/meta/tags/tags{i}.txt (one tag per
    line), mirflickr25k_annotations_v080/{concept}.txt (image numbers), plus an _r1 file and a
    README that are not labels."""
    with zipfile.ZipFile(path, "w") as archive:
        for i, (image, image_tags) in enumerate(zip(pixels, tags), start=1):
            archive.writestr(f"mirflickr/im{i}.jpg", jpeg_bytes(image))
            archive.writestr(f"mirflickr/meta/tags/tags{i}.txt", "\n".join(image_tags) + "\n")
        for concept, numbers in concepts.items():
            archive.writestr(f"mirflickr25k_annotations_v080/{concept}.txt", "\n".join(map(str, numbers)) + "\n")
        archive.writestr("mirflickr25k_annotations_v080/sky_r1.txt", "1\n")
        archive.writestr("mirflickr25k_annotations_v080/README.txt", "annotations\n")
    return path


def manifest(folder, pixels, texts, labels=None, svg_sources=(), csv=False):
    """images/{i}.png or .jpg (alternating), then the given SVG files, and a manifest over them."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, image in enumerate(pixels):
        name = f"images/{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(image).save(folder / name)
        records.append(dict(image=name, text=texts[i]))
    for j, svg in enumerate(svg_sources):
        name = f"images/drawing{j}.svg"
        (folder / name).write_bytes(svg.read_bytes())
        records.append(dict(image=name, text=texts[len(pixels) + j]))
    if labels is not None:
        for record, record_labels in zip(records, labels):
            record["labels"] = record_labels
    if csv:
        lines = ["image,text,labels"] + [f"{r['image']},\"{r['text']}\",{'|'.join(r.get('labels', []))}" for r in records]
        path = folder / "pairs.csv"
        path.write_text("\n".join(lines) + "\n")
    else:
        path = folder / "pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def drawings_manifest(folder, openclipart_root, n):
    """A manifest over the first `n` real drawings, as a user's own data: their SVG files, their
    tags as text, their folder as label. Returns the manifest's path."""
    from dudch import openclipart

    (folder / "images").mkdir(parents=True)
    records = []
    for path in sorted(openclipart_root.glob("*/*.svg"))[:n]:
        name = f"images/{len(records)}.svg"
        (folder / name).write_bytes(path.read_bytes())
        records.append(dict(image=name, text=" ".join(openclipart.parse_tags(path.read_bytes())),
                            labels=[path.parent.name]))
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder / "pairs.jsonl"
