"""What a Kubeflow cluster gets from pipeline.yaml: GPU requests and placement for the training
stages, credentials only by reference, retries, caching, and the image chosen at compile time."""

import kfp.components
import yaml

from tests.helpers import ROOT, dudch

STAGES = ("prepare-data", "train-teacher", "reconstruct-similarity", "train-student", "evaluate")
GPU_STAGES = ("train-teacher", "train-student")


def load(path=ROOT / "pipeline.yaml"):
    documents = list(yaml.safe_load_all(path.read_text()))
    spec, platform = documents[0], documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return spec, platform


def executor(spec, stage):
    return spec["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]


def all_tasks(spec):
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def test_training_stages_request_a_gpu_on_a_gpu_node():
    spec, platform = load()
    for stage in STAGES:
        resources = executor(spec, stage).get("resources", {})
        if stage in GPU_STAGES:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert resources["accelerator"]["resourceCount"] == "1"
            assert resources["resourceCpuRequest"] == "4" and resources["resourceMemoryRequest"] == "16G"
            assert platform[f"exec-{stage}"]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
            assert platform[f"exec-{stage}"]["tolerations"] == [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        else:
            assert "accelerator" not in resources and "nodeSelector" not in platform[f"exec-{stage}"]


def test_credentials_come_from_a_secret_and_endpoints_from_a_config_map():
    spec, platform = load()
    for stage in STAGES:
        (secret,) = platform[f"exec-{stage}"]["secretAsEnv"]
        assert secret["secretName"] == "dudch-credentials"
        assert {e["envVar"] for e in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        (config,) = platform[f"exec-{stage}"]["configMapAsEnv"]
        assert config["configMapName"] == "dudch-config"
        assert "MLFLOW_TRACKING_URI" in {e["envVar"] for e in config["keyToEnv"]}
        assert "env" not in executor(spec, stage)  # nothing baked into the image's environment


def test_every_task_but_prepare_retries_and_only_prepare_and_teacher_cache():
    """Prepare fails on bad data, which no retry fixes; the other tasks' inputs were checked by then."""
    spec, _ = load()
    tasks = all_tasks(spec)
    for stage in STAGES:
        assert tasks[stage].get("retryPolicy", {}).get("maxRetryCount", 0) == (0 if stage == "prepare-data" else 2)
        assert tasks[stage].get("cachingOptions", {}).get("enableCache", False) == (stage in ("prepare-data", "train-teacher"))


def test_the_compiled_pipeline_loads_back_with_kfps_loader():
    pipeline = kfp.components.load_component_from_file(str(ROOT / "pipeline.yaml"))
    assert pipeline.name == "dudch"
    assert {"bits", "teacher_image_input", "similarity_rule"} <= set(pipeline.component_spec.inputs)


def test_image_and_gpu_placement_are_compile_time_settings(tmp_path):
    out = tmp_path / "pipeline.yaml"
    done = dudch("compile", "--output", str(out), env={
        "DUDCH_IMAGE": "registry.example/dudch-python:1.2", "DUDCH_GPU_NODE_SELECTOR": "pool=h100",
        "DUDCH_GPU_TOLERATION": "dedicated:NoExecute"})
    assert done.returncode == 0, done.stderr
    spec, platform = load(out)
    assert {executor(spec, s)["image"] for s in STAGES} == {"registry.example/dudch-python:1.2"}
    assert platform["exec-train-teacher"]["nodeSelector"]["labels"] == {"pool": "h100"}
    assert platform["exec-train-student"]["tolerations"][0] == {"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}


def test_a_data_volume_can_be_mounted_on_the_prepare_task(tmp_path):
    out = tmp_path / "pipeline.yaml"
    assert dudch("compile", "--output", str(out), env={"DUDCH_DATA_PVC": "openclipart-data"}).returncode == 0
    _, platform = load(out)
    (mount,) = platform["exec-prepare-data"]["pvcMount"]
    assert mount["mountPath"] == "/data" and mount["pvcNameParameter"]["runtimeValue"]["constant"] == "openclipart-data"
    _, default = load()
    assert "pvcMount" not in default["exec-prepare-data"]


def test_cached_tasks_take_nothing_that_differs_between_runs(tmp_path):
    """Compiled for two parent runs, prepare and teacher get the same inputs and the same
    component: a cluster's cache can hit. Their MLflow records are logged by uncached tasks."""
    from kfp import compiler

    from pipeline.pipeline import dudch_pipeline

    specs = []
    for parent in ("run-a", "run-b"):
        out = tmp_path / f"{parent}.yaml"
        compiler.Compiler().compile(dudch_pipeline, str(out), pipeline_parameters={
            "mlflow_parent_run_id": parent, "dataset": "openclipart", "cache_dir": "/cache"})
        spec, _ = load(out)
        assert spec["root"]["inputDefinitions"]["parameters"]["mlflow_parent_run_id"]["defaultValue"] == parent
        specs.append(spec)
    for stage in ("prepare-data", "train-teacher"):
        tasks = [all_tasks(spec)[stage] for spec in specs]
        assert tasks[0] == tasks[1] and tasks[0]["cachingOptions"]["enableCache"]
        assert "mlflow_parent_run_id" not in str(tasks[0]["inputs"])
        component = tasks[0]["componentRef"]["name"]
        assert specs[0]["components"][component] == specs[1]["components"][component]
        assert specs[0]["deploymentSpec"]["executors"][f"exec-{stage}"] == specs[1]["deploymentSpec"]["executors"][f"exec-{stage}"]
    loggers = [t for t in all_tasks(specs[0]).values() if t["componentRef"]["name"].startswith("comp-log-stage")]
    assert len(loggers) == 2 and not any(t.get("cachingOptions", {}).get("enableCache") for t in loggers)
