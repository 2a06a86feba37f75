"""GPU benchmark, to run once on the first lent accelerator: everything a GPU node does in the
pipeline, timed, and checked against the CPU.

    .venv/bin/python benchmarks/gpu.py            # on a CUDA machine -> benchmarks/results/gpu.md
    .venv/bin/python benchmarks/gpu.py --tiny --out /tmp/gpu.md   # minutes on a CPU: a smoke test

It measures, on the default device (CUDA when there is one):
1. image encoding with EfficientNet-Lite0 from decoded pixels, fp32 and bf16 (images/s);
2. one teacher epoch fine-tuning the backbone on pixels (teacher_image_input=pixels);
3. one student outer iteration (network epochs + a DCC sweep);
4. mAP@all of 2,000 queries against 186,577 codes at 128 bits (dudch.metrics, on the CPU);
5. the whole pipeline (`dudch run`, KFP local) on a MIRFLICKR-25K-sized dataset built in its
   Cleared-Set layout (20,015 items: XAll features, YAll, LAll), at 16/32/64/128 bits, with the
   wall time of each stage from its MLflow run;
and checks the device against the CPU: query codes of one trained student computed on each
(evaluation must agree: same codes, same mAP), and a student trained on each with the same
seed (training may differ in rounding: mAP@50 and mAP@all should be close).
Targets on one H100/H200: the pipeline under 2 minutes, encoding at least 10,000 images/s.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import machine  # noqa: E402
from benchmarks.scale import synthetic  # noqa: E402
from dudch import metrics, nets, similarity  # noqa: E402
from dudch.features import ImageEncoder  # noqa: E402
from dudch.student import StudentConfig  # noqa: E402
from dudch.student import fit as fit_student  # noqa: E402
from dudch.teacher import TeacherConfig  # noqa: E402
from dudch.teacher import fit as fit_teacher  # noqa: E402

# Measured by plain PyTorch on one H200 (issue 14), for comparison.
REFERENCE = dict(encode_fp32=14_248, encode_bf16=19_899, map_all_s=0.083)
TARGETS = dict(pipeline_s=120.0, encode_images_per_s=10_000)
FULL = dict(encode_images=4096, encode_batch=256, image_size=224, teacher_items=2000, student_items=20_000,
            map_queries=2000, map_database=186_577, map_bits=128, pipeline_items=20_015,
            pipeline_bits=(16, 32, 64, 128), pipeline_params=(), compare_items=5000)
TINY = dict(encode_images=8, encode_batch=4, image_size=64, teacher_items=16, student_items=300,
            map_queries=20, map_database=500, map_bits=32, pipeline_items=120, pipeline_bits=(8, 16),
            pipeline_params=("teacher_epochs=1", "student_outer_iterations=1", "student_inner_epochs=1",
                             "min_word_count=1", "min_label_size=1"), compare_items=300)


def timed(function, repeat=1):
    """(the result of the last call, seconds per call), synchronising CUDA around the calls."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(repeat):
        result = function()
    sync()
    return result, (time.perf_counter() - started) / repeat


def encoding(device, size):
    """Images/s of the frozen backbone from uint8 pixels, fp32 and bf16 (autocast)."""
    pixels = np.random.default_rng(0).integers(0, 256, (size["encode_images"], size["image_size"], size["image_size"], 3),
                                               dtype=np.uint8)
    encoder = ImageEncoder(device)
    batches = [pixels[s:s + size["encode_batch"]] for s in range(0, len(pixels), size["encode_batch"])]
    rates = {}
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        def run():
            with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
                return [encoder.encode(b) for b in batches]
        timed(run)  # warm-up: cuDNN autotuning, lazy initialisation
        _, seconds = timed(run, repeat=2)
        rates[precision] = len(pixels) / seconds
    return rates


def teacher_epoch(device, size):
    """Seconds of one DJSRH epoch that fine-tunes EfficientNet-Lite0 on pixels."""
    n = size["teacher_items"]
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (n, size["image_size"], size["image_size"], 3), dtype=np.uint8)
    image, text, _ = synthetic(n, seed=1)
    config = TeacherConfig(bits=64, epochs=1, image_input="pixels")
    _, seconds = timed(lambda: fit_teacher(image, text, config, device=device, pixels=pixels))
    return seconds


def train_student(image, text, bits, device, iterations=1, inner_epochs=1):
    """A student trained from a quickly trained teacher's graph: (networks, seconds per outer
    iteration)."""
    teacher = fit_teacher(image[:2000], text[:2000], TeacherConfig(bits=bits, epochs=2), device=device)
    z, teacher_codes = similarity.embedding("hash", image, text, teacher)
    rule = similarity.DEFAULT_RULE
    graph = similarity.SimilarityGraph(z, rule, similarity.default_parameter(rule, len(z)),
                                       similarity.RELATED_FRACTION, teacher_codes)
    seconds = []
    config = StudentConfig(bits=bits, outer_iterations=iterations, inner_epochs=inner_epochs)
    student, _ = fit_student(image, text, np.arange(min(5000, len(image))), graph, config, device=device,
                             on_iteration=lambda i, loss, value, s: seconds.append(s))
    return student, float(np.mean(seconds))


def map_all_time(size):
    """Seconds of mAP@all at the NUS-WIDE scale (dudch.metrics runs on the CPU)."""
    rng = np.random.default_rng(2)
    bits = size["map_bits"]
    _, _, db_labels = synthetic(size["map_database"], seed=3)
    _, _, query_labels = synthetic(size["map_queries"], seed=4)
    prototypes = np.where(rng.random((db_labels.shape[1], bits)) < 0.5, -1, 1)
    noisy = lambda labels: (np.where(rng.random((len(labels), bits)) < 0.3, -1, 1)
                            * prototypes[labels.argmax(1)]).astype(np.int8)
    query_codes, db_codes = noisy(query_labels), noisy(db_labels)
    metrics.mean_average_precision(query_codes[:2], db_codes[:10], query_labels[:2], db_labels[:10])  # JIT
    _, seconds = timed(lambda: metrics.mean_average_precision(query_codes, db_codes, query_labels, db_labels))
    return seconds


def scores(student, image, text, labels, query, database):
    """mAP@50 and mAP@all of a student, image->text and text->image."""
    codes = {m: nets.branch_codes(student, m, x) for m, x in (("image", image), ("text", text))}
    out = {}
    for direction, (q, d) in (("i2t", ("image", "text")), ("t2i", ("text", "image"))):
        for name, top in (("map_50", 50), ("map_all", None)):
            out[f"{name}.{direction}"] = metrics.mean_average_precision(
                codes[q][query], codes[d][database], labels[query], labels[database], top_k=top)
    return out


def device_against_cpu(device, size):
    """Evaluation: one student's codes on the device and on the CPU (same networks); training:
    a student trained on each with the same seed. Returns the figures for the report."""
    n = size["compare_items"]
    image, text, labels = synthetic(n, seed=5)
    query, database = np.arange(n // 10), np.arange(n // 10, n)
    student, _ = train_student(image, text, 32, device, iterations=2)
    on_cpu = nets.branch_codes(student.cpu(), "image", image)
    on_device = nets.branch_codes(student.to(device), "image", image)
    trained_cpu, _ = train_student(image, text, 32, "cpu", iterations=2)
    cpu_scores = scores(trained_cpu, image, text, labels, query, database)
    device_scores = scores(student.cpu(), image, text, labels, query, database)
    return dict(identical_query_bits=float((on_cpu == on_device).mean()),
                max_map_difference=max(abs(cpu_scores[k] - device_scores[k]) for k in cpu_scores),
                cpu=cpu_scores, device=device_scores)


def pipeline(size, workdir):
    """The whole pipeline through `dudch run` on a MIRFLICKR-25K-sized Cleared-Set folder:
    (wall seconds, {(stage, bits): seconds from its MLflow run})."""
    import mlflow
    from scipy.io import savemat

    from components.tracking import stage_children

    folder = Path(workdir) / "mirflickr25k"
    folder.mkdir()
    image, text, labels = synthetic(size["pipeline_items"], seed=6)
    savemat(str(folder / "mirflickr25k-xall.mat"), {"XAll": image})
    savemat(str(folder / "mirflickr25k-yall.mat"), {"YAll": text})
    savemat(str(folder / "mirflickr25k-lall.mat"), {"LAll": labels.astype(np.float64)})
    store = f"sqlite:///{Path(workdir) / 'mlflow.db'}"
    command = [str(Path(sys.executable).with_name("dudch")), "run", "--dataset", f"mirflickr25k:{folder}",
               "--bits", *map(str, size["pipeline_bits"]), "--keep-runs", "0", "--no-cache",
               *[a for p in size["pipeline_params"] for a in ("--param", p)]]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": store},
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the pipeline failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    run_id = done.stdout.split("MLflow parent run ")[1].split()[0]
    mlflow.set_tracking_uri(store)
    client = mlflow.MlflowClient()
    parent = client.get_run(run_id)
    stages = {}
    for stage in ("prepare", "teacher", "similarity", "student", "evaluate"):
        for bits in (None,) if stage == "prepare" else size["pipeline_bits"]:
            (child,) = stage_children(client, parent, stage, bits)
            stages[(stage, bits or "-")] = child.data.metrics["stage_wall_time_s"]
    return wall, stages


def report(result, size, tiny):
    r = result
    rows = [
        "# GPU benchmark" + (" (tiny smoke-test mode: not a measurement)" if tiny else ""),
        "",
        f"Machine: {r['machine']}. Device: {r['device']}. Command: `{r['command']}` at commit {r['commit']}.",
        "",
        "| what | measured | reference (plain PyTorch, one H200) | target |",
        "|---|---|---|---|",
        f"| encoding, fp32 ({size['encode_images']} images {size['image_size']}px, batch {size['encode_batch']}) | "
        f"{r['encode']['fp32']:,.0f} images/s | {REFERENCE['encode_fp32']:,} images/s | |",
        f"| encoding, bf16 | {r['encode']['bf16']:,.0f} images/s | {REFERENCE['encode_bf16']:,} images/s | "
        f"at least {TARGETS['encode_images_per_s']:,} images/s: **{'met' if r['encode_target_met'] else 'missed'}** |",
        f"| teacher epoch on pixels ({size['teacher_items']} items, fine-tuning EfficientNet-Lite0) | "
        f"{r['teacher_epoch_s']:.2f} s | | |",
        f"| student outer iteration ({size['student_items']} items, 64 bits) | {r['student_iteration_s']:.2f} s | | |",
        f"| mAP@all, {size['map_queries']:,} queries x {size['map_database']:,} codes x {size['map_bits']} bits "
        f"(dudch.metrics, CPU) | {r['map_all_s']:.3f} s | {REFERENCE['map_all_s']} s (on the GPU) | |",
        f"| whole pipeline, {size['pipeline_items']:,} items, bits {list(size['pipeline_bits'])} | {r['pipeline_s']:.0f} s | | "
        f"under {TARGETS['pipeline_s']:.0f} s: **{'met' if r['pipeline_target_met'] else 'missed'}** |",
        "",
        "Wall time per stage (from each stage's MLflow run, `stage_wall_time_s`):",
        "",
        "| stage | bits | seconds |",
        "|---|---|---|",
        *[f"| {stage} | {bits} | {seconds:.1f} |" for (stage, bits), seconds in r["stages"].items()],
        "",
        "Device against CPU:",
        f"- evaluation (one student's query codes computed on each): {100 * r['check']['identical_query_bits']:.3f}% "
        f"of the bits identical;",
        f"- training (a student trained on each, same seed): largest difference in mAP@50 or mAP@all "
        f"{r['check']['max_map_difference']:.4f} (CPU {_fmt(r['check']['cpu'])}; device {_fmt(r['check']['device'])}).",
        "",
    ]
    return "\n".join(rows)


def _fmt(scores):
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small sizes that run in minutes on a CPU (a smoke test)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.md")
    args = parser.parse_args()
    size = TINY if args.tiny else FULL
    device = nets.default_device()
    if device == "cpu" and not args.tiny:
        raise SystemExit("no CUDA device here: this benchmark is for a GPU machine (use --tiny to try it on a CPU)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = dict(machine=machine(), device=torch.cuda.get_device_name() if device == "cuda" else "CPU",
                  command=".venv/bin/python benchmarks/gpu.py " + " ".join(sys.argv[1:]), commit=commit)
    result["encode"] = encoding(device, size)
    print("encoding (images/s):", result["encode"], flush=True)
    result["teacher_epoch_s"] = teacher_epoch(device, size)
    image, text, _ = synthetic(size["student_items"], seed=7)
    result["student_iteration_s"] = train_student(image, text, 64, device)[1]
    result["map_all_s"] = map_all_time(size)
    result["check"] = device_against_cpu(device, size)
    print({k: v for k, v in result.items() if k != "machine"}, flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        result["pipeline_s"], result["stages"] = pipeline(size, workdir)
    result["encode_target_met"] = result["encode"]["bf16"] >= TARGETS["encode_images_per_s"]
    result["pipeline_target_met"] = result["pipeline_s"] < TARGETS["pipeline_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(result, size, args.tiny))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
