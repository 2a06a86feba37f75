"""DUDCH: deep unsupervised discrete cross-modal hashing by knowledge distillation.

The algorithms only: data preparation, the DJSRH teacher, similarity reconstruction, the
asymmetric DCC student and the retrieval metrics. Nothing here imports KFP or MLflow, so every
stage runs and tests anywhere; `components/` and `pipeline/` wire it into Kubeflow and MLflow.
"""

import re

__version__ = "0.1.0"

# scheme://userinfo@: a secret when it holds a password, or is a token (any scheme but ssh,
# where "git@" names the account only).
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*)://([^/@\s]+)@")


class DudchError(Exception):
    """A problem the user can fix. Its message is one line: what is wrong, then the fix."""


def first_line(error, limit=200):
    """An exception (or message) as one short line, for quoting inside a DudchError."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]


def out_of_space(error):
    """Where an exception (or one in its chain: a store's client wraps the cause) says a disk is
    full: the detail to quote (the file being written, or the database), else None."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left writing {error.filename}" if error.filename else "no space left on device"
        if "database or disk is full" in str(error):
            return "the database or disk is full"
        error = error.__cause__ or error.__context__
    return None


def shown(value, limit=60):
    """repr(value) for an error message, cut to `limit` characters: an input is never echoed
    back whole (it may be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _is_secret(match):
    return ":" in match.group(2) or "ssh" not in match.group(1).lower()


def has_credentials(text):
    """Whether `text` holds a URL with credentials (http://KEY:SECRET@host, https://TOKEN@host)."""
    return any(_is_secret(m) for m in _URL_USERINFO.finditer(str(text)))


def redact(text):
    """`text` with the credentials of every URL in it replaced by ***: fit to print or log."""
    return _URL_USERINFO.sub(lambda m: f"{m.group(1)}://***@" if _is_secret(m) else m.group(0), str(text))


def reuse_freed_memory():
    """Make glibc's malloc keep large freed blocks for reuse instead of returning them to the
    system. By default an allocation above the mmap threshold (at most 32 MiB) is a fresh mmap
    and freed memory at the heap's top goes back to the system, so every batch's tensors are
    page-faulted in again: on 2 cores that cost more than the arithmetic (EfficientNet-Lite0
    about 30 -> 70 images/s, benchmarks/prepare_speed.py; teacher and student tasks about 1.4x
    faster). The process keeps its peak memory for reuse (up to 2 GiB free). Call it once per
    process; no effect without glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 2**30)
    mallopt(m_trim_threshold, 2**31)
