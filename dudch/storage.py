"""File helpers: write-then-rename, so that a failed or interrupted write never replaces good
output, and content hashing."""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np


def sha256_of(path):
    """Hex SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(dest):
    """Yield a temporary path beside `dest`; on success rename it onto `dest`, else delete it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide shared caches from other users
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(dest):
    """Yield a temporary folder beside `dest`; on success swap it in for `dest`, else delete it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_npz(path, /, **arrays):
    """np.savez_compressed, written atomically."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def save_npy(path, array):
    """np.save (uncompressed, memory-mappable), written atomically."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array))


def save_json(path, obj):
    """JSON with sorted keys, written atomically."""
    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class SharedCache:
    """A cache folder mirrored in S3 (or any S3-compatible store) at `url` = s3://bucket/prefix,
    so that pods on different nodes share what one of them computed: `fetch` copies a file that
    the local cache lacks from S3, `store` uploads one computed here. Files are named by their
    content key, so an entry never changes once written. The endpoint and credentials come from
    the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)."""

    def __init__(self, url):
        import boto3

        if not url.startswith("s3://") or "/" not in url.removeprefix("s3://").strip("/"):
            from dudch import DudchError

            raise DudchError(f"shared cache {url!r} is not s3://bucket/prefix")
        self.bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.prefix = prefix.strip("/")
        self.client = boto3.client("s3")

    def _key(self, path):
        return f"{self.prefix}/{Path(path).name}"

    def fetch(self, path):
        """Download the entry named like `path` into `path`; False when S3 has none."""
        from botocore.exceptions import ClientError

        try:
            with atomic_file(path) as tmp:
                self.client.download_file(self.bucket, self._key(path), str(tmp))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return False
            raise
        return True

    def store(self, path):
        self.client.upload_file(str(path), self.bucket, self._key(path))
