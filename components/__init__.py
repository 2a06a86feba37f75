"""The pipeline's five stages as thin KFP components: each reads its typed input artifacts,
calls `dudch`, writes its output artifacts and logs one MLflow child run."""

import os

from kfp import dsl

# The container every stage runs in on a cluster (components/Dockerfile). A compile-time
# setting, read when the components are defined: `DUDCH_IMAGE=registry/dudch:tag dudch compile`.
IMAGE_ENV, DEFAULT_IMAGE = "DUDCH_IMAGE", "ghcr.io/dudch/dudch-python:0.1.0"


def component(func):
    """A KFP lightweight component running in the dudch image, which already holds kfp and dudch
    (so nothing is pip-installed when a task starts)."""
    return dsl.component(func, base_image=os.environ.get(IMAGE_ENV, DEFAULT_IMAGE), install_kfp_package=False)
