from kfp.dsl import Dataset, Input, Model, Output

from components import component


@component
def train_student(features: Input[Dataset], similarity: Input[Dataset], bits: int,
                  outer_iterations: int, inner_epochs: int, omega_size: int, batch_size: int,
                  gamma: float, soft_constraint: bool, optimizer: str, lr: float, lr_step: int,
                  weight_decay: float, init: str, seed: int, mlflow_parent_run_id: str,
                  student: Output[Model]):
    """Asymmetric networks + DCC against the reconstructed similarity -> `student` (model.pt and
    codes.npz: the database codes B, exactly +-1, with the database item ids)."""
    from components.console import task_console

    with task_console("student", bits) as console:
        import os
        from dataclasses import asdict

        import mlflow
        import numpy as np

        from components.tracking import log_networks, stage_run
        from dudch import nets, prepare
        from dudch.evaluate import plot_losses
        from dudch.similarity import SimilarityGraph
        from dudch.storage import save_npz
        from dudch.student import StudentConfig, fit

        config = StudentConfig(bits=bits, outer_iterations=outer_iterations, inner_epochs=inner_epochs,
                               omega_size=omega_size, batch_size=batch_size, gamma=gamma,
                               soft_constraint=soft_constraint, optimizer=optimizer, lr=lr, lr_step=lr_step,
                               weight_decay=weight_decay, init=init, seed=seed)
        data = prepare.load_features(features.path, expect=("image", "text", "database", "train", "item_id"))
        database = data["database"]
        graph = SimilarityGraph.load(os.path.join(similarity.path, "graph.npz"))
        with stage_run(mlflow_parent_run_id, "student", bits, params=asdict(config)):
            history = {"network loss": [], "objective": []}

            def log_iteration(iteration, loss, objective, seconds):
                history["network loss"].append(loss)
                history["objective"].append(objective)
                mlflow.log_metrics({"network_loss": loss, "objective": objective,
                                    "iteration_time_s": seconds}, step=iteration)
                console.progress(iteration + 1, outer_iterations, "iterations",
                                 f"loss {loss:.4f} objective {objective:.4f} ({seconds:.2f}s)")

            train_rows = np.searchsorted(database, data["train"])
            # In the task's own output: a retried (preempted) task finds it and resumes.
            os.makedirs(student.path, exist_ok=True)
            checkpoint = os.path.join(student.path, "checkpoint.pt")
            trained, codes = fit(data["image"][database], data["text"][database], train_rows, graph,
                                 config, on_iteration=log_iteration, checkpoint=checkpoint)
            nets.save(os.path.join(student.path, "model.pt"), trained, config)
            save_npz(os.path.join(student.path, "codes.npz"), codes=codes, item_id=data["item_id"][database])
            log_networks(os.path.join(student.path, "model.pt"), "student")
            for name in ("model.pt", "codes.npz"):  # what `dudch promote` packages
                mlflow.log_artifact(os.path.join(student.path, name), "retrieval")
            mlflow.log_figure(plot_losses(history, f"student (DCC), {bits} bits"), f"plots/losses_{bits}bits.png")
            os.remove(checkpoint)
