"""Stage 5: evaluate teacher and student on the query set against the database.

Directions: i2t ranks the database's text-side codes for each image query; t2i ranks the
image-side codes for each text query. Methods:
  teacher            query sign(h_I) / sign(h_T); database the other modality's sign(h);
  student            queries sign(u) / sign(v); database the DCC codes B (transductive);
  student_inductive  as student, but database codes from the networks (items added later).
"""

import numpy as np

from dudch import metrics
from dudch.nets import hash_outputs, sign

DIRECTIONS = ("i2t", "t2i")
TOP_K = 50  # DJSRH reports mAP@50
PRECISION_CUTOFFS = (1, 5, 10, 20, 50, 100, 200, 500, 1000)


def method_codes(features, teacher_nets, student_nets, student_codes):
    """{method: {direction: (query codes, database codes)}}, all int8 in {-1, +1}."""
    query, database = features["query"], features["database"]
    image, text = features["image"], features["text"]

    def both(nets, rows):
        h_image, h_text = hash_outputs(nets, image[rows], text[rows])
        return sign(h_image), sign(h_text)

    t_qi, t_qt = both(teacher_nets, query)
    t_di, t_dt = both(teacher_nets, database)
    s_qi, s_qt = both(student_nets, query)
    s_di, s_dt = both(student_nets, database)
    return {
        "teacher": {"i2t": (t_qi, t_dt), "t2i": (t_qt, t_di)},
        "student": {"i2t": (s_qi, student_codes), "t2i": (s_qt, student_codes)},
        "student_inductive": {"i2t": (s_qi, s_dt), "t2i": (s_qt, s_di)},
    }


def evaluate(features, labels, teacher_nets, student_nets, student_codes, bits):
    """Returns (rows, curves).

    rows: [{"method", "bits", "direction", "map_all", "map_50"}] for every method and direction.
    curves: {method: {direction: {"pr": (precision, recall), "top": (cutoffs, precision)}}}.
    """
    query_labels = labels["labels"][features["query"]]
    db_labels = labels["labels"][features["database"]]
    cutoffs = np.array([c for c in PRECISION_CUTOFFS if c <= len(features["database"])])
    rows, curves = [], {}
    for method, by_direction in method_codes(features, teacher_nets, student_nets, student_codes).items():
        for direction, (q, b) in by_direction.items():
            rows.append(dict(method=method, bits=bits, direction=direction,
                             map_all=float(metrics.mean_average_precision(q, b, query_labels, db_labels)),
                             map_50=float(metrics.mean_average_precision(q, b, query_labels, db_labels, TOP_K))))
            curves.setdefault(method, {})[direction] = dict(
                pr=metrics.precision_recall_curve(q, b, query_labels, db_labels),
                top=(cutoffs, metrics.precision_at_top(q, b, query_labels, db_labels, cutoffs)))
    return rows, curves


def plot_curves(curves, bits):
    """Two matplotlib figures (precision-recall, precision@top-R), one panel per direction."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

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
