"""How the pipeline's tasks run on a Kubeflow cluster: GPU requests, node placement, where
credentials and endpoints come from, retries and caching. Compile-time settings from the
environment (`DUDCH_GPU_NODE_SELECTOR=cloud.google.com/gke-accelerator=nvidia-h100 dudch
compile`); nothing secret is ever written into pipeline.yaml, only the names of the Kubernetes
secret and config map that hold it. A local run (`dudch run`) ignores all of this but the
retries, which it turns off."""

import os

from kfp import kubernetes

# KEY=VALUE: the node label GPU tasks are scheduled on (NVIDIA's GPU operator sets this one).
GPU_NODE_SELECTOR = os.environ.get("DUDCH_GPU_NODE_SELECTOR", "nvidia.com/gpu.present=true")
# KEY:EFFECT: the taint of GPU nodes that GPU tasks tolerate (operator Exists).
GPU_TOLERATION = os.environ.get("DUDCH_GPU_TOLERATION", "nvidia.com/gpu:NoSchedule")
GPU_CPU_REQUEST = os.environ.get("DUDCH_GPU_CPU_REQUEST", "4")
GPU_MEMORY_REQUEST = os.environ.get("DUDCH_GPU_MEMORY_REQUEST", "16G")
SECRET = os.environ.get("DUDCH_SECRET", "dudch-credentials")
# A PersistentVolumeClaim holding the raw data, mounted at DATA_MOUNT on the prepare task;
# then run with dataset=openclipart:/data/openclipart. Empty: the data comes through DVC
# (data_repo, data_rev) or is in the image.
DATA_PVC = os.environ.get("DUDCH_DATA_PVC", "")
DATA_MOUNT = "/data"
CONFIG_MAP = os.environ.get("DUDCH_CONFIG_MAP", "dudch-config")
RETRIES_ENV = "DUDCH_TASK_RETRIES"
# Where pods share the image-feature cache (s3://bucket/prefix): each pod's own disk is empty.
SHARED_CACHE_ENV = "DUDCH_SHARED_CACHE"
SHARED_CACHE = os.environ.get(SHARED_CACHE_ENV, "")  # read when the pipeline is defined (on importing it)

# Secret keys -> environment variables: object-store credentials (S3 or MinIO).
SECRET_ENV = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
# Config map keys -> environment variables: where MLflow and the object store are.
CONFIG_ENV = {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL",
              "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL"}


def with_data(task):
    """Mount the raw-data volume (DUDCH_DATA_PVC) on `task`, and point it at the shared feature
    cache (DUDCH_SHARED_CACHE), when they are configured."""
    if DATA_PVC:
        kubernetes.mount_pvc(task, pvc_name=DATA_PVC, mount_path=DATA_MOUNT)
    if SHARED_CACHE:
        task.set_env_variable(SHARED_CACHE_ENV, SHARED_CACHE)
    return task


def on_cluster(task, gpu=False, cache=False, retry=True):
    """Apply the cluster settings to `task`; returns it. Every task: credentials and endpoints
    from the secret and config map; `retry`: two retries on failure (preempted or evicted pods;
    DUDCH_TASK_RETRIES), for tasks whose failures are the cluster's, never the user's (KFP's
    retry policy has no condition, so a task that fails on bad input must not have one);
    `gpu`: one nvidia.com/gpu with CPU and memory requests on a GPU node; `cache`: reuse an
    earlier identical execution."""
    kubernetes.use_secret_as_env(task, SECRET, SECRET_ENV)
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, CONFIG_ENV)
    retries = int(os.environ.get(RETRIES_ENV, "2")) if retry else 0
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2)
    task.set_caching_options(cache)
    if gpu:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        task.set_cpu_request(GPU_CPU_REQUEST).set_memory_request(GPU_MEMORY_REQUEST)
        key, _, value = GPU_NODE_SELECTOR.partition("=")
        kubernetes.add_node_selector(task, key, value)
        key, _, effect = GPU_TOLERATION.partition(":")
        kubernetes.add_toleration(task, key=key, operator="Exists", effect=effect or None)
    return task
