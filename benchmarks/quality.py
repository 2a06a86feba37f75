"""Quality benchmark on OpenClipart: teacher (DJSRH), student (DUDCH), CCA-ITQ and two
ablations, at 16/32/64/128 bits, mean and std over seeds, on the query set.

Hyperparameters are chosen on the validation split only (validation items querying the
database without them); the `--tune` pass reports every similarity-reconstruction design it
tried. Same functions as the pipeline's stages (dudch.*), without KFP or MLflow around them.

    .venv/bin/python benchmarks/quality.py            # writes benchmarks/results/quality-openclipart.{json,md}
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dudch import evaluate, prepare, similarity  # noqa: E402
from dudch.baselines import CCAITQ  # noqa: E402
from dudch.student import StudentConfig  # noqa: E402
from dudch.student import fit as fit_student  # noqa: E402
from dudch.teacher import TeacherConfig  # noqa: E402
from dudch.teacher import fit as fit_teacher  # noqa: E402

METHODS = ("teacher", "student", "cca_itq", "student_no_dcc", "student_raw_sim")
# Similarity designs compared on the validation split (source, rule, parameter).
DESIGNS = [("hash", "mutual_knn", 0.03), ("hash", "mutual_knn", 0.2), ("hash", "union_knn", 0.2),
           ("hash", "quantile", 0.1), ("hash", "quantile", 0.2), ("hash", "quantile", 0.3),
           ("deep", "quantile", 0.2), ("both", "quantile", 0.2), ("raw", "quantile", 0.2)]


def graph_for(source, rule, fraction, features, teacher):
    database = features["database"]
    z = similarity.embedding(source, features["image"][database], features["text"][database], teacher)
    parameter = fraction if rule == "quantile" else max(1, round(fraction * len(database)))
    return similarity.SimilarityGraph(z, rule, parameter)


def train_student(features, graph, config):
    database = features["database"]
    return fit_student(features["image"][database], features["text"][database],
                       np.searchsorted(database, features["train"]), graph, config)


def run_seed(features, labels, bits, seed, split, designs=None):
    """All methods at one bit length and seed; returns score rows (and design rows if asked)."""
    train = features["train"]
    teacher = fit_teacher(features["image"][train], features["text"][train], TeacherConfig(bits=bits, seed=seed))
    cca = CCAITQ(bits, seed=seed).fit(features["image"][train], features["text"][train])
    config = StudentConfig(bits=bits, seed=seed)
    source, rule = similarity.DEFAULT_SOURCE, similarity.DEFAULT_RULE
    distilled = graph_for(source, rule, similarity.SIMILAR_FRACTION, features, teacher)
    student, codes = train_student(features, distilled, config)
    no_dcc, no_dcc_codes = train_student(features, distilled, replace(config, discrete=False))
    raw, raw_codes = train_student(features, graph_for("raw", rule, similarity.SIMILAR_FRACTION, features, None), config)
    codes_by_method = {
        "teacher": evaluate.teacher_codes(teacher, features, split),
        **evaluate.student_codes(student, codes, features, split),
        "cca_itq": evaluate.cca_itq_codes(cca, features, split),
        "student_no_dcc": evaluate.student_codes(no_dcc, no_dcc_codes, features, split)["student"],
        "student_raw_sim": evaluate.student_codes(raw, raw_codes, features, split)["student"],
    }
    rows, _ = evaluate.score(codes_by_method, features, labels, bits, split, curves=False)
    design_rows = []
    for source, rule, fraction in designs or []:
        graph = graph_for(source, rule, fraction, features, teacher)
        net, design_codes = train_student(features, graph, config)
        scored, _ = evaluate.score({"student": evaluate.student_codes(net, design_codes, features, split)["student"]},
                                   features, labels, bits, split, curves=False)
        design_rows += [dict(r, source=source, rule=rule, similar_fraction=fraction,
                             density=graph.density()) for r in scored]
        print(f"  design {source}/{rule}/{fraction}: " + " ".join(f"{r['direction']} {r['map_all']:.4f}" for r in scored), flush=True)
    return rows, design_rows


def aggregate(rows):
    table = []
    keys = sorted({(r["method"], r["bits"], r["direction"]) for r in rows},
                  key=lambda k: ((METHODS + ("student_inductive",)).index(k[0]), k[1], k[2]))
    for method, bits, direction in keys:
        group = [r for r in rows if (r["method"], r["bits"], r["direction"]) == (method, bits, direction)]
        table.append(dict(method=method, bits=bits, direction=direction,
                          map_all=float(np.mean([r["map_all"] for r in group])),
                          map_all_std=float(np.std([r["map_all"] for r in group])),
                          map_50=float(np.mean([r["map_50"] for r in group])), seeds=len(group)))
    return table


def margins(table, bits_list):
    """Student minus teacher and minus CCA-ITQ, in mAP@all points, per direction."""
    value = {(r["method"], r["bits"], r["direction"]): r["map_all"] for r in table}
    out = {}
    for direction in evaluate.DIRECTIONS:
        gains = [100 * (value[("student", b, direction)] - value[("teacher", b, direction)]) for b in bits_list]
        beats_cca = all(value[("student", b, direction)] > value[("cca_itq", b, direction)] for b in bits_list)
        out[direction] = dict(mean_gain_over_teacher_points=float(np.mean(gains)),
                              gain_per_bits=dict(zip(map(str, bits_list), gains)), beats_cca_itq_at_every_bits=beats_cca)
    return out


def markdown(result):
    lines = ["# Quality on OpenClipart", "",
             f"Machine: {result['machine']}. Command: `{result['command']}` at commit {result['commit']}. "
             f"Wall time: {result['wall_time_s'] / 60:.1f} min.",
             f"Query set of {result['dataset']['split']['query']} items against a database of "
             f"{result['dataset']['split']['database']}; {result['dataset']['num_labels']} labels; mean +- std over seeds {result['seeds']}.",
             "", "| method | bits | I->T mAP@all | T->I mAP@all | I->T mAP@50 | T->I mAP@50 |", "|---|---|---|---|---|---|"]
    by = {(r["method"], r["bits"], r["direction"]): r for r in result["rows"] + result["extra_rows"]}
    for method in METHODS + ("student_inductive",):
        for bits in result["bits"]:
            i, t = by.get((method, bits, "i2t")), by.get((method, bits, "t2i"))
            if i and t:
                lines.append(f"| {method} | {bits} | {i['map_all']:.4f} +- {i['map_all_std']:.4f} | "
                             f"{t['map_all']:.4f} +- {t['map_all_std']:.4f} | {i['map_50']:.4f} | {t['map_50']:.4f} |")
    lines += ["", "Student minus teacher, mAP@all points averaged over bit lengths: " + ", ".join(
        f"{d} {m['mean_gain_over_teacher_points']:+.2f} (beats CCA-ITQ at every length: {m['beats_cca_itq_at_every_bits']})"
        for d, m in result["margins"].items())]
    if result["tuning"]:
        lines += ["", f"## Similarity designs tried (validation split, {result['tuning_bits']} bits, seed 0)", "",
                  "| source | rule | similar fraction | density | I->T mAP@all | T->I mAP@all |", "|---|---|---|---|---|---|"]
        for i in range(0, len(result["tuning"]), 2):
            a, b = result["tuning"][i], result["tuning"][i + 1]
            lines.append(f"| {a['source']} | {a['rule']} | {a['similar_fraction']} | {a['density']:.3f} | {a['map_all']:.4f} | {b['map_all']:.4f} |")
    lines += ["", "Chosen hyperparameters:", "", "```json", json.dumps(result["hyperparameters"], indent=2), "```", ""]
    return "\n".join(lines)


def machine():
    """The machine in words: cores, memory, Python and torch versions, accelerator."""
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal")) / 2**20
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), {memory:.0f} GiB, Python "
            f"{platform.python_version()}, torch {torch.__version__}, {device}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tune-bits", type=int, default=32, help="bit length of the design comparison (0: skip)")
    parser.add_argument("--max-items", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality-openclipart")
    args = parser.parse_args()
    os.chdir(ROOT)
    started = time.time()
    rows, tuning, info = [], [], None
    for seed in args.seeds:
        features, labels, info = prepare.prepare(f"openclipart:{ROOT / 'data' / 'openclipart'}", ROOT / ".dudch" / "cache",
                                                 prepare.PrepareConfig(seed=seed, max_items=args.max_items))
        for bits in args.bits:
            designs = DESIGNS if seed == args.seeds[0] and bits == args.tune_bits else None
            if designs:
                print(f"seed {seed}, {bits} bits: similarity designs on the validation split", flush=True)
                tuning += run_seed(features, labels, bits, seed, "validation", designs)[1]
            seed_rows, _ = run_seed(features, labels, bits, seed, "query")
            rows += seed_rows
            print(f"seed {seed}, {bits} bits: " + ", ".join(f"{r['method']} {r['direction']} {r['map_all']:.4f}"
                                                            for r in seed_rows), flush=True)
    table = aggregate(rows)
    result = dict(
        dataset=dict(name="openclipart", items=info["items"], num_labels=info["num_labels"], split=info["split"]),
        machine=machine(),
        command=" ".join(["make data && .venv/bin/python benchmarks/quality.py", *sys.argv[1:]]),
        commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        wall_time_s=time.time() - started, seeds=args.seeds, bits=args.bits, tuning_bits=args.tune_bits,
        hyperparameters=dict(teacher=asdict(TeacherConfig()), student=asdict(StudentConfig()),
                             similarity=dict(source=similarity.DEFAULT_SOURCE, rule=similarity.DEFAULT_RULE,
                                             similar_fraction=similarity.SIMILAR_FRACTION),
                             cca_itq=dict(pca_dim=256, itq_iterations=50)),
        rows=[r for r in table if r["method"] in METHODS],
        extra_rows=[r for r in table if r["method"] not in METHODS],
        margins=margins(table, args.bits), tuning=tuning)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
