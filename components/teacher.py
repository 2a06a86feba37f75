from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import component


@component
def train_teacher(features: Input[Dataset], method: str, bits: int, epochs: int, batch_size: int, beta: float,
                  eta: float, mu: float, lambda1: float, lambda2: float, lr_image: float,
                  lr_text: float, momentum: float, weight_decay: float, image_input: str,
                  ucch_epochs: int, ucch_batch_size: int, ucch_hidden: int, ucch_lr: float,
                  ucch_temperature: float, ucch_alpha: float, ucch_negatives: int, ucch_bank_momentum: float,
                  seed: int, teacher: Output[Model], record: Output[Artifact]):
    """The teacher `method` (djsrh: DJSRH with the plain parameters; ucch: UCCH with the ucch_
    ones) on the training subset's image/text features -> `teacher` (model.pt) and `record`
    (what `log_stage` logs to MLflow: this task is cached, so it takes no run id). With
    image_input "pixels" DJSRH's image branch fine-tunes EfficientNet-Lite0 end to end (GPU)."""
    from components.console import task_console

    with task_console("teacher", bits) as console:
        import os
        from dataclasses import asdict
        from functools import partial

        from components.tracking import StageRecord
        from dudch import DudchError, nets, prepare, teacher as djsrh, ucch
        from dudch.evaluate import plot_losses

        data = prepare.load_features(features.path, expect=("image", "text", "train"))
        train = data["train"]
        if method == "ucch":
            config = ucch.UCCHConfig(bits=bits, epochs=ucch_epochs, batch_size=ucch_batch_size, hidden=ucch_hidden,
                                     lr=ucch_lr, temperature=ucch_temperature, alpha=ucch_alpha,
                                     negatives=ucch_negatives, bank_momentum=ucch_bank_momentum, seed=seed)
            fit = ucch.fit
        elif method == "djsrh":
            config = djsrh.TeacherConfig(bits=bits, epochs=epochs, batch_size=batch_size, beta=beta, eta=eta,
                                         mu=mu, lambda1=lambda1, lambda2=lambda2, lr_image=lr_image,
                                         lr_text=lr_text, momentum=momentum, weight_decay=weight_decay,
                                         image_input=image_input, seed=seed)
            pixels = data["pixels"][train] if "pixels" in data else None
            fit = partial(djsrh.fit, pixels=pixels)
        else:
            raise DudchError(f"unknown teacher {method!r}; use one of {', '.join(djsrh.TEACHER_NAMES)}")
        name = djsrh.TEACHER_NAMES[method]
        log = StageRecord(record.path, "teacher", bits)
        log.log_params({"teacher": method, **asdict(config)})
        log.set_tags({"dudch.teacher": method})
        history = {"loss": []}

        def log_epoch(epoch, loss, seconds):
            history["loss"].append(loss)
            log.log_metrics({"loss": loss, "epoch_time_s": seconds}, step=epoch)
            console.progress(epoch + 1, config.epochs, "epochs", f"{name} loss {loss:.5f} ({seconds:.2f}s)")

        # In the task's own output: a retried (preempted) task finds it and resumes.
        os.makedirs(teacher.path, exist_ok=True)
        checkpoint = os.path.join(teacher.path, "checkpoint.pt")
        trained = fit(data["image"][train], data["text"][train], config, on_epoch=log_epoch, checkpoint=checkpoint)
        nets.save(os.path.join(teacher.path, "model.pt"), trained, config)
        teacher.metadata["method"] = method  # what the evaluate task's report names
        log.log_model(os.path.join(teacher.path, "model.pt"), "teacher")
        log.log_figure(plot_losses(history, f"teacher ({name}), {bits} bits"), f"plots/losses_{bits}bits.png")
        log.save()
        os.remove(checkpoint)
