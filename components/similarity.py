from kfp.dsl import Dataset, Input, Model, Output

from components import component


@component
def reconstruct_similarity(features: Input[Dataset], teacher: Input[Model], rule: str,
                           parameter: float, mlflow_parent_run_id: str, similarity: Output[Dataset]):
    """The teacher's joint embedding of the database and a binarisation rule -> `similarity`
    (graph.npz: rows of S are computed from it on demand, never the n x n matrix)."""
    import os

    import mlflow

    from components.tracking import stage_run
    from dudch import nets, prepare
    from dudch.similarity import SimilarityGraph, default_neighbours, joint_embedding

    data = prepare.load(os.path.join(features.path, "features.npz"), expect=("image", "text", "database"))
    database = data["database"]
    trained, config = nets.load(os.path.join(teacher.path, "model.pt"))
    value = parameter or default_neighbours(len(database))
    with stage_run(mlflow_parent_run_id, "similarity", config["bits"],
                   params={"rule": rule, "parameter": value, "source": "teacher_hash_outputs"}):
        h_image, h_text = nets.hash_outputs(trained, data["image"][database], data["text"][database])
        graph = SimilarityGraph(joint_embedding(h_image, h_text), rule, value)
        os.makedirs(similarity.path, exist_ok=True)
        graph.save(os.path.join(similarity.path, "graph.npz"))
        mlflow.log_metric("similar_fraction", graph.density())
