"""Quality benchmark on OpenClipart: both teachers (DJSRH and UCCH, the strongest unsupervised
peer, each on its own), the student (DUDCH) distilled from the default teacher and from the
other, the student without a teacher (raw-feature similarity), CCA-ITQ and the relaxed
ablation, at 16/32/64/128 bits, on the query set; mean and std over seeds. mAP@50 (DJSRH's
calculate_top_map, the paper's metric) and mAP@all side by side, with the fraction of
distinct database codes.

    .venv/bin/python benchmarks/quality.py           # -> benchmarks/results/quality-openclipart.{json,md}
    .venv/bin/python benchmarks/quality.py --tune    # -> benchmarks/results/tuning-openclipart.{json,md}
    .venv/bin/python benchmarks/quality.py --tune-ucch --bits 64  # -> benchmarks/results/tuning-ucch-openclipart.*
    .venv/bin/python benchmarks/quality.py --design "graded 1%/10%"  # -> ...quality-openclipart-graded-1-10.*

`--tune` scores every design in DESIGNS on the validation split (validation items querying the
database without them), never on the queries; the student's defaults were chosen from it.
`--tune-ucch` does the same for UCCH_DESIGNS (UCCH's own settings, then the student distilled
from it from each similarity source); UCCH's defaults were chosen from it.
`--design` reruns the quality table with the student and student_raw_sim trained as one of
DESIGNS instead of the defaults: the query-set check of a design the tuning prefers.
Teachers are cached in .dudch/bench/teachers by the prepared features' digest and the teacher's
config, so tuning, reruns and the main run train each teacher once. Same functions as the
pipeline's stages (dudch.*), without KFP or MLflow around them.
"""

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dudch import evaluate, nets, prepare, similarity  # noqa: E402
from dudch.baselines import CCAITQ  # noqa: E402
from dudch.student import StudentConfig  # noqa: E402
from dudch.student import fit as fit_student  # noqa: E402
from dudch.teacher import DEFAULT_TEACHER, TeacherConfig  # noqa: E402
from dudch.teacher import fit as fit_teacher  # noqa: E402
from dudch.ucch import UCCHConfig  # noqa: E402
from dudch.ucch import fit as fit_ucch  # noqa: E402

# teacher: DJSRH; ucch: UCCH; student: distilled from DEFAULT_TEACHER, student_from_X from the other
# (through the similarity source the validation split prefers for it: tuning-ucch-openclipart.md)
METHODS = ("teacher", "ucch", "student", "student_inductive", "student_raw_sim", "student_from_ucch",
           "student_from_djsrh", "cca_itq", "student_relaxed")
PREFERRED_SOURCE = {"djsrh": similarity.DEFAULT_SOURCE, "ucch": "deep"}
# (name, UCCH settings): what --tune-ucch compares, the paper's feature-mode settings first, then
# narrower networks (the training set is 2,861 pairs, not MIRFLICKR's 5,000+), then the other
# knobs around the narrowest.
UCCH_DESIGNS = [
    ("paper: 8192 wide, 20 epochs, lr 1e-4, T 0.9", dict(hidden=8192, temperature=0.9)),
    ("4096 wide", dict(hidden=4096, temperature=0.9)),
    ("2048 wide", dict(hidden=2048, temperature=0.9)),
    ("2048 wide, 50 epochs", dict(hidden=2048, temperature=0.9, epochs=50)),
    ("2048 wide, lr 3e-4", dict(hidden=2048, temperature=0.9, lr=3e-4)),
    ("2048 wide, T 0.3 (default)", dict(hidden=2048, temperature=0.3)),
]
GATED = ("map_50", "map_all")  # the student must be at or above the teacher on both
# (name, similarity graph settings, student settings): what --tune compares, each against the
# defaults. Graph settings: source, rule, parameter (kNN rules and graded: neighbours as a fraction
# of the database; quantile: the similar fraction), related_fraction.
QUANTILE = dict(rule="quantile", parameter=0.2)
DESIGNS = [
    ("before: quantile 20%, unbalanced, random start", QUANTILE, dict(soft_constraint=False, init="random")),
    ("quantile 20%", QUANTILE, {}),
    ("quantile 5%", dict(QUANTILE, parameter=0.05), {}),
    ("union kNN 1%", dict(rule="union_knn"), {}),
    ("graded 1%/20%, SGD as ADSH", {}, dict(optimizer="sgd", lr_step=10, weight_decay=5e-4)),
    ("graded 1%/20%, unbalanced", {}, dict(soft_constraint=False)),
    ("graded 1%/20%, zeros start as ADSH", {}, dict(init="zeros")),
    ("graded 1%/20%, lr / 10 every 10 iterations", {}, dict(lr_step=10)),
    ("graded 1%/10%", dict(related_fraction=0.1), {}),
    ("graded 2%/20%", dict(parameter=0.02), {}),
    ("graded 1%/20%, gamma 200 as ADSH (before)", {}, dict(gamma=200.0)),
    ("graded 1%/20%, gamma 1600", {}, dict(gamma=1600.0)),
    ("graded 1%/20% (default)", {}, {}),
]


def graph_for(features, teacher, source=similarity.DEFAULT_SOURCE, rule=similarity.DEFAULT_RULE,
              parameter=similarity.NEIGHBOUR_FRACTION, related_fraction=similarity.RELATED_FRACTION):
    database = features["database"]
    z, codes = similarity.embedding(source, features["image"][database], features["text"][database], teacher)
    value = parameter if rule == "quantile" else max(1, round(parameter * len(database)))
    return similarity.SimilarityGraph(z, rule, value, related_fraction, codes)


def train_student(features, graph, config):
    database = features["database"]
    return fit_student(features["image"][database], features["text"][database],
                       np.searchsorted(database, features["train"]), graph, config)


def cached_teacher(features, info, config):
    """The teacher (DJSRH for a TeacherConfig, UCCH for a UCCHConfig) for these features and
    config, trained once and kept in .dudch/bench."""
    fit = fit_ucch if isinstance(config, UCCHConfig) else fit_teacher
    key = hashlib.sha256(json.dumps([info["digest"], type(config).__name__, asdict(config),
                                     torch.__version__]).encode()).hexdigest()[:20]
    path = ROOT / ".dudch" / "bench" / "teachers" / f"{key}.pt"
    if path.exists():
        return nets.load(path)[0]
    train = features["train"]
    teacher = fit(features["image"][train], features["text"][train], config)
    path.parent.mkdir(parents=True, exist_ok=True)
    nets.save(path, teacher, config)
    return teacher


def prepared(seed, max_items):
    """(features, labels, info) of OpenClipart split with `seed` (image features from the cache)."""
    return prepare.prepare(f"openclipart:{ROOT / 'data' / 'openclipart'}", ROOT / ".dudch" / "cache",
                           prepare.PrepareConfig(seed=seed, max_items=max_items), progress=False)


def quality_cell(seed, bits, ablations, max_items, threads, design):
    """One (seed, bits) cell of the quality table, in a worker process: (score rows, dataset info)."""
    torch.set_num_threads(threads)
    features, labels, info = prepared(seed, max_items)
    return run_seed(features, labels, info, bits, seed, ablations, design), info


def run_seed(features, labels, info, bits, seed, ablations, design=({}, {})):
    """Every method at one bit length and seed on the query set: score rows. design: the (graph,
    student) settings of one of DESIGNS, which the student and student_raw_sim follow."""
    graph_settings, student_settings = design
    teachers = {"djsrh": cached_teacher(features, info, TeacherConfig(bits=bits, seed=seed)),
                "ucch": cached_teacher(features, info, UCCHConfig(bits=bits, seed=seed))}
    (other,) = set(teachers) - {DEFAULT_TEACHER}
    config = StudentConfig(bits=bits, seed=seed, **student_settings)
    distilled = graph_for(features, teachers[DEFAULT_TEACHER], **graph_settings)
    student, codes = train_student(features, distilled, config)
    raw_config = replace(config, init="zeros")  # no teacher, so no teacher codes to start from
    raw, raw_codes = train_student(features, graph_for(features, None, **dict(graph_settings, source="raw")), raw_config)
    codes_by_method = {"teacher": evaluate.teacher_codes(teachers["djsrh"], features),
                       "ucch": evaluate.teacher_codes(teachers["ucch"], features),
                       **evaluate.student_codes(student, codes, features),
                       "student_raw_sim": evaluate.student_codes(raw, raw_codes, features)["student"]}
    if ablations:
        train = features["train"]
        cca = CCAITQ(bits, seed=seed).fit(features["image"][train], features["text"][train])
        relaxed, relaxed_codes = train_student(features, distilled, replace(config, discrete=False))
        from_other_graph = graph_for(features, teachers[other], source=PREFERRED_SOURCE[other])
        from_other, from_other_codes = train_student(features, from_other_graph, config)
        codes_by_method.update({f"student_from_{other}": evaluate.student_codes(from_other, from_other_codes, features)["student"]},
                               cca_itq=evaluate.cca_itq_codes(cca, features),
                               student_relaxed=evaluate.student_codes(relaxed, relaxed_codes, features)["student"])
    rows, _ = evaluate.score(codes_by_method, features, labels, bits, curves=False)
    return [dict(r, seed=seed) for r in rows + by_query_text(codes_by_method, features, labels, bits)]


# T->I over two parts of the query set: texts with no word of the bag-of-words vocabulary (one
# code for all of them, whatever the method) and texts with at least one.
QUERY_TEXT_GROUPS = ("t2i_no_words", "t2i_words")


def by_query_text(codes_by_method, features, labels, bits):
    """T->I score rows of each method over each of QUERY_TEXT_GROUPS (as their direction)."""
    query = features["query"]
    worded = features["text"][query].any(axis=1)
    rows = []
    for group, keep in zip(QUERY_TEXT_GROUPS, (~worded, worded)):
        subset = {method: {"t2i": (codes["t2i"][0][keep], codes["t2i"][1])} for method, codes in codes_by_method.items()}
        scored, _ = evaluate.score(subset, dict(features, query=query[keep]), labels, bits, curves=False)
        rows += [dict(r, direction=group, queries=int(keep.sum())) for r in scored]
    return rows


def query_text_counts(rows):
    """{group: {seed: queries}}: how many queries each of QUERY_TEXT_GROUPS holds, per seed (the
    split, and so the query set, depends on the seed)."""
    counts = {}
    for r in rows:
        if r["direction"] in QUERY_TEXT_GROUPS:
            counts.setdefault(r["direction"], {})[str(r["seed"])] = r["queries"]
    return counts


def tune(features, labels, info, bits, seed):
    """Every design in DESIGNS on the validation split: score rows with the design's name."""
    teacher = cached_teacher(features, info, TeacherConfig(bits=bits, seed=seed))
    rows, _ = evaluate.score({"teacher": evaluate.teacher_codes(teacher, features, "validation")},
                             features, labels, bits, "validation", curves=False)
    rows = [dict(r, design="teacher (DJSRH)", density=None) for r in rows]
    for name, graph_settings, student_settings in DESIGNS:
        graph = graph_for(features, teacher, **graph_settings)
        started = time.time()
        student, codes = train_student(features, graph, replace(StudentConfig(bits=bits, seed=seed), **student_settings))
        scored, _ = evaluate.score({"student": evaluate.student_codes(student, codes, features, "validation")["student"]},
                                   features, labels, bits, "validation", curves=False)
        rows += [dict(r, design=name, density=graph.density(), seconds=time.time() - started) for r in scored]
        print(f"{bits} bits, {name}: " + " ".join(f"{r['direction']} {r['map_50']:.3f}/{r['map_all']:.3f}" for r in scored), flush=True)
    return rows


def tune_ucch(features, labels, info, bits, seed):
    """UCCH_DESIGNS on the validation split, then the student distilled from the default UCCH
    (UCCHConfig) through each similarity source: score rows with the design's name."""
    rows = []
    for name, settings in UCCH_DESIGNS:
        started = time.time()
        model = cached_teacher(features, info, replace(UCCHConfig(bits=bits, seed=seed), **settings))
        scored, _ = evaluate.score({"ucch": evaluate.teacher_codes(model, features, "validation")},
                                   features, labels, bits, "validation", curves=False)
        rows += [dict(r, design=f"UCCH, {name}", density=None, seconds=time.time() - started) for r in scored]
        print(f"{bits} bits, UCCH {name}: " + " ".join(f"{r['direction']} {r['map_50']:.3f}/{r['map_all']:.3f}" for r in scored), flush=True)
    ucch = cached_teacher(features, info, UCCHConfig(bits=bits, seed=seed))
    for source in ("hash", "deep", "both"):
        graph = graph_for(features, ucch, source=source)
        started = time.time()
        student, codes = train_student(features, graph, StudentConfig(bits=bits, seed=seed))
        scored, _ = evaluate.score({"student": evaluate.student_codes(student, codes, features, "validation")["student"]},
                                   features, labels, bits, "validation", curves=False)
        rows += [dict(r, design=f"student from UCCH, source {source}", density=graph.density(),
                      seconds=time.time() - started) for r in scored]
        print(f"{bits} bits, student from UCCH ({source}): " + " ".join(f"{r['direction']} {r['map_50']:.3f}/{r['map_all']:.3f}" for r in scored), flush=True)
    return rows


def aggregate(rows, by=("method", "bits", "direction")):
    """Mean (and std) over seeds of each metric, per `by` group, in first-seen order."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    return [dict(zip(by, key), seeds=len(group),
                 **{m: float(np.mean([r[m] for r in group])) for m in (*GATED, "distinct_codes")},
                 **{f"{m}_std": float(np.std([r[m] for r in group])) for m in GATED})
            for key, group in groups.items()]


# (method, reference): the differences the benchmark exists to show, in points.
GAPS = [("student", "teacher"), ("student", "ucch"), ("student_inductive", "ucch"),
        ("student", "student_raw_sim"), ("student_from_ucch", "ucch"), ("student_from_djsrh", "teacher")]


def comparison(table, bits_list, directions=evaluate.DIRECTIONS):
    """{"method-reference": {"metric.direction": gains}} for each pair in GAPS present in the
    table: method minus reference in points per bit length, their mean, and whether the method
    is at or above at every length."""
    value = {(r["method"], r["bits"], r["direction"]): r for r in table}
    out = {}
    for method, reference in GAPS:
        if not all((m, b, directions[0]) in value for m in (method, reference) for b in bits_list):
            continue
        gaps = out.setdefault(f"{method}-{reference}", {})
        for metric in GATED:
            for direction in directions:
                gains = [100 * (value[(method, b, direction)][metric] - value[(reference, b, direction)][metric])
                         for b in bits_list]
                gaps[f"{metric}.{direction}"] = dict(mean_points=float(np.mean(gains)),
                                                     per_bits=dict(zip(map(str, bits_list), gains)),
                                                     at_or_above_at_every_bits=all(g >= 0 for g in gains))
    return out


def header(result, what):
    return [f"Machine: {result['machine']}. Command: `{result['command']}` at commit {result['commit']}. "
            f"Wall time: {result['wall_time_s'] / 60:.1f} min.",
            f"{what}: {result['dataset']['split']['query']} queries against a database of "
            f"{result['dataset']['split']['database']} items; {result['dataset']['num_labels']} labels.", ""]


def with_spread(r, metric, std=True):
    """'0.612 +- 0.015': a metric of a table row, with its std over seeds when there are several."""
    return f"{r[metric]:.3f}" + (f" +- {r[metric + '_std']:.3f}" if std and r.get("seeds", 1) > 1 else "")


def cells(r, std=True):
    return f"{with_spread(r, 'map_50', std)} | {with_spread(r, 'map_all', std)} | {r['distinct_codes']:.2f}"


def slug(design):
    """'graded 1%/10%' -> 'graded-1-10': a design's name as a file name."""
    return "-".join("".join(c if c.isalnum() else " " for c in design.split("(")[0]).split())


def markdown(result):
    ablations = f"seeds {result['ablation_seeds']}" if result["ablation_seeds"] else "not run"
    lines = ["# Quality on OpenClipart", "", *header(result, "Query set"),
             f"Mean +- std over seeds {result['seeds']} (ablations and CCA-ITQ: {ablations}). "
             "mAP@50 is DJSRH's calculate_top_map; distinct: distinct database codes / database size.", "",
             "| method | bits | I->T mAP@50 | I->T mAP@all | I->T distinct | T->I mAP@50 | T->I mAP@all | T->I distinct |",
             "|---|---|---|---|---|---|---|---|"]
    by = {(r["method"], r["bits"], r["direction"]): r for r in result["table"]}
    for method in METHODS:
        for bits in result["bits"]:
            if (method, bits, "i2t") in by:
                lines.append(f"| {method} | {bits} | {cells(by[(method, bits, 'i2t')])} | {cells(by[(method, bits, 't2i')])} |")
    lines += ["", "Differences in points (method minus reference), per bit length and averaged over lengths "
              "(student_from_*: the ablation seeds):", "", *gap_table(result["comparison"], result["bits"])]
    if result.get("comparison_by_query_text"):
        groups = [r for r in result["table"] if r["direction"] in QUERY_TEXT_GROUPS]
        per_seed = lambda group: (f"seeds {', '.join(result['query_text_counts'][group])}: "
                                  + ", ".join(map(str, result["query_text_counts"][group].values())) + " queries")
        lines += ["", f"T->I by the query's text: t2i_no_words, the queries whose text has no word of the "
                  f"bag-of-words vocabulary ({per_seed('t2i_no_words')}; every method gives them all one code); "
                  f"t2i_words, the others ({per_seed('t2i_words')}).", "",
                  "| method | bits | no words mAP@50 | no words mAP@all | words mAP@50 | words mAP@all |",
                  "|---|---|---|---|---|---|"]
        by = {(r["method"], r["bits"], r["direction"]): r for r in groups}
        for method in METHODS:
            for bits in result["bits"]:
                if (method, bits, QUERY_TEXT_GROUPS[0]) in by:
                    lines.append(f"| {method} | {bits} | " + " | ".join(
                        with_spread(by[(method, bits, g)], m) for g in QUERY_TEXT_GROUPS for m in ("map_50", "map_all")) + " |")
        lines += ["", "Their differences in points:", "", *gap_table(result["comparison_by_query_text"], result["bits"])]
    if result.get("design"):
        lines += ["", f"The student and student_raw_sim follow the design \"{result['design']}\" of "
                  "benchmarks/quality.py's DESIGNS, not the defaults below."]
    lines += ["", "Settings (the defaults of `dudch params`):", "", "```json",
              json.dumps(result["hyperparameters"], indent=2), "```", ""]
    return "\n".join(lines)


def gap_table(comparison_result, bits_list):
    """The markdown rows of a comparison(): one per pair, metric and direction."""
    lines = ["| method - reference | metric | direction | " + " | ".join(f"{b} bits" for b in bits_list)
             + " | mean | at or above at every length |", "|---|---|---|" + "---|" * (len(bits_list) + 2)]
    for pair, gaps in comparison_result.items():
        for key, m in gaps.items():
            metric, direction = key.split(".")
            lines.append(f"| {pair.replace('-', ' - ')} | {metric} | {direction} | "
                         + " | ".join(f"{g:+.2f}" for g in m["per_bits"].values())
                         + f" | {m['mean_points']:+.2f} | {m['at_or_above_at_every_bits']} |")
    return lines


def tuning_markdown(result, title="Student designs"):
    lines = [f"# {title} on OpenClipart's validation split", "", *header(result, "Validation split"),
             f"Seed {result['seeds'][0]}; the validation items query the database without them. Each cell: "
             "mAP@50 | mAP@all | distinct database codes / database size. Density: fraction of pairs at the "
             "graph's top level.", ""]
    for bits in result["bits"]:
        lines += [f"## {bits} bits", "", "| design | density | I->T mAP@50 | I->T mAP@all | I->T distinct | "
                  "T->I mAP@50 | T->I mAP@all | T->I distinct |", "|---|---|---|---|---|---|---|---|"]
        rows = [r for r in result["rows"] if r["bits"] == bits]
        for i in range(0, len(rows), 2):
            a, b = rows[i], rows[i + 1]
            density = "" if a["density"] is None else f"{a['density']:.3f}"
            lines.append(f"| {a['design']} | {density} | {cells(a, std=False)} | {cells(b, std=False)} |")
        lines.append("")
    return "\n".join(lines)


def cpu():
    """The CPU in words: model name and whether it has AVX-512."""
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    return f"{model}, {'AVX-512' if 'avx512f' in info else 'no AVX-512'}"


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
    parser.add_argument("--ablation-seeds", type=int, nargs="*", default=[0],
                        help="seeds that also train CCA-ITQ, the relaxed student and the student from the "
                        "other teacher (two more student fits each)")
    parser.add_argument("--tune", action="store_true", help="score DESIGNS on the validation split (first seed)")
    parser.add_argument("--tune-ucch", action="store_true", help="score UCCH_DESIGNS and the student from "
                        "each of UCCH's similarity sources on the validation split (first seed)")
    parser.add_argument("--design", choices=[name for name, _, _ in DESIGNS], help="train the student and "
                        "student_raw_sim as this design of DESIGNS instead of the defaults (output: "
                        "quality-openclipart-<design>)")
    parser.add_argument("--max-items", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes for the (seed, bits) cells, "
                        "each with cores / jobs torch threads (results can differ in the last digits with "
                        "the thread count: summation order)")
    parser.add_argument("--out", type=Path, help="output path without suffix (default: benchmarks/results/"
                        "quality-openclipart, or tuning-openclipart with --tune)")
    args = parser.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    started = time.time()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    tuning = args.tune or args.tune_ucch
    rows, info = [], None
    if tuning:
        features, labels, info = prepared(args.seeds[0], args.max_items)
        for bits in args.bits:
            rows += (tune if args.tune else tune_ucch)(features, labels, info, bits, args.seeds[0])
    else:
        # (seed, bits) cells in worker processes; the ablation seeds' heavier cells go first
        cells = sorted(((seed, bits, seed in args.ablation_seeds) for seed in args.seeds for bits in args.bits),
                       key=lambda c: not c[2])
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        design = {name: (graph, student) for name, graph, student in DESIGNS}.get(args.design, ({}, {}))
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(quality_cell, *cell, args.max_items, threads, design) for cell in cells]
            for (seed, bits, _), future in zip(cells, futures):
                cell_rows, info = future.result()
                rows += cell_rows
                print(f"seed {seed}, {bits} bits (mAP@50/mAP@all): " + ", ".join(
                    f"{r['method']} {r['direction']} {r['map_50']:.3f}/{r['map_all']:.3f}" for r in cell_rows), flush=True)
        rows.sort(key=lambda r: (r["seed"], args.bits.index(r["bits"])))
    result = dict(
        dataset=dict(name="openclipart", items=info["items"], num_labels=info["num_labels"], split=info["split"]),
        machine=machine(),
        command="make data && .venv/bin/python " + shlex.join(["benchmarks/quality.py", *sys.argv[1:]]),
        commit=commit,
        wall_time_s=time.time() - started, seeds=args.seeds[:1] if tuning else args.seeds, jobs=args.jobs,
        design=args.design,
        ablation_seeds=args.ablation_seeds, bits=args.bits,
        hyperparameters=dict(teacher=asdict(TeacherConfig()), ucch=asdict(UCCHConfig()), student=asdict(StudentConfig()),
                             similarity=dict(source=similarity.DEFAULT_SOURCE, rule=similarity.DEFAULT_RULE,
                                             neighbour_fraction=similarity.NEIGHBOUR_FRACTION,
                                             related_fraction=similarity.RELATED_FRACTION),
                             cca_itq=dict(pca_dim=256, itq_iterations=50)))
    if args.tune:
        result.update(designs=[dict(name=n, graph=g, student=s) for n, g, s in DESIGNS], rows=rows)
        out, text = args.out or ROOT / "benchmarks" / "results" / "tuning-openclipart", tuning_markdown(result)
    elif args.tune_ucch:
        result.update(designs=[dict(name=n, ucch=s) for n, s in UCCH_DESIGNS], rows=rows)
        out = args.out or ROOT / "benchmarks" / "results" / "tuning-ucch-openclipart"
        text = tuning_markdown(result, "UCCH and the student distilled from it")
    else:
        table = aggregate(rows)
        result.update(table=table, comparison=comparison(table, args.bits),
                      comparison_by_query_text=comparison(table, args.bits, QUERY_TEXT_GROUPS),
                      query_text_counts=query_text_counts(rows), rows=rows)
        name = "quality-openclipart" + (f"-{slug(args.design)}" if args.design else "")
        out, text = args.out or ROOT / "benchmarks" / "results" / name, markdown(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
