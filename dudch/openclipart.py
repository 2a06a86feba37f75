"""The embedded dataset: Debian's `openclipart-svg` package, fetched, verified and parsed.

Each drawing is an SVG file in a category folder (`animals/birds/owl.svg`) with tags in its
RDF metadata (`<dc:subject><rdf:Bag><rdf:li>owl</rdf:li>...`). Items are identified by the
SHA-1 of their bytes, never by their path: the path holds the category (the label), and
training must not be able to see it.
"""

import hashlib
import html
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dudch import DudchError
from dudch.storage import atomic_dir, sha256_of

PACKAGE = "openclipart-svg"
VERSION = "1:0.18+dfsg-19"
ARCHIVE_NAME = "openclipart-svg_0.18+dfsg-19_all.deb"
ARCHIVE_SHA256 = "989712d90d57dfa3230049f553bb43b76c30ee4d4b8c5f6e106e33f7db5cbdc5"
SVG_ROOT_IN_ARCHIVE = Path("usr/share/openclipart/svg")

# Folders of machine-generated drawings (colour swatches, procedurally drawn stars) and the
# uncategorised bin: they carry no semantic category, so they are left out of the protocol.
EXCLUDED_FOLDERS = ("shapes/stars", "special/gradients", "special/patterns", "unsorted")

_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_ITEM = re.compile(r"<rdf:li>(.*?)</rdf:li>", re.S)


@dataclass(frozen=True)
class Drawing:
    sha1: str  # hex digest of the file's bytes: the item's identity
    path: str  # relative to the dataset root, e.g. "animals/birds/owl.svg"
    tags: tuple  # the dc:subject entries, unescaped, as written


def fetch(dest, downloads, archive=None):
    """Obtain the pinned package, check its SHA-256 and extract its SVG tree into `dest`.

    `archive` is a local copy of the .deb (for offline machines); without it the package is
    downloaded with `apt-get download` into `downloads`. The extraction happens in a sibling
    temporary folder that replaces `dest` only once it is complete.
    """
    if archive is None:
        archive = Path(downloads) / ARCHIVE_NAME
        if not archive.exists():
            _apt_download(Path(downloads))
    archive = Path(archive)
    if not archive.is_file():
        raise DudchError(f"archive not found: {archive}; pass an existing .deb with --archive, "
                         f"or omit --archive to download {PACKAGE}={VERSION}")
    remove_leftovers(Path(dest))
    digest = sha256_of(archive)
    if digest != ARCHIVE_SHA256:
        raise DudchError(f"corrupt archive {archive}: SHA-256 {digest[:12]}... is not the pinned "
                         f"{ARCHIVE_SHA256[:12]}...; delete it and rerun `dudch data openclipart`")
    with atomic_dir(dest) as tmp, tempfile.TemporaryDirectory(prefix=f".{Path(dest).name}-unpack-", dir=tmp.parent) as unpacked:
        done = subprocess.run(["dpkg-deb", "-x", str(archive), unpacked],
                              capture_output=True, text=True)
        svg_root = Path(unpacked) / SVG_ROOT_IN_ARCHIVE
        if done.returncode != 0 or not svg_root.is_dir():
            reason = (done.stderr.strip().splitlines() or ["no SVG folder inside"])[0]
            raise DudchError(f"cannot extract {archive} ({reason}); delete it and rerun "
                             f"`dudch data openclipart`")
        for child in svg_root.iterdir():
            shutil.move(str(child), tmp / child.name)
    return Path(dest)


def remove_leftovers(dest):
    """Remove what an interrupted extraction into `dest` left beside it (the half-built tree, the
    unpacked package, the replaced tree; also the unpack folders of earlier versions, `tmp*`
    holding the package's SVG tree): stray files below data/ would fail the DVC check of every
    later run."""
    parent, name = dest.parent, dest.name
    if not parent.is_dir():
        return
    ours = [*parent.glob(f".{name}.*.partial"), *parent.glob(f".{name}-unpack-*"), parent / f".{name}.old",
            *(p for p in parent.glob("tmp*") if (p / SVG_ROOT_IN_ARCHIVE).is_dir())]
    for leftover in ours:
        shutil.rmtree(leftover, ignore_errors=True)


def _apt_download(downloads):
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        command = ["apt-get", "download", f"{PACKAGE}={VERSION}"]
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0 and "Unable to locate" in done.stderr and _is_root():
            # A fresh machine has no package lists yet; root may fetch them.
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if done.returncode != 0 or len(debs) != 1:
            reason = (done.stderr.strip().splitlines() or ["no .deb written"])[-1]
            raise DudchError(f"apt-get download {PACKAGE}={VERSION} failed ({reason}); run "
                             f"`apt-get update` first, or pass a local copy with --archive")
        debs[0].replace(downloads / ARCHIVE_NAME)


def _is_root():
    import os

    return os.geteuid() == 0


def scan(root):
    """All drawings below `root` outside the excluded folders, sorted by content hash.

    Returns a list of `Drawing`. A file that appears in several folders (same bytes) is kept
    once per path here; `prepare` merges them into one item.
    """
    root = Path(root)
    if not root.is_dir():
        raise DudchError(f"dataset folder not found: {root}; run `dudch data openclipart`")
    drawings = []
    for path in sorted(root.rglob("*.svg")):
        rel = path.relative_to(root).as_posix()
        if any(rel.startswith(folder + "/") for folder in EXCLUDED_FOLDERS):
            continue
        data = path.read_bytes()
        drawings.append(Drawing(hashlib.sha1(data).hexdigest(), rel, parse_tags(data)))
    if not drawings:
        raise DudchError(f"no SVG drawings found below {root}; run `dudch data openclipart`")
    return sorted(drawings, key=lambda d: (d.sha1, d.path))


def parse_tags(svg_bytes):
    """The dc:subject entries of one SVG file, unescaped, in document order."""
    text = svg_bytes.decode("utf-8", errors="replace")
    subject = _SUBJECT.search(text)
    if subject is None:
        return ()
    return tuple(t for t in (html.unescape(m).strip() for m in _ITEM.findall(subject.group(1))) if t)


def categories(path):
    """The category folders of a drawing at depth 1 and 2: 'a/b/c/x.svg' -> ('a', 'a/b')."""
    parts = path.split("/")[:-1]
    return tuple("/".join(parts[:depth]) for depth in (1, 2) if len(parts) >= depth)


def folder_words(paths):
    """Every word of every folder name on the given paths, lower case ('signs_and_symbols' ->
    {'signs', 'and', 'symbols'}): tags that only repeat these say nothing the folder didn't."""
    words = set()
    for path in paths:
        for folder in path.split("/")[:-1]:
            words.update(w for w in re.split(r"[^a-z0-9]+", folder.lower()) if w)
    return words
