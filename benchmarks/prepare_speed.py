"""Image preparation speed on this machine's CPU: decoding (SVG rendering and resizing),
encoding (EfficientNet-Lite0), and both together, in three ways, each in a fresh process so
that none inherits another's allocator state:

  before   a batch decoded, then encoded, in turn, with one torch thread (`dudch run`'s
           per-task cap on 2 cores, which prepare had before), glibc's default allocator;
  overlap  the next batch decoded in a thread while the network encodes this one, every core
           (`dudch.prepare._decode`), glibc's default allocator;
  after    as overlap, with large freed blocks kept for reuse
           (`dudch.reuse_freed_memory`, which `ImageEncoder` calls): how `dudch.prepare` runs now.
All three read SVGs the current way (straight from cairo's canvas, not through a PNG).

Also checks that the features are the same (max abs difference), so the cache keys stay.

    .venv/bin/python benchmarks/prepare_speed.py [--items 640]
    # writes benchmarks/results/prepare-speed.json
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("before", "overlap", "after")


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def measure(mode, items, features_path):
    """One mode's rates (images/s), its features saved to `features_path`."""
    import torch

    from dudch import features, prepare, sources

    if mode != "after":
        features.reuse_freed_memory = lambda: None  # glibc's defaults, as before the change
    config = prepare.PrepareConfig()
    data = sources.load(f"openclipart:{ROOT / sources.DEFAULT_OPENCLIPART}", config.min_label_size)
    data = data.subset(np.arange(items))
    batches = [data.rows[start:start + config.batch_size] for start in range(0, len(data), config.batch_size)]
    cores = len(os.sched_getaffinity(0))
    encoder = features.ImageEncoder()

    def encode(images):
        return encoder.encode(np.stack([image for image in images if image is not None]))

    decoded, decode_s = timed(lambda: [data.images.batch(rows, config.image_size) for rows in batches])
    decodable = sum(image is not None for images in decoded for image in images)
    rates = dict(decode=len(data) / decode_s)
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        encode(decoded[0])  # warm-up
        _, seconds = timed(lambda: [encode(images) for images in decoded])
        rates[f"encode, {threads} threads"] = decodable / seconds
    if mode == "before":
        torch.set_num_threads(1)
        result, seconds = timed(lambda: np.concatenate(
            [encode(data.images.batch(rows, config.image_size)) for rows in batches]))
        np.save(features_path, result)
    else:
        torch.set_num_threads(cores)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "features.npz"
            _, seconds = timed(lambda: prepare._decode(data, config, False, path, None))
            with np.load(path) as saved:
                np.save(features_path, saved["features"][saved["rendered"]])
    rates["decode + encode"] = len(data) / seconds
    return dict(decodable=decodable, images_per_s={k: round(v, 1) for k, v in rates.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=640, help="OpenClipart drawings to prepare")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "prepare-speed.json")
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)  # one mode, in a child process
    parser.add_argument("--features", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.items, args.features)))
        return

    import torch

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            print(f"measuring {mode} ...", file=sys.stderr, flush=True)
            child = subprocess.run([sys.executable, __file__, "--items", str(args.items), "--measure", mode,
                                    "--features", f"{tmp}/{mode}.npy"], capture_output=True, text=True)
            if child.returncode:
                sys.exit(f"{mode} failed:\n{child.stderr[-2000:]}")
            runs[mode] = json.loads(child.stdout.strip().splitlines()[-1])
            runs[mode]["features"] = np.load(f"{tmp}/{mode}.npy")
    before, after = runs["before"]["features"], runs["after"]["features"]
    difference = float(np.abs(after - before).max()) if after.shape == before.shape else None
    total = {mode: runs[mode]["images_per_s"]["decode + encode"] for mode in MODES}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = dict(
        commit=commit,
        machine=f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores available, torch {torch.__version__}",
        command="python " + " ".join(sys.argv), items=args.items, decodable=runs["after"]["decodable"],
        images_per_s={mode: runs[mode]["images_per_s"] for mode in MODES},
        speedup=round(total["after"] / total["before"], 2),
        speedup_from_overlap=round(total["overlap"] / total["before"], 2),
        features_max_abs_difference=difference,
        note=" ".join(__doc__.split("\n\n")[1].split()) + (
            " The features are identical, so the cache keys (which name the extractor settings) stay."
            if difference == 0 else " THE FEATURES DIFFER: the cache keys must change."))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
