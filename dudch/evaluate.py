"""Stage 5: evaluate hashing methods on held-out queries against the database.

Directions: i2t ranks the database's text-side codes for each image query; t2i ranks the
image-side codes for each text query. Methods (each a {direction: (query codes, database
codes)} built by a function below):
  teacher            queries sign(h_I) / sign(h_T); database the other modality's sign(h);
  student            queries sign(u) / sign(v); database the DCC codes B (transductive);
  student_inductive  as student, but database codes from the networks (items added later);
  cca_itq            the CCA-ITQ baseline's codes, inductive.
Splits: "query" (the test protocol: queries vs the database) or "validation" (for tuning:
validation items vs the database without them, so no item retrieves itself).
"""

import numpy as np

from dudch import DudchError, metrics
from dudch.nets import hash_outputs, image_input, sign

DIRECTIONS = ("i2t", "t2i")
TOP_K = 50  # DJSRH reports mAP@50
PRECISION_CUTOFFS = (1, 5, 10, 20, 50, 100, 200, 500, 1000)


def split_rows(features, split):
    """(query rows, database rows, database mask): rows index the items; the mask selects the
    database rows used, in the order of features['database']."""
    database = features["database"]
    if split == "query":
        return features["query"], database, np.ones(len(database), dtype=bool)
    if split == "validation":
        mask = ~np.isin(database, features["validation"])
        return features["validation"], database[mask], mask
    raise ValueError(f"unknown split {split!r}: 'query' or 'validation'")


def network_codes(nets, features, rows):
    """(image codes, text codes) of items `rows` from HashNets outputs."""
    h_image, h_text = hash_outputs(nets, image_input(nets, features)[rows], features["text"][rows])
    return sign(h_image), sign(h_text)


def cross_modal(query_rows, database_rows, encode):
    """{direction: (query, database)} for an inductive encoder `encode(rows) -> (image, text)`."""
    q_image, q_text = encode(query_rows)
    d_image, d_text = encode(database_rows)
    return {"i2t": (q_image, d_text), "t2i": (q_text, d_image)}


def teacher_codes(teacher, features, split="query"):
    query, database, _ = split_rows(features, split)
    return cross_modal(query, database, lambda rows: network_codes(teacher, features, rows))


def student_codes(student, database_codes, features, split="query"):
    """The transductive ('student') and inductive ('student_inductive') variants."""
    query, database, mask = split_rows(features, split)
    inductive = cross_modal(query, database, lambda rows: network_codes(student, features, rows))
    q_image, q_text = inductive["i2t"][0], inductive["t2i"][0]
    b = database_codes[mask]
    return {"student": {"i2t": (q_image, b), "t2i": (q_text, b)}, "student_inductive": inductive}


def cca_itq_codes(model, features, split="query"):
    query, database, _ = split_rows(features, split)
    encode = lambda rows: (model.encode_image(features["image"][rows]), model.encode_text(features["text"][rows]))
    return cross_modal(query, database, encode)


def score(codes_by_method, features, labels, bits, split="query", curves=True):
    """Returns (rows, curves).

    codes_by_method: {method: {direction: (query codes, database codes)}}.
    rows: [{"method", "bits", "direction", "map_all", "map_50", "distinct_codes"}] for every
    method and direction; distinct_codes is the fraction of database codes that are distinct
    (1: every item has its own code; low values mean big ties, where rankings are arbitrary).
    curves: {method: {direction: {"pr": (precision, recall), "top": (cutoffs, precision)}}}
    (empty when curves=False).
    """
    if labels["labels"].shape[1] == 0:
        raise DudchError("the dataset has no labels, so mAP cannot be computed; give the items "
                         "labels (e.g. \"labels\" in the manifest) to evaluate retrieval")
    query, database, _ = split_rows(features, split)
    query_labels, db_labels = labels["labels"][query], labels["labels"][database]
    cutoffs = np.array([c for c in PRECISION_CUTOFFS if c <= len(database)])
    rows, all_curves = [], {}
    for method, by_direction in codes_by_method.items():
        for direction, (q, b) in by_direction.items():
            stats = metrics.rank_statistics(q, b, query_labels, db_labels, TOP_K, cutoffs)
            rows.append(dict(method=method, bits=bits, direction=direction,
                             map_all=float(stats["ap_all"].mean()), map_50=float(stats["ap_top"].mean()),
                             distinct_codes=len(np.unique(b, axis=0)) / len(b)))
            if curves:
                all_curves.setdefault(method, {})[direction] = dict(
                    pr=metrics.precision_recall(stats),
                    top=(cutoffs, metrics.precision_at(stats, cutoffs, len(database))))
    return rows, all_curves


def evaluate(features, labels, teacher, student, database_codes, bits, split="query"):
    """Teacher, student and student_inductive scored on `split`: (rows, curves) as `score`."""
    codes = {"teacher": teacher_codes(teacher, features, split),
             **student_codes(student, database_codes, features, split)}
    return score(codes, features, labels, bits, split)


def plot_curves(curves, bits):
    """Two matplotlib figures (precision-recall, precision@top-R), one panel per direction."""
    plt = _pyplot()
    figures = {}
    for kind, xlabel, ylabel in (("pr", "recall", "precision"), ("top", "top R retrieved", "precision")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, direction in zip(axes, DIRECTIONS):
            for method, by_direction in curves.items():
                a, b = by_direction[direction][kind]
                x, y = (b, a) if kind == "pr" else (a, b)
                ax.plot(x, y, marker=".", label=method)
            ax.set(title=f"{direction.upper().replace('2', ' -> ')}, {bits} bits", xlabel=xlabel, ylabel=ylabel)
            if kind == "top":
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        figures["precision_recall" if kind == "pr" else "precision_at_top"] = fig
    return figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def plot_map_vs_bits(rows, title=""):
    """One matplotlib figure: mAP@50 and mAP@all against code length, a line per method and
    direction. rows: score rows as `score` returns them (any methods and bit lengths)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lines = sorted({(r["method"], r["direction"]) for r in rows})
    for ax, (metric, name) in zip(axes, (("map_50", "mAP@50"), ("map_all", "mAP@all"))):
        for method, direction in lines:
            points = sorted((r["bits"], r[metric]) for r in rows if (r["method"], r["direction"]) == (method, direction))
            ax.plot(*zip(*points), marker="o", linestyle="-" if direction == "i2t" else "--",
                    label=f"{method} {direction.upper().replace('2', ' -> ')}")
        bits = sorted({r["bits"] for r in rows})
        ax.set(title=f"{name} {title}".strip(), xlabel="bits", ylabel=name, xscale="log", xticks=bits)
        ax.set_xticklabels([str(b) for b in bits])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_losses(history, title):
    """One matplotlib figure, a panel per curve: history is {name: [value per epoch/iteration]}."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(history), figsize=(5 * len(history), 3.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], history.items()):
        ax.plot(range(1, len(values) + 1), values, marker=".")
        ax.set(title=f"{title}: {name}", xlabel="epoch / iteration", ylabel=name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_retrieval_examples(codes, features, label_data, bits, queries=3, top=5):
    """A grid of retrieval examples: for the first `queries` query items in each direction, the
    query and the `top` nearest database items by Hamming distance, each shown as its image
    thumbnail and its text, with the distance. Titles are green
    when the item shares a label with the query (when there are labels).

    codes: {"i2t"|"t2i": (query codes, database codes)} on the "query" split, as
    `student_codes(...)["student"]`; label_data: the evaluation-only outputs of prepare
    (text, optional thumbnail and labels)."""
    from dudch.retrieval import hamming_ranking

    plt = _pyplot()
    query_rows, database_rows, _ = split_rows(features, "query")
    thumbnails, texts, labels = label_data.get("thumbnail"), label_data["text"], label_data["labels"]
    fig, axes = plt.subplots(2 * queries, top + 1, figsize=(2.2 * (top + 1), 2.4 * 2 * queries), squeeze=False)
    for block, direction in enumerate(DIRECTIONS):
        q_codes, d_codes = codes[direction]
        distances, ranked = hamming_ranking(q_codes[:queries], d_codes, top)
        for i in range(min(queries, len(q_codes))):
            row = axes[block * queries + i]
            query = query_rows[i]
            cells = [(query, f"{direction.upper().replace('2', ' -> ')} query", None)]
            cells += [(database_rows[r], f"d={d}", bool((labels[query] & labels[database_rows[r]]).any()) if labels.shape[1] else None)
                      for r, d in zip(ranked[i], distances[i])]
            for ax, (item, heading, relevant) in zip(row, cells):
                ax.axis("off")
                if thumbnails is not None:
                    ax.imshow(thumbnails[item])
                ax.text(0.5, -0.05, _short(texts[item]), ha="center", va="top", fontsize=6,
                        transform=ax.transAxes, wrap=True)
                ax.set_title(heading, fontsize=8,
                             color={True: "green", False: "red", None: "black"}[relevant])
    fig.suptitle(f"Student retrieval examples, {bits} bits (green: shares a label with the query)")
    fig.tight_layout()
    return fig


def _short(text, width=28):
    text = str(text)
    return text if len(text) <= width else text[:width - 1] + "…"
