"""`dudch`: obtain the data, run the pipeline locally, compile it, and report results."""

import argparse
import inspect
import json
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

from dudch import DudchError

PIPELINE_YAML = "pipeline.yaml"
LOCAL_PARALLEL_TASKS = 2  # kfp.local runs at most two tasks of a ParallelFor at once


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except DudchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _parser():
    parser = argparse.ArgumentParser(
        prog="dudch", description="Unsupervised cross-modal hashing by knowledge distillation "
        "(DUDCH): a Kubeflow pipeline (prepare -> DJSRH teacher -> similarity -> DCC student -> "
        "evaluate), tracked in MLflow. Run from the project root.")
    commands = parser.add_subparsers(title="commands")

    data = commands.add_parser("data", help="obtain datasets").add_subparsers(title="datasets")
    oc = data.add_parser("openclipart", help="fetch Debian's openclipart-svg 1:0.18+dfsg-19, check "
                         "its SHA-256, extract it to data/openclipart and check it against data.dvc")
    oc.add_argument("--archive", type=Path, help="use this local .deb instead of downloading it")
    oc.set_defaults(handler=_data_openclipart)

    run = commands.add_parser("run", help="run the pipeline with KFP local execution, log it to "
                              "MLflow, and print the results table",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64, 128], help="code lengths")
    run.add_argument("--max-items", type=int, default=0, help="use only the first N items by "
                     "content hash (0: all); a fixed subset for quick runs")
    run.add_argument("--seed", type=int, default=0, help="seeds the split and every stage")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="any other pipeline parameter, e.g. teacher_epochs=20 (see `dudch params`)")
    run.set_defaults(handler=_run)

    submit = commands.add_parser("submit", help=f"upload {PIPELINE_YAML} to a Kubeflow Pipelines "
                                 "cluster as a new pipeline version and start a run",
                                 description="Upload pipeline.yaml as a new version of the pipeline "
                                 "and start a run. The MLflow parent run is created in the store of "
                                 "MLFLOW_TRACKING_URI, which must be the server the cluster's "
                                 "config map names. A bearer token, if the cluster needs one, comes "
                                 "from KFP_TOKEN.")
    submit.add_argument("--host", required=True, help="the KFP API, e.g. http://localhost:8080")
    submit.add_argument("--experiment", default="dudch", help="KFP experiment to run in")
    submit.add_argument("--namespace", help="Kubernetes namespace (multi-user Kubeflow)")
    submit.add_argument("--pipeline-name", default="dudch")
    submit.add_argument("--package", type=Path, default=Path(PIPELINE_YAML),
                        help="the compiled pipeline to upload (make image writes build/pipeline.yaml)")
    submit.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="pipeline parameters; raw_data (a path the pods can read) is required")
    submit.set_defaults(handler=_submit)

    params = commands.add_parser("params", help="list the pipeline's parameters and defaults")
    params.set_defaults(handler=_params)

    compile_ = commands.add_parser("compile", help=f"compile the pipeline to {PIPELINE_YAML}")
    compile_.add_argument("--check", action="store_true", help=f"exit 1 if {PIPELINE_YAML} is out of date")
    compile_.add_argument("--output", type=Path, default=Path(PIPELINE_YAML))
    compile_.set_defaults(handler=_compile)

    report = commands.add_parser("report", help="print the results of the latest pipeline run")
    report.add_argument("--json", action="store_true", help="print one JSON object")
    report.add_argument("--run-id", help="a pipeline (parent) run id instead of the latest")
    report.set_defaults(handler=_report)
    return parser


def _data_openclipart(args):
    from pipeline.data import ensure_openclipart

    dest = ensure_openclipart(Path.cwd(), args.archive)
    print(f"OpenClipart ready at {dest.relative_to(Path.cwd().resolve())} (matches data.dvc)")


RUN_INPUTS = ("raw_data", "cache_dir", "mlflow_parent_run_id")  # set by `dudch run` itself


def _pipeline_parameters(with_run_inputs=False):
    from pipeline.pipeline import dudch_pipeline

    return {name: p for name, p in inspect.signature(dudch_pipeline.pipeline_func).parameters.items()
            if with_run_inputs or name not in RUN_INPUTS}


def _params(args):
    for name, p in _pipeline_parameters().items():
        print(f"{name:<26} {getattr(p.annotation, '__name__', str(p.annotation)):<10} {p.default}")


def _parse_params(pairs, with_run_inputs=False):
    declared, parsed = _pipeline_parameters(with_run_inputs), {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in declared:
            raise DudchError(f"unknown pipeline parameter {pair!r}; see `dudch params` for the names")
        kind = declared[name].annotation
        try:
            parsed[name] = json.loads(value) if kind not in (str, float, int) else kind(value)
        except ValueError:
            raise DudchError(f"{name} needs a {getattr(kind, '__name__', kind)}, got {value!r}") from None
    return parsed


def _run(args):
    root = Path.cwd().resolve()
    from pipeline import tracking
    from pipeline.data import OPENCLIPART

    params = dict(bits=args.bits, max_items=args.max_items, seed=args.seed, **_parse_params(args.param))
    raw = root / OPENCLIPART
    if not raw.is_dir():
        raise DudchError(f"raw data not found at {OPENCLIPART}; run `dudch data openclipart` first")
    experiment_id = tracking.connect(root)
    run_id = tracking.start_parent_run(root, experiment_id, params)
    print(f"MLflow parent run {run_id} in {tracking.tracking_uri(root)}", flush=True)

    import kfp.local

    from pipeline.pipeline import dudch_pipeline

    # Without a cap each concurrent task starts a torch/BLAS/numba thread per core, and they
    # thrash (10x slower student iterations measured on 2 cores). A user's setting wins.
    threads = str(max(1, (os.cpu_count() or 1) // LOCAL_PARALLEL_TASKS))
    for variable in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(variable, threads)
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False),
                   pipeline_root=str(root / ".dudch" / "kfp"))
    started, succeeded = time.perf_counter(), False
    try:
        dudch_pipeline(raw_data=str(raw), cache_dir=str(root / ".dudch" / "cache"),
                       mlflow_parent_run_id=run_id, **params)
        succeeded = True
    except RuntimeError as error:
        reason = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines()[0][:200]
        raise DudchError(f"the pipeline failed ({reason}); the failing task's log is above") from None
    finally:
        tracking.finish_parent_run(run_id, succeeded)
    print(f"\nPipeline finished in {time.perf_counter() - started:.0f} s. Results (query set, "
          f"mAP@all and mAP@50):\n")
    print(tracking.format_table(tracking.report(experiment_id, run_id)))
    print(f"\nCompare runs in the MLflow UI:\n  .venv/bin/mlflow ui --backend-store-uri "
          f"{tracking.tracking_uri(root)}\n")


def _submit(args):
    import requests

    host, token = args.host.rstrip("/"), os.environ.get("KFP_TOKEN")
    try:
        health = requests.get(f"{host}/apis/v2beta1/healthz", timeout=10,
                              headers={"Authorization": f"Bearer {token}"} if token else {})
    except requests.RequestException as error:
        raise DudchError(f"cannot reach Kubeflow Pipelines at {host} ({type(error).__name__}); check "
                         f"--host (e.g. `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80` "
                         f"and --host http://localhost:8080)") from None
    if health.status_code in (401, 403):
        raise DudchError(f"Kubeflow Pipelines at {host} refused the request (HTTP {health.status_code}); "
                         f"set KFP_TOKEN to a valid token for this cluster")
    params = _parse_params(args.param, with_run_inputs=True)
    if "raw_data" not in params:
        raise DudchError("--param raw_data=PATH is required: a path to the OpenClipart tree that the pods can read")
    params.setdefault("cache_dir", "/tmp/dudch-cache")
    if "mlflow_parent_run_id" not in params:
        from pipeline import tracking

        root = Path.cwd().resolve()
        params["mlflow_parent_run_id"] = tracking.start_parent_run(root, tracking.connect(root), params)

    import kfp

    client = kfp.Client(host=host, namespace=args.namespace, existing_token=token)
    version = time.strftime("%Y%m%d-%H%M%S")
    pipeline_id = client.get_pipeline_id(args.pipeline_name)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(args.package), pipeline_name=args.pipeline_name).pipeline_id
        version_id = client.list_pipeline_versions(pipeline_id).pipeline_versions[0].pipeline_version_id
    else:
        version_id = client.upload_pipeline_version(str(args.package), pipeline_version_name=version,
                                                    pipeline_id=pipeline_id).pipeline_version_id
    experiment = client.create_experiment(args.experiment, namespace=args.namespace)
    run = client.run_pipeline(experiment_id=experiment.experiment_id, job_name=f"dudch-{version}",
                              pipeline_id=pipeline_id, version_id=version_id, params=params)
    print(f"run {run.run_id}\n{host}/#/runs/details/{run.run_id}")


def _compile(args):
    from kfp import compiler

    from pipeline.pipeline import dudch_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / PIPELINE_YAML
        compiler.Compiler().compile(dudch_pipeline, str(fresh))
        text = fresh.read_text()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date with pipeline/; run `dudch compile`", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    from dudch.storage import atomic_file

    with atomic_file(args.output) as tmp:
        Path(tmp).write_text(text)
    print(f"wrote {args.output}")


def _report(args):
    from pipeline import tracking

    experiment_id = tracking.connect(Path.cwd())
    result = tracking.report(experiment_id, args.run_id)
    if args.json:
        print(json.dumps({k: result[k] for k in ("run_id", "dataset", "data_version", "results")}))
    else:
        print(f"pipeline run {result['run_id']} ({result['status']}), data {result['dataset']} "
              f"{result['data_version']}\n")
        print(tracking.format_table(result))


if __name__ == "__main__":
    sys.exit(main())
