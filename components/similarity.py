from kfp.dsl import Dataset, Input, Model, Output

from components import component


@component
def reconstruct_similarity(features: Input[Dataset], teacher: Input[Model], bits: int, source: str,
                           rule: str, parameter: float, related_fraction: float,
                           mlflow_parent_run_id: str, similarity: Output[Dataset]):
    """The teacher's joint embedding of the database (from `source`) and a rule ->
    `similarity` (graph.npz: rows of S are computed from it on demand, never n x n; with the
    teacher's joint codes of the database items, the student's starting point)."""
    from components.console import task_console

    with task_console("similarity", bits):
        import os

        import mlflow

        from components.tracking import stage_run
        from dudch import nets, prepare
        from dudch.similarity import SimilarityGraph, default_parameter, embedding

        data = prepare.load_features(features.path, expect=("image", "text", "database"))
        database = data["database"]
        trained, _ = nets.load(os.path.join(teacher.path, "model.pt"))
        value = parameter or default_parameter(rule, len(database))
        with stage_run(mlflow_parent_run_id, "similarity", bits,
                       params={"source": source, "rule": rule, "parameter": value,
                               "related_fraction": related_fraction}):
            image = nets.image_input(trained, data) if source != "raw" else data["image"]
            z, teacher_codes = embedding(source, image[database], data["text"][database], trained)
            graph = SimilarityGraph(z, rule, value, related_fraction, teacher_codes)
            os.makedirs(similarity.path, exist_ok=True)
            graph.save(os.path.join(similarity.path, "graph.npz"))
            mlflow.log_metric("similar_fraction", graph.density())
