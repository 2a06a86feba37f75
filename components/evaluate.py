from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components import component


@component
def evaluate(features: Input[Dataset], labels: Input[Dataset], teacher: Input[Model],
             student: Input[Model], bits: int, mlflow_parent_run_id: str,
             metrics: Output[Metrics], results: Output[Artifact], report: Output[Markdown]):
    """mAP@50 and mAP@all (I->T, T->I) of teacher and student, precision-recall and
    precision@top-R plots; `report` shows them in the KFP UI with a link to the MLflow run.
    The only stage that reads `labels`; for a label-less dataset it records that no mAP was
    computed, and why."""
    from components.console import task_console

    with task_console("evaluate", bits) as console:
        import base64
        import io
        import json
        import os

        import mlflow
        import numpy as np

        from components.tracking import markdown_table, run_link, stage_run
        from dudch import nets, prepare
        from dudch.teacher import TEACHER_NAMES
        from dudch.evaluate import evaluate as run_evaluation
        from dudch.evaluate import plot_curves, plot_retrieval_examples, student_codes

        feature_data = prepare.load_features(features.path, expect=("image", "text", "query", "database"))
        label_data = prepare.load(os.path.join(labels.path, "labels.npz"), expect=("labels", "text"))
        teacher_nets, _ = nets.load(os.path.join(teacher.path, "model.pt"))
        student_nets, _ = nets.load(os.path.join(student.path, "model.pt"))
        with np.load(os.path.join(student.path, "codes.npz")) as saved:
            codes = saved["codes"]

        def embedded(figure):
            png = io.BytesIO()
            figure.savefig(png, format="png", dpi=80)
            return f"![plot](data:image/png;base64,{base64.b64encode(png.getvalue()).decode()})"

        with stage_run(mlflow_parent_run_id, "evaluate", bits) as run:
            method = teacher.metadata.get("method", "djsrh")
            heading = (f"# DUDCH, {bits} bits, teacher {TEACHER_NAMES.get(method, method)}\n\n"
                       f"MLflow run: {run_link(run)}\n\n")
            if label_data["labels"].shape[1] == 0:
                console.warn("the dataset has no labels: the codes were trained, no mAP can be computed")
                mlflow.set_tag("dudch.evaluation", "skipped: the dataset has no labels")
                with open(results.path, "w") as f:
                    json.dump([], f)
                with open(report.path, "w") as f:
                    f.write(heading + "The dataset has no labels: the codes were trained, no mAP was computed.\n")
                return
            rows, curves = run_evaluation(feature_data, label_data, teacher_nets, student_nets, codes, bits)
            for row in rows:
                for name in ("map_50", "map_all", "distinct_codes"):
                    key = f"{row['method']}.{row['direction']}.{name}"
                    mlflow.log_metric(key, row[name])
                    metrics.log_metric(key, row[name])
            figures = plot_curves(curves, bits)
            for name, figure in figures.items():
                mlflow.log_figure(figure, f"plots/{name}_{bits}bits.png")
            with open(report.path, "w") as f:
                f.write(heading + "Query set; mAP@50 is DJSRH's calculate_top_map.\n\n" + markdown_table(rows)
                        + "\n\n" + "\n\n".join(embedded(figure) for figure in figures.values()) + "\n")
            examples = student_codes(student_nets, codes, feature_data)["student"]
            mlflow.log_figure(plot_retrieval_examples(examples, feature_data, label_data, bits),
                              f"plots/retrieval_examples_{bits}bits.png")
            mlflow.log_dict({"results": rows}, "results.json")
        with open(results.path, "w") as f:
            json.dump(rows, f, indent=2)
