"""Image preparation speed on this machine's CPU: decoding (SVG rendering and resizing),
encoding (EfficientNet-Lite0), and both together as the prepare stage runs them, before and
after this change: before, one batch decoded then encoded, in turn, with the one torch thread
that `dudch run` left each task on 2 cores; after, the next batch decoded in a thread while the
network encodes this one, with every core (`dudch.prepare._decode`, the prepare task's setting).
Also checks that the features are the same (max abs difference) under the same cache key.

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
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dudch import prepare, sources  # noqa: E402
from dudch.features import ImageEncoder  # noqa: E402


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=640, help="OpenClipart drawings to prepare")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "prepare-speed.json")
    args = parser.parse_args()

    config = prepare.PrepareConfig()
    data = sources.load(f"openclipart:{ROOT / sources.DEFAULT_OPENCLIPART}", config.min_label_size)
    data = data.subset(np.arange(args.items))
    batches = [data.rows[start:start + config.batch_size] for start in range(0, len(data), config.batch_size)]
    cores = len(os.sched_getaffinity(0))
    encoder = ImageEncoder()

    def decode_all():
        return [data.images.batch(rows, config.image_size) for rows in batches]

    def encode_all(decoded):
        return np.concatenate([encoder.encode(np.stack([i for i in images if i is not None])) for images in decoded])

    def one_after_the_other():
        return np.concatenate([encoder.encode(np.stack([i for i in data.images.batch(rows, config.image_size) if i is not None]))
                               for rows in batches])

    decoded, decode_s = timed(decode_all)
    encode_s = {}
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        encode_all(decoded[:1])  # warm-up
        _, encode_s[threads] = timed(lambda: encode_all(decoded))
    torch.set_num_threads(1)
    before, before_s = timed(one_after_the_other)
    torch.set_num_threads(cores)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.npz"
        _, after_s = timed(lambda: prepare._decode(data, config, False, path, None))
        with np.load(path) as saved:
            after = saved["features"][saved["rendered"]]

    n = len(data)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = dict(
        commit=commit, machine=f"{platform.machine()}, {cores} cores available, torch {torch.__version__}",
        command="  ".join(["python", *sys.argv]), items=n, decodable=len(before),
        decode_images_per_s=round(n / decode_s, 1),
        encode_images_per_s={f"{t} threads": round(len(before) / s, 1) for t, s in encode_s.items()},
        before_images_per_s=round(n / before_s, 1), after_images_per_s=round(n / after_s, 1),
        speedup=round(before_s / after_s, 2), features_max_abs_difference=float(np.abs(after - before).max()),
        note="before: decode a batch, then encode it, one torch thread (dudch run's cap on 2 cores); "
             "after: the next batch decoded in a thread while this one is encoded, every core "
             "(dudch.prepare._decode with the prepare task's thread setting). The cache key is "
             "unchanged: it names the extractor settings, which are the same.")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
