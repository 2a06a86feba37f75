from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import component


@component
def train_teacher(features: Input[Dataset], bits: int, epochs: int, batch_size: int, beta: float,
                  eta: float, mu: float, lambda1: float, lambda2: float, lr_image: float,
                  lr_text: float, momentum: float, weight_decay: float, image_input: str,
                  seed: int, teacher: Output[Model], record: Output[Artifact]):
    """DJSRH on the training subset's image/text features -> `teacher` (model.pt) and `record`
    (what `log_stage` logs to MLflow: this task is cached, so it takes no run id). With
    image_input "pixels" the image branch fine-tunes EfficientNet-Lite0 end to end (GPU)."""
    from components.console import task_console

    with task_console("teacher", bits) as console:
        import os
        from dataclasses import asdict

        from components.tracking import StageRecord
        from dudch import nets, prepare
        from dudch.evaluate import plot_losses
        from dudch.teacher import TeacherConfig, fit

        config = TeacherConfig(bits=bits, epochs=epochs, batch_size=batch_size, beta=beta, eta=eta,
                               mu=mu, lambda1=lambda1, lambda2=lambda2, lr_image=lr_image,
                               lr_text=lr_text, momentum=momentum, weight_decay=weight_decay,
                               image_input=image_input, seed=seed)
        data = prepare.load_features(features.path, expect=("image", "text", "train"))
        train = data["train"]
        log = StageRecord(record.path, "teacher", bits)
        log.log_params(asdict(config))
        history = {"loss": []}

        def log_epoch(epoch, loss, seconds):
            history["loss"].append(loss)
            log.log_metrics({"loss": loss, "epoch_time_s": seconds}, step=epoch)
            console.progress(epoch + 1, epochs, "epochs", f"loss {loss:.5f} ({seconds:.2f}s)")

        pixels = data["pixels"][train] if "pixels" in data else None
        # In the task's own output: a retried (preempted) task finds it and resumes.
        os.makedirs(teacher.path, exist_ok=True)
        checkpoint = os.path.join(teacher.path, "checkpoint.pt")
        trained = fit(data["image"][train], data["text"][train], config, on_epoch=log_epoch,
                      pixels=pixels, checkpoint=checkpoint)
        nets.save(os.path.join(teacher.path, "model.pt"), trained, config)
        log.log_model(os.path.join(teacher.path, "model.pt"), "teacher")
        log.log_figure(plot_losses(history, f"teacher (DJSRH), {bits} bits"), f"plots/losses_{bits}bits.png")
        log.save()
        os.remove(checkpoint)
