from kfp import dsl

from components import component


@component
def finish_run(mlflow_parent_run_id: str, kfp_run_id: str, status: dsl.PipelineTaskFinalStatus):
    """The pipeline's exit handler, run after every other task whatever their outcome: end the
    MLflow parent run as FINISHED (after logging its summary: metrics per bit length, results
    table, plot), FAILED or KILLED (cancelled), with any child run a killed task left RUNNING,
    and tag it with the KFP run id."""
    from components.console import task_console

    with task_console("finish"):
        import mlflow

        from pipeline.tracking import finish_parent_run

        final = {"SUCCEEDED": "FINISHED", "CANCELLED": "KILLED"}.get(status.state, "FAILED")
        print(f"the pipeline's tasks ended {status.state}; MLflow run {mlflow_parent_run_id}: {final}")
        try:
            finish_parent_run(mlflow_parent_run_id, final)
        finally:  # after ending the runs: on a full disk the tag cannot be written, the end can
            mlflow.MlflowClient().set_tag(mlflow_parent_run_id, "kfp.run_id", kfp_run_id)
