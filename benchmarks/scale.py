"""Scale benchmark on a NUS-WIDE-sized synthetic set: a database of 186,577 pairs, 2,000
queries, 1280-d image features, 1000-d bag-of-words, 10 labels, 64 bits.

Measures, in one run:
- the peak resident memory of the similarity and student stages, run in a child process that
  loads its inputs from disk as a pipeline stage does (teacher trained beforehand, outside);
- the wall time of mAP@all (dudch.metrics) against a straightforward per-query loop that
  sorts each query's distances (DJSRH's calc_map, with a stable sort so that ties fall in
  database order as in dudch), and that both give the same value to 1e-9.

    .venv/bin/python benchmarks/scale.py      # writes benchmarks/results/scale.json
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dudch import metrics, similarity  # noqa: E402
from dudch.nets import load, save  # noqa: E402
from dudch.student import StudentConfig, fit  # noqa: E402
from dudch.teacher import TeacherConfig  # noqa: E402
from dudch.teacher import fit as fit_teacher  # noqa: E402

N_DB, N_QUERY, IMAGE_DIM, TEXT_DIM, N_LABELS, BITS = 186_577, 2_000, 1280, 1000, 10, 64


def synthetic(n, seed, chunk=20_000):
    """n pairs from 10 latent topics: (image float32 (n, 1280), text float32 (n, 1000) binary,
    labels uint8 (n, 10))."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((N_LABELS, IMAGE_DIM)).astype(np.float32)
    word_rates = np.random.default_rng(1).random((N_LABELS, TEXT_DIM)) ** 8
    image = np.empty((n, IMAGE_DIM), np.float32)
    text = np.empty((n, TEXT_DIM), np.float32)
    labels = np.zeros((n, N_LABELS), np.uint8)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        topic = rng.integers(0, N_LABELS, size)
        image[start:start + size] = centres[topic] + 2.0 * rng.standard_normal((size, IMAGE_DIM), dtype=np.float32)
        text[start:start + size] = rng.random((size, TEXT_DIM)) < word_rates[topic]
        labels[start:start + size][np.arange(size), topic] = 1
    return image, text, labels


def per_query_map(query_codes, db_codes, query_labels, db_labels):
    """The reference: one query at a time, full sort of its distances (DJSRH's calc_map)."""
    total = 0.0
    k = query_codes.shape[1]
    for q, ql in zip(query_codes.astype(np.float64), query_labels):
        relevant = (db_labels @ ql) > 0
        n_relevant = relevant.sum()
        if n_relevant == 0:
            continue
        hamming = 0.5 * (k - db_codes @ q)
        ranked = relevant[np.argsort(hamming, kind="stable")]
        positions = np.flatnonzero(ranked) + 1.0
        total += np.mean(np.arange(1, n_relevant + 1) / positions)
    return total / len(query_codes)


def stages_child(workdir):
    """Similarity + student on the saved inputs; prints a JSON line with times and peak RSS."""
    workdir = Path(workdir)
    started = time.perf_counter()
    image, text = np.load(workdir / "image.npy"), np.load(workdir / "text.npy")
    teacher, _ = load(workdir / "teacher.pt")
    z, teacher_codes = similarity.embedding("hash", image, text, teacher)
    rule = similarity.DEFAULT_RULE
    graph = similarity.SimilarityGraph(z, rule, similarity.default_parameter(rule, len(z)),
                                       similarity.RELATED_FRACTION, teacher_codes)
    similarity_s = time.perf_counter() - started
    config = StudentConfig(bits=BITS, outer_iterations=2, inner_epochs=1)
    started = time.perf_counter()
    iterations = []
    _, codes = fit(image, text, np.arange(5000), graph, config,
                   on_iteration=lambda i, loss, value, s: iterations.append(s))
    print(json.dumps(dict(similarity_s=similarity_s, student_s=time.perf_counter() - started,
                          student_iteration_s=iterations, codes_binary=bool(np.isin(codes, (-1, 1)).all()),
                          peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages-child", help=argparse.SUPPRESS)
    parser.add_argument("--database", type=int, default=N_DB, help="database size (smaller for a smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    args = parser.parse_args()
    if args.stages_child:
        return stages_child(args.stages_child)

    from benchmarks.quality import machine

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    image, text, db_labels = synthetic(args.database, seed=1)
    with tempfile.TemporaryDirectory() as workdir:
        np.save(Path(workdir) / "image.npy", image)
        np.save(Path(workdir) / "text.npy", text)
        config = TeacherConfig(bits=BITS, epochs=2)
        save(Path(workdir) / "teacher.pt", fit_teacher(image[:5000], text[:5000], config), config)
        del image, text
        child = subprocess.run([sys.executable, __file__, "--stages-child", workdir],
                               capture_output=True, text=True, check=True)
    stages = json.loads(child.stdout.strip().splitlines()[-1])
    print("similarity + student:", stages, flush=True)

    rng = np.random.default_rng(2)
    prototypes = np.where(rng.random((N_LABELS, BITS)) < 0.5, -1, 1)
    noisy = lambda labels: np.where(rng.random((len(labels), BITS)) < 0.3, -1, 1) * prototypes[labels.argmax(1)]
    _, _, query_labels = synthetic(N_QUERY, seed=3)
    query_codes, db_codes = noisy(query_labels).astype(np.int8), noisy(db_labels).astype(np.int8)

    started = time.perf_counter()  # the kernel's one-off JIT compile (or cache load), not timed below
    metrics.mean_average_precision(query_codes[:2], db_codes[:10], query_labels[:2], db_labels[:10])
    compile_s = time.perf_counter() - started
    started = time.perf_counter()
    fast = metrics.mean_average_precision(query_codes, db_codes, query_labels, db_labels)
    fast_s = time.perf_counter() - started
    started = time.perf_counter()
    slow = per_query_map(query_codes, db_codes.astype(np.float64), query_labels, db_labels.astype(np.float64))
    slow_s = time.perf_counter() - started
    result = dict(
        dataset=dict(database=args.database, queries=N_QUERY, image_dim=IMAGE_DIM, text_dim=TEXT_DIM, labels=N_LABELS, bits=BITS),
        machine=machine(), command=".venv/bin/python benchmarks/scale.py " + " ".join(sys.argv[1:]), commit=commit,
        similarity_and_student=dict(stages, note="student run for 2 outer iterations: memory does not grow with iterations"),
        peak_memory_gb=stages["peak_rss_gb"], peak_memory_target_gb=8.0,
        evaluation=dict(map_all_dudch=float(fast), map_all_per_query_loop=float(slow), abs_difference=float(abs(fast - slow)),
                        dudch_s=fast_s, dudch_first_call_compile_s=compile_s, per_query_loop_s=slow_s, speedup=slow_s / fast_s, speedup_target=20.0),
        targets_met=dict(memory=bool(stages["peak_rss_gb"] <= 8.0), speed=bool(slow_s / fast_s >= 20.0),
                         same_values=bool(abs(fast - slow) <= 1e-9)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
