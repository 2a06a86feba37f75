"""The raw data on disk and its DVC pin: `data.dvc` records the content hash of `data/`, which
holds the extracted OpenClipart tree at `data/openclipart`."""

from pathlib import Path

from dudch import DudchError, openclipart

DVC_FILE = "data.dvc"
OPENCLIPART = Path("data") / "openclipart"


def data_version(root):
    """The DVC content hash of `data/` as pinned in data.dvc (e.g. 'd41d8c...dir')."""
    import yaml

    path = Path(root) / DVC_FILE
    if not path.exists():
        raise DudchError(f"{path} not found; run from the project root (where data.dvc is)")
    return yaml.safe_load(path.read_text())["outs"][0]["md5"]


def workspace_matches_pin(root):
    """True when the files in data/ hash, as DVC hashes them, to what data.dvc pins."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        (stage,) = repo.stage.collect(DVC_FILE)
        out = stage.outs[0]
        return out.exists and out.get_hash().value == out.hash_info.value


def ensure_openclipart(root, archive=None):
    """Make data/openclipart hold exactly the pinned data: reuse it when it already matches
    data.dvc, otherwise fetch, verify and extract the package. Returns the folder."""
    root = Path(root).resolve()
    dest, marker = root / OPENCLIPART, root / ".dudch" / "data-verified"
    version = data_version(root)
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
