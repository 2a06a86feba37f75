from kfp.dsl import Artifact, Input

from components import component


@component
def log_stage(record: Input[Artifact], mlflow_parent_run_id: str):
    """Log a cacheable stage's `record` output as that stage's child run of this pipeline run.
    Never cached: when KFP reuses the stage's output from an earlier run, this still gives the
    new run its child run (params, metrics, plots, models), and says that it was reused."""
    import json
    import os

    from components.console import task_console

    with open(os.path.join(record.path, "record.json")) as f:
        saved = json.load(f)
    stage, bits = saved["stage"], saved["bits"]
    with task_console(f"log-{stage}", bits, quiet=True) as console:
        import mlflow

        from components.tracking import log_record

        content = log_record(record.path, mlflow_parent_run_id)
        for warning in content["warnings"]:
            console.warn(warning)
        started = mlflow.MlflowClient().get_run(mlflow_parent_run_id).info.start_time / 1000
        if content["finished"] < started:
            console.note(f"{stage}{f' {bits}b' if bits else ''}: reused the output of an earlier run "
                         f"with the same inputs (KFP cache)")
