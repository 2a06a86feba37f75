"""A grown index against a retrained model, on OpenClipart: is `dudch index add` good enough to
wait for the next training?

    .venv/bin/python benchmarks/index_growth.py     # -> benchmarks/results/index-growth.{json,md}

20% of the database (seeded) is held back: the teacher and the student train on the other 80%
(the training subset loses its held-back items too), exactly as the pipeline's stages do (the
functions of benchmarks/quality.py). The held-back items are then added as `dudch index add`
adds them (`dudch.retrieval.joint_codes`, after the trained database), and the query set
retrieves from the whole database, compared with the model retrained on everything:
  grown              the 80% model's DCC codes, the added 20% coded sign(u + v) (what index add does)
  grown_image_code   ... the added 20% coded from their image alone, sign(u)
  grown_text_code    ... the added 20% coded from their text alone, sign(v)
  not_grown          the 80% model without the held-back items (they cannot be found)
  retrained          the model trained on everything, its DCC (transductive) codes
  retrained_joint    the model trained on everything, every item coded sign(u + v) by its networks
Every method ranks the same database in the same order (the held-back items last, where index
add appends them; ties go by that order). "self-retrieval": the fraction of added items that a
query by their own image (text) ranks first: by the codes alone (Hamming distance, items as
near by their agreement with the query's outputs before rounding, then by that order), and as
`dudch search` ranks, the items that hold exactly the query (the same image file, the same
text) first. Then the time
of the real `dudch index add` on the held-back drawings (a manifest of their SVG files, a cold
feature cache, a sqlite registry) per 1,000 items, against a retraining of teacher, similarity
and student on cached features.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import cached_teacher, cpu, graph_for, machine, train_student  # noqa: E402

from dudch import evaluate, nets, prepare, retrieval  # noqa: E402
from dudch.student import StudentConfig  # noqa: E402
from dudch.teacher import TeacherConfig  # noqa: E402
from dudch.teacher import fit as fit_teacher  # noqa: E402

METHODS = ("grown", "grown_image_code", "grown_text_code", "not_grown", "retrained", "retrained_joint")


def held_back(features, fraction, seed):
    """(features of the reduced dataset, the held-back rows): `fraction` of the database, seeded."""
    database = features["database"]
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(database, size=round(fraction * len(database)), replace=False))
    reduced = {**features, **{k: np.setdiff1d(features[k], held) for k in ("database", "train", "validation")}}
    return reduced, held


def self_retrieval(query_outputs, retriever, rows, first=None):
    """The fraction of queries i whose item, at database row rows[i], comes first: query_outputs
    (q, bits) the queries' continuous outputs, ranked as `retrieval.Retriever.search` ranks them
    (Hamming distance, then agreement with the outputs, then row), after the rows `first` of
    each query when given (its exact matches)."""
    return float(np.mean(retriever.search(query_outputs, 1, first)[1][:, 0] == rows))


def shared(features, held):
    """{modality: the fraction of the held-back items whose feature row some other database item
    has too}: a query by such an image (text) is the same query for both, and only one can be first."""
    database = features["database"]
    fractions = {}
    for modality in ("image", "text"):
        _, group, size = np.unique(features[modality][database], axis=0, return_inverse=True, return_counts=True)
        fractions[modality] = float(np.mean(size[group.ravel()][np.searchsorted(database, held)] > 1))
    return fractions


def shared_exactly(keys, database, held):
    """The fraction of the held-back items whose key (normalised text, image file digest) some
    other database item has too: their own query matches both exactly."""
    counts = collections.Counter(keys[database].tolist())
    return float(np.mean([counts[key] > 1 for key in keys[held].tolist()]))


def compare(features, labels, info, bits, seed, fraction):
    """Score rows of every method at `bits`, the self-retrieval rates, and the training seconds."""
    reduced, held = held_back(features, fraction, seed)
    reduced_info = dict(info, digest=f"{info['digest']}-held-back-{fraction}-{seed}")  # its own teacher cache key
    teacher_config, config = TeacherConfig(bits=bits, seed=seed), StudentConfig(bits=bits, seed=seed)
    image, text = features["image"], features["text"]
    small_teacher = cached_teacher(reduced, reduced_info, teacher_config)
    small, small_codes = train_student(reduced, graph_for(reduced, small_teacher), config)
    started = time.perf_counter()  # a retraining on everything, timed: its teacher is not taken from a cache
    teacher = fit_teacher(image[features["train"]], text[features["train"]], teacher_config)
    full, full_codes = train_student(features, graph_for(features, teacher), config)
    retrain_seconds = time.perf_counter() - started

    order = np.concatenate([reduced["database"], held])  # the grown database's rows, in its order
    h_image, h_text = nets.hash_outputs(small, image[held], text[held])
    added = {"grown": retrieval.joint_codes(small, image[held], text[held]),
             "grown_image_code": nets.sign(h_image), "grown_text_code": nets.sign(h_text)}
    query = features["query"]
    small_queries = evaluate.network_codes(small, features, query)
    full_queries = evaluate.network_codes(full, features, query)
    grown_db = {name: np.concatenate([small_codes, codes]) for name, codes in added.items()}
    full_db = {"retrained": full_codes[np.searchsorted(features["database"], order)],
               "retrained_joint": retrieval.joint_codes(full, image[order], text[order])}
    by_method = {name: {"i2t": (small_queries[0], b), "t2i": (small_queries[1], b)} for name, b in grown_db.items()}
    by_method.update({name: {"i2t": (full_queries[0], b), "t2i": (full_queries[1], b)} for name, b in full_db.items()})
    rows, _ = evaluate.score(by_method, dict(features, database=order), labels, bits, curves=False)
    not_grown, _ = evaluate.score({"not_grown": {"i2t": (small_queries[0], small_codes), "t2i": (small_queries[1], small_codes)}},
                                  reduced, labels, bits, curves=False)
    # Self-retrieval of the added items, by their own image (its file) and text queries.
    own_rows = np.arange(len(reduced["database"]), len(order))
    own = {"small": (np.tanh(h_image), np.tanh(h_text)),
           "full": tuple(np.tanh(h) for h in nets.hash_outputs(full, image[held], text[held]))}
    files = [ROOT / "data" / "openclipart" / path for path in labels["path"][held]]
    selves = {}
    for model, databases in (("small", grown_db), ("full", full_db)):
        for name, b in databases.items():
            searched = retrieval.Retriever(None, {}, retrieval.pack(b), bits, labels["item_id"][order],
                                           labels["text"][order], labels["image_sha256"][order])
            first = {"image": searched.exact_matches(images=files),
                     "text": searched.exact_matches(texts=labels["text"][held].tolist())}
            selves[name] = {**{modality: self_retrieval(own[model][m], searched, own_rows)
                               for m, modality in enumerate(("image", "text"))},
                            **{f"{modality}_exact_first": self_retrieval(own[model][m], searched, own_rows, first[modality])
                               for m, modality in enumerate(("image", "text"))}}
    return rows + not_grown, selves, retrain_seconds, small, small_codes, reduced, held


def register_reduced(store, student, codes, reduced, labels, info, bits):
    """The 80% model registered as models:/bench/1 in a sqlite store, as `dudch promote` registers one."""
    from pipeline import registry, tracking

    os.environ["MLFLOW_TRACKING_URI"] = store
    experiment = tracking.connect(ROOT)  # the store's "dudch" experiment, artifacts beside its file
    with tempfile.TemporaryDirectory() as tmp:
        student_path = Path(tmp) / "student.pt"
        nets.save(student_path, student, StudentConfig(bits=bits))
        rows = reduced["database"]
        folder = Path(tmp) / "retriever"
        retrieval.save(folder, student_path, info["encoders"], codes, labels["item_id"][rows], labels["text"][rows],
                       labels["image_sha256"][rows])
        registry.register(folder, "bench", {"dudch.bits": str(bits)}, None, experiment_id=experiment,
                          run_name="reduced", parent_run_id=None, run_tags={})


def time_index_add(features, labels, held, student, codes, reduced, info, bits):
    """Seconds of the real `dudch index add` adding the held-back drawings, with a cold feature cache."""
    from dudch import sources

    with tempfile.TemporaryDirectory(dir=ROOT / ".dudch") as tmp:  # beside data/: hard links work
        store = f"sqlite:///{tmp}/mlflow.db"
        register_reduced(store, student, codes, reduced, labels, info, bits)
        folder = Path(tmp) / "added"
        (folder / "images").mkdir(parents=True)
        records = []
        for row in held:
            name = f"images/{labels['item_id'][row]}.svg"
            drawing = ROOT / "data" / "openclipart" / labels["path"][row]
            try:
                os.link(drawing, folder / name)
            except OSError:  # another file system
                (folder / name).write_bytes(drawing.read_bytes())
            records.append(json.dumps(dict(image=name, text=str(labels["text"][row]))))
        manifest = folder / "pairs.jsonl"
        manifest.write_text("\n".join(records) + "\n")
        data = sources.load(f"manifest:{manifest}")
        for entry in prepare.image_cache_paths(ROOT / ".dudch" / "cache", data.content_keys, prepare.PrepareConfig()):
            for path in (entry, entry.with_name(entry.name + ".seal.json")):
                path.unlink(missing_ok=True)
        started = time.perf_counter()
        done = subprocess.run([str(ROOT / ".venv" / "bin" / "dudch"), "index", "add", "--model", "models:/bench/1",
                               "--dataset", f"manifest:{manifest}"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "MLFLOW_TRACKING_URI": store})
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"dudch index add failed: {done.stderr[-2000:]}")
        return seconds, done.stdout.strip().splitlines()[0]


def markdown(result):
    lines = ["# A grown index against a retrained model (OpenClipart)", "",
             f"Machine: {result['machine']}; CPU: {result['cpu']}. Command: `{result['command']}` at commit "
             f"{result['commit']}. Wall time: {result['wall_time_s'] / 60:.1f} min.",
             f"{result['held_back']} of {result['database']} database items ({result['fraction']:.0%}, seed "
             f"{result['seed']}) held back from training and then added; {result['queries']} queries. mAP@50 is "
             f"DJSRH's calculate_top_map. Methods: see the benchmark's docstring. Self-retrieval: the share of "
             f"added items that a query by their own image (text) ranks first: by the codes alone (Hamming "
             f"distance, items as near by agreement with the query's outputs, then by row), and as `dudch search` "
             f"ranks, exact matches (the same image file, the same text) first.", "",
             "| method | bits | I->T mAP@50 | I->T mAP@all | T->I mAP@50 | T->I mAP@all | self-retrieval by image, codes "
             "alone | by text, codes alone | by image, exact first | by text, exact first |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["method"], r["bits"], r["direction"]): r for r in result["rows"]}
    for method in METHODS:
        for bits in result["bits"]:
            i2t, t2i = by[(method, bits, "i2t")], by[(method, bits, "t2i")]
            own = result["self_retrieval"][str(bits)].get(method)
            selves = (" | ".join(f"{own[k]:.2f}" for k in ("image", "text", "image_exact_first", "text_exact_first"))
                      if own else "- | - | - | -")
            lines.append(f"| {method} | {bits} | {i2t['map_50']:.3f} | {i2t['map_all']:.3f} | {t2i['map_50']:.3f} | "
                         f"{t2i['map_all']:.3f} | {selves} |")
    same = result["shared_query"]
    lines += ["", f"Of the added items, {same['image']:.0%} share their image features and {same['text']:.0%} their "
              f"bag-of-words with another database item (duplicate drawings; the same tags within the vocabulary): "
              f"for those, by the codes alone their own query is just as much the other item's, and the two items' "
              f"codes decide which comes first. Exactly (as exact matches compare them), "
              f"{result['shared_exactly']['image']:.0%} share their image file and {result['shared_exactly']['text']:.0%} "
              f"their text with another database item.",
              "", "Grown minus retrained, points (mAP@50 / mAP@all):", ""]
    for bits in result["bits"]:
        gaps = [f"{d} {100 * (by[('grown', bits, d)]['map_50'] - by[('retrained', bits, d)]['map_50']):+.2f} / "
                f"{100 * (by[('grown', bits, d)]['map_all'] - by[('retrained', bits, d)]['map_all']):+.2f}"
                for d in evaluate.DIRECTIONS]
        lines.append(f"- {bits} bits: " + ", ".join(gaps))
    lines += ["", "Time (cold feature cache for the added drawings; retraining on cached features):", "",
              "| bits | `dudch index add` of the held-back items | per 1,000 items | retraining teacher + similarity + student |",
              "|---|---|---|---|"]
    for bits in result["bits"]:
        t = result["timing"][str(bits)]
        lines.append(f"| {bits} | {t['index_add_s']:.1f} s | {t['index_add_per_1000_s']:.1f} s | {t['retrain_s']:.1f} s |")
    lines += ["", f"`dudch index add` said: `{result['timing'][str(result['bits'][-1])]['said']}`", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--fraction", type=float, default=0.2, help="share of the database held back")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "index-growth")
    args = parser.parse_args()
    os.chdir(ROOT)
    import torch

    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    started = time.time()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    features, labels, info = prepare.prepare(f"openclipart:{ROOT / 'data' / 'openclipart'}", ROOT / ".dudch" / "cache",
                                             prepare.PrepareConfig(seed=args.seed), progress=False)
    rows, selves, timing = [], {}, {}
    for bits in args.bits:
        scored, selves[str(bits)], retrain_s, small, small_codes, reduced, held = compare(
            features, labels, info, bits, args.seed, args.fraction)
        rows += scored
        add_s, said = time_index_add(features, labels, held, small, small_codes, reduced, info, bits)
        timing[str(bits)] = dict(index_add_s=add_s, index_add_per_1000_s=1000 * add_s / len(held), retrain_s=retrain_s,
                                 said=said)
        print(f"{bits} bits: " + ", ".join(f"{r['method']} {r['direction']} {r['map_50']:.3f}/{r['map_all']:.3f}"
                                           for r in scored) + f"; index add {add_s:.1f} s, retrain {retrain_s:.1f} s", flush=True)
    result = dict(machine=machine(), cpu=cpu(), commit=commit, command=" ".join(
                      ["make data && .venv/bin/python benchmarks/index_growth.py", *sys.argv[1:]]),
                  wall_time_s=time.time() - started, bits=args.bits, seed=args.seed, fraction=args.fraction,
                  database=len(features["database"]), held_back=len(held), queries=len(features["query"]),
                  rows=rows, self_retrieval=selves, shared_query=shared(features, held),
                  shared_exactly={"image": shared_exactly(labels["image_sha256"], features["database"], held),
                                  "text": shared_exactly(np.array([retrieval.normalised_text(t) for t in labels["text"]]),
                                                         features["database"], held)},
                  timing=timing)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
