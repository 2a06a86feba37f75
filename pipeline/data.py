"""The data on disk and its DVC pins.

`data.dvc` pins `data/`, which holds the embedded OpenClipart tree at `data/openclipart`; users
add their own datasets below `data/` (or in their own `.dvc` files) the same way. A run records
which pin it read (`pin`); a cluster run fetches exactly that version by (repo, rev, path)
(`fetch_pinned`). Remotes: a local folder by default, S3 or MinIO by `configure_remote`;
credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never from
files this project writes.
"""

import contextlib
import hashlib
import logging
from pathlib import Path

from dudch import DudchError, first_line, has_credentials, openclipart, shown
from dudch.sources import DEFAULT_OPENCLIPART as OPENCLIPART
from dudch.storage import atomic_dir

DVC_FILE = "data.dvc"
REMOTE = "storage"


def data_version(root):
    """The DVC content hash of `data/` as pinned in data.dvc (e.g. 'd41d8c...dir')."""
    import yaml

    path = Path(root) / DVC_FILE
    if not path.exists():
        raise DudchError(f"{path} not found; run from the project root (where data.dvc is)")
    return yaml.safe_load(path.read_text())["outs"][0]["md5"]


def workspace_matches_pin(root, tracked="data"):
    """True when the files of the tracked path hash, as DVC hashes them, to what its .dvc file
    pins (`dvc data status`: nothing uncommitted)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return not any(repo.data_status(targets=[tracked])["uncommitted"].values())


def ensure_openclipart(root, archive=None):
    """Make data/openclipart hold exactly the pinned data: reuse it when it already matches
    data.dvc, otherwise fetch, verify and extract the package. Returns the folder."""
    root = Path(root).resolve()
    dest, marker = root / OPENCLIPART, root / ".dudch" / "data-verified"
    version = data_version(root)
    openclipart.remove_leftovers(dest)  # an interrupted extraction's, which the pin check would trip on
    if archive is None and dest.is_dir() and marker.exists() and marker.read_text() == version:
        return dest
    if archive is not None or not dest.is_dir() or not workspace_matches_pin(root):
        openclipart.fetch(dest, root / ".dudch" / "downloads", archive)
        if not workspace_matches_pin(root):
            raise DudchError(f"{dest} does not hash to the version pinned in {DVC_FILE} ({version}); "
                             f"remove stray files below data/ and rerun `dudch data openclipart`")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(version)
    return dest


def pin(path, repo=".", rev=None, check_workspace=False):
    """The DVC pin of the data at `path` (relative to the repository) in `repo` at `rev`
    (None: the workspace). Returns {"dvc_file", "md5", "rev", "tracked"}: the .dvc file, its md5
    and the tracked path holding `path` (all None when no .dvc file tracks it), and the git
    commit. `check_workspace`: refuse a workspace whose files differ from the pin."""
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException

    untracked = dict(dvc_file=None, md5=None, tracked=None)
    try:
        fs = DVCFileSystem(str(repo), rev=rev)
        commit = _resolved_rev(fs.repo)
        relative = Path(path)
        if relative.is_absolute():
            local_root = Path(repo).resolve()
            if not relative.is_relative_to(local_root):
                return dict(untracked, rev=commit)
            relative = relative.relative_to(local_root)
        # The outermost tracked folder on the way down to `path` is the one its .dvc file pins.
        for depth in range(1, len(relative.parts) + 1):
            prefix = "/".join(relative.parts[:depth])
            try:
                info = fs.info(prefix).get("dvc_info", {})
            except FileNotFoundError:
                return dict(untracked, rev=commit)
            if info.get("isout"):
                dvc_file = f"{prefix}.dvc"
                if check_workspace and not workspace_matches_pin(repo, prefix):
                    raise DudchError(f"{path} differs from the version pinned in {dvc_file}; run "
                                     f"`dvc add {prefix}` (and commit the .dvc file) or `dudch data pull`")
                return dict(dvc_file=dvc_file, md5=info["md5"], rev=commit, tracked=prefix)
        return dict(untracked, rev=commit)
    except DvcException as error:
        raise DudchError(f"cannot read the DVC pins of {repo} at {rev or 'the workspace'} "
                         f"({first_line(error)}); check the repository and revision") from None


def _resolved_rev(dvc_repo):
    try:
        return dvc_repo.scm.get_rev()
    except Exception:  # not a git repository
        return None


def fetch_pinned(repo, rev, path, cache_dir):
    """Download the tracked data holding `path` in the DVC project `repo` (a git URL or folder)
    at `rev` from its remote into `cache_dir`, once per (repo, commit, tracked path): the whole
    tracked folder, so a manifest arrives with its images. Returns (local path of `path`, pin)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    found = pin(path, repo, rev)
    if found["md5"] is None:
        raise DudchError(f"{path} is not tracked by DVC in {repo} at {rev}; `dvc add` it there, "
                         f"commit and push")
    tracked = Path(found["tracked"])
    key = hashlib.sha256(f"{repo}\n{found['rev']}\n{tracked}".encode()).hexdigest()[:16]
    dest = Path(cache_dir) / "fetched" / key
    if not dest.exists():
        try:
            with atomic_dir(dest) as tmp:
                Repo.get(str(repo), str(tracked), out=str(Path(tmp) / tracked), rev=rev)
        except DvcException as error:
            raise DudchError(f"cannot fetch {path} from {repo} at {rev} ({first_line(error)}); check "
                             f"the DVC remote and its credentials (AWS_ACCESS_KEY_ID, "
                             f"AWS_SECRET_ACCESS_KEY)") from None
    return dest / path, found


def configure_remote(root, url, endpoint_url=None):
    """Make `url` (s3://bucket/prefix, or a local folder) the project's default DVC remote. An
    S3-compatible server other than AWS is given by `endpoint_url`. Credentials are never
    written: DVC reads them from the environment."""
    from dvc.repo import Repo

    if has_credentials(url) or has_credentials(endpoint_url or ""):
        which = "remote URL" if has_credentials(url) else "endpoint URL"
        raise DudchError(f"the {which} must not hold credentials (it is written to the git-tracked "
                         f".dvc/config); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the "
                         f"environment instead")
    for name, value in (("remote URL", url), ("endpoint URL", endpoint_url or "")):
        if any(ord(c) < 32 for c in value):
            raise DudchError(f"the {name} {shown(value)} holds a control character (a newline?); give it on one line")
    if not url.strip():
        raise DudchError("the remote is empty; give s3://bucket/prefix or a folder")
    if not url.startswith("s3://") and "://" in url:
        raise DudchError(f"unsupported remote {shown(url)}: use s3://bucket/prefix or a local folder")
    if url.startswith("s3://") and not url.removeprefix("s3://").split("/")[0]:
        raise DudchError(f"the remote {shown(url)} names no bucket; give s3://bucket/prefix")
    if endpoint_url:
        from urllib.parse import urlparse

        endpoint = urlparse(endpoint_url)
        if endpoint.scheme not in ("http", "https") or not endpoint.hostname:
            raise DudchError(f"the endpoint URL {shown(endpoint_url)} is not http(s)://host[:port]; e.g. "
                             f"http://minio:9000")
    settings = {"url": url if url.startswith("s3://") else str(Path(url).resolve())}
    if endpoint_url:
        if not url.startswith("s3://"):
            raise DudchError("--endpoint-url applies to s3:// remotes only")
        settings["endpointurl"] = endpoint_url
    with Repo(str(root)) as repo:
        with repo.config.edit() as config:
            config["remote"][REMOTE] = settings
            config["core"]["remote"] = REMOTE
    return settings


def transfer(root, direction, targets=()):
    """`dvc push` or `dvc pull` of `targets` (.dvc files; all when empty) with the default
    remote. Returns the number of files moved; one-line DudchError when the remote fails."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        remote = repo.config["core"].get("remote")
        if not remote:
            raise DudchError("no DVC remote configured; run `dudch data remote s3://bucket/prefix "
                             "--endpoint-url URL` (or a local folder)")
        url = repo.config["remote"][remote]["url"]
        endpoint = repo.config["remote"][remote].get("endpointurl")
        if endpoint:
            _check_reachable(endpoint, direction)
        with _dvc_errors() as errors:
            try:
                if direction == "push":
                    return repo.push(targets=list(targets) or None)
                return repo.pull(targets=list(targets) or None)["stats"]["fetched"]
            except Exception as error:  # DvcException, or the S3 layer's own (botocore, aiohttp)
                reason = errors[0] if errors else f"{type(error).__name__}: {first_line(error)}"
                raise DudchError(f"dvc {direction} with remote {remote!r} ({url}) failed ({reason}); "
                                 f"check that the server is reachable, the bucket exists and "
                                 f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are set") from None


def _check_reachable(endpoint, direction):
    """Refuse in one line, within seconds, an S3 endpoint that takes no connection: DVC's S3 layer
    retries for most of a minute before it gives up."""
    import socket
    from urllib.parse import urlparse

    address = urlparse(endpoint)
    port = address.port or (443 if address.scheme == "https" else 80)
    try:
        socket.create_connection((address.hostname, port), timeout=5).close()
    except OSError as error:
        raise DudchError(f"dvc {direction}: cannot reach the remote's endpoint {shown(endpoint)} "
                         f"({first_line(error) or type(error).__name__}); start the server, or point "
                         f"`dudch data remote URL --endpoint-url URL` at one that is reachable") from None


@contextlib.contextmanager
def _dvc_errors():
    """Collect the errors DVC and its data layer log (first lines) instead of printing them, so a
    failure is the one line the caller raises."""
    loggers, errors = [logging.getLogger(name) for name in ("dvc", "dvc_data", "dvc_objects")], []

    class Collect(logging.Handler):
        def emit(self, record):
            cause = f": {first_line(record.exc_info[1])}" if record.exc_info and record.exc_info[1] else ""
            errors.append(first_line(record.getMessage()) + cause)

    handler = Collect(level=logging.ERROR)
    saved = [(logger.handlers[:], logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers[:], logger.propagate = [handler], False
    try:
        yield errors
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved):
            logger.handlers[:], logger.propagate = handlers, propagate
