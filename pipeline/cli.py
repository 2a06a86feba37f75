"""`dudch`: obtain the data, run the pipeline locally, compile it, and report results."""

import argparse
import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from dudch import DudchError, first_line, redact, shown

PIPELINE_YAML = "pipeline.yaml"
SOURCES_HELP = ("openclipart (the embedded default), mirflickr25k:DIR or nuswide:DIR (Cleared-Set "
                ".mat files), mirflickr25k-zip:FILE (the original release), manifest:FILE (JSONL or "
                "CSV of image,text[,labels]; see README 'Your data')")
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
        print(f"error: {redact(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every command writes then renames: nothing half-done stays
        print(f"error: {args.handler.__name__.strip('_').replace('_', ' ')} interrupted (Ctrl-C); nothing "
              f"was half-written, rerun it to start again", file=sys.stderr)
        return 130


def _count(high):
    """An argparse type: a whole number from 1 to `high`."""
    def count(text):
        value = int(text) if text.lstrip("-").isdigit() else None
        if value is None or not 1 <= value <= high:
            raise argparse.ArgumentTypeError(f"{shown(text)} is not a count from 1 to {high}")
        return value
    return count


def _top_k(text):
    from pipeline.serving import LIMITS  # imports MLflow: only when a count is given

    return _count(LIMITS["top_k"])(text)


MAX_COMPARED_RUNS = 1000  # a table of more runs is no longer read by a person


def _parser():
    parser = argparse.ArgumentParser(
        prog="dudch", description="Unsupervised cross-modal hashing by knowledge distillation "
        "(DUDCH): a Kubeflow pipeline (prepare -> DJSRH teacher -> similarity -> DCC student -> "
        "evaluate), tracked in MLflow. Run from the project root.")
    commands = parser.add_subparsers(title="commands")

    data = commands.add_parser("data", help="obtain, inspect and version datasets").add_subparsers(title="data commands")
    oc = data.add_parser("openclipart", help="fetch Debian's openclipart-svg 1:0.18+dfsg-19, check "
                         "its SHA-256, extract it to data/openclipart and check it against data.dvc")
    oc.add_argument("--archive", type=Path, help="use this local .deb instead of downloading it")
    oc.set_defaults(handler=_data_openclipart)
    inspect_ = data.add_parser("inspect", help="print one JSON summary of a dataset (no image is "
                               "decoded): n, image kind and shape, text_dim, num_labels, warnings",
                               description=f"SOURCE is one of: {SOURCES_HELP}")
    inspect_.add_argument("source", metavar="SOURCE")
    _add_dataset_options(inspect_)
    inspect_.set_defaults(handler=_data_inspect)
    remote = data.add_parser("remote", help="make a DVC remote the default: s3://bucket/prefix (AWS, "
                             "MinIO) or a local folder; credentials come from AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY in the environment and are never written")
    remote.add_argument("url", help="s3://bucket/prefix or a folder")
    remote.add_argument("--endpoint-url", help="an S3-compatible server, e.g. http://minio:9000")
    remote.set_defaults(handler=_data_remote)
    for direction, what in (("push", "upload the data pinned by .dvc files to the default remote"),
                            ("pull", "download the data pinned by .dvc files from the default remote")):
        transfer = data.add_parser(direction, help=what)
        transfer.add_argument("targets", nargs="*", metavar="FILE.dvc", help="default: all")
        transfer.set_defaults(handler=_data_transfer, direction=direction)

    run = commands.add_parser("run", help="run the pipeline with KFP local execution, log it to "
                              "MLflow, and print the results table",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--dataset", default="openclipart", metavar="SOURCE", help=SOURCES_HELP)
    run.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64, 128], help="code lengths")
    run.add_argument("--max-items", type=int, default=0, help="use only the first N items by "
                     "content hash (0: all); a fixed subset for quick runs")
    run.add_argument("--seed", type=int, default=0, help="seeds the split and every stage")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="any other pipeline parameter, e.g. teacher_epochs=20 or "
                     "text_features=minilm; data_repo=URL data_rev=REV read the SOURCE's path "
                     "through DVC from that repository at that revision (see `dudch params`)")
    run.add_argument("--keep-runs", type=int, default=10, metavar="N", help="keep the task outputs "
                     "(.dudch/kfp) and logs (.dudch/logs) of the newest N local runs, remove older "
                     "ones (0: keep all)")
    run.add_argument("--no-cache", action="store_true", help="rerun every task: reuse no prepared "
                     "data or teacher from an earlier run with the same inputs (the image-feature "
                     "cache still applies)")
    run.add_argument("--verbose", action="store_true", help="print every task's raw output (KFP's "
                     "executor lines, library warnings) instead of one line per task start and end")
    run.add_argument("--image", metavar="REF", help="run every task in this container image (KFP's "
                     "DockerRunner, host network) instead of a subprocess, as a cluster would: "
                     ".dudch is mounted at its own path, the dataset linked into it; needs a Docker "
                     "engine and an MLflow server (MLFLOW_TRACKING_URI=http://...)")
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
                        help="pipeline parameters; dataset=SOURCE is required, with a path the pods can "
                        "read, or with data_repo=GIT_URL data_rev=REV to fetch it through DVC")
    submit.set_defaults(handler=_submit)

    promote = commands.add_parser("promote", help="register a pipeline run's student as a retrieval "
                                  "model in the MLflow registry, if it passes the gate: at the alias "
                                  "holder's bit length, mAP@50 and mAP@all at least the holder's in "
                                  "both directions (a refused run is not registered)",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    promote.add_argument("--run", required=True, metavar="RUN_ID", help="a pipeline (parent) run id")
    promote.add_argument("--bits", type=int, help="which code length (default: the longest trained)")
    promote.add_argument("--name", default="dudch", help="registered model name")
    promote.add_argument("--alias", default="production", help="the alias to move on success")
    promote.add_argument("--force", action="store_true", help="promote even if the gate refuses")
    promote.set_defaults(handler=_promote)

    search = commands.add_parser("search", help="retrieve database items with a registered model",
                                 description="List the database items nearest a text or an image: "
                                 "first the items that hold exactly the query (its image file, or its "
                                 "text, case and white space aside; marked exact), then the others; each "
                                 "group by Hamming distance to the query's code, items as near by how much "
                                 "the query's outputs before rounding agree with their codes, then in "
                                 "database order.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    search.add_argument("--model", default="models:/dudch@production", help="a model URI")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a text query (tags or a sentence)")
    query.add_argument("--image", type=Path, help="an image query (PNG, JPEG or SVG)")
    search.add_argument("--top", type=_top_k, default=10, help="how many items to list (1 to 1000)")
    search.set_defaults(handler=_search)

    serve = commands.add_parser("serve", help="serve a registered model over HTTP: MLflow's scoring server "
                                "(/invocations, /ping) behind a guard that bounds request bodies and keeps "
                                "error replies to one line", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--model", default="models:/dudch@production", help="a model URI")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=5001)
    serve.add_argument("--workers", type=_count(64), default=1, help="server processes, each with its own copy of "
                       "the model (and its own turn-taking: one request encoded at a time per process)")
    serve.set_defaults(handler=_serve)

    index = commands.add_parser("index", help="grow or shrink a registered model's database without "
                                "retraining: a new version of the model, with its lineage").add_subparsers(
                                    title="index commands")
    grow = index.add_parser("add", help="encode a dataset's items with the model's own encoders, give "
                            "each a database code, and register the grown database as a new version",
                            description="Encode the items of SOURCE with the model's own encoders "
                            "(EfficientNet-Lite0 and its bag-of-words vocabulary or sentence model), "
                            "give each pair the database code sign(u + v) of the student's two networks, "
                            "append them to the model's database, and register the result as a new "
                            "version with lineage tags (parent version, items added, dataset and its "
                            "DVC version). Items whose id the database holds already are skipped "
                            "(ids: a drawing's SHA-1 for OpenClipart, the image path for a manifest). "
                            "No alias moves unless --alias is given.")
    shrink = index.add_parser("remove", help="remove items (by id) from the model's database and register "
                              "the result as a new version")
    for command in (grow, shrink):
        command.add_argument("--model", default="models:/dudch@production",
                             help="the registered version to start from: models:/NAME@ALIAS or models:/NAME/VERSION "
                             "(default: models:/dudch@production)")
        if command is grow:
            command.add_argument("--dataset", required=True, metavar="SOURCE", help=SOURCES_HELP)
        else:
            command.add_argument("--ids", required=True, type=Path, metavar="FILE",
                                 help="a text file of item ids, one a line (as `dudch search` prints them)")
        command.add_argument("--name", help="register the new version under this model name (default: "
                             "the model's own)")
        command.add_argument("--alias", help="move this alias (e.g. production) to the new version; by "
                             "default no alias moves")
        command.set_defaults(handler=_index)

    compare = commands.add_parser("compare", help="student mAP@50 and mAP@all by bits and direction "
                                  "across the latest pipeline runs, and the parameters that differ")
    compare.add_argument("--last", type=_count(MAX_COMPARED_RUNS), default=5, metavar="N",
                         help=f"how many runs, 1 to {MAX_COMPARED_RUNS} (default 5)")
    compare.add_argument("--json", action="store_true", help="print one JSON object")
    compare.set_defaults(handler=_compare)

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


def _add_dataset_options(parser):
    from dudch.prepare import PrepareConfig

    parser.add_argument("--min-word-count", type=int, default=PrepareConfig.min_word_count)
    parser.add_argument("--min-label-size", type=int, default=PrepareConfig.min_label_size)
    parser.add_argument("--text-features", choices=("bow", "minilm"), default=PrepareConfig.text_features)


def _data_inspect(args):
    from dudch.prepare import PrepareConfig, describe

    config = PrepareConfig(min_word_count=args.min_word_count, min_label_size=args.min_label_size,
                           text_features=args.text_features)
    print(json.dumps(describe(args.source, config)))


def _data_remote(args):
    from pipeline.data import configure_remote

    settings = configure_remote(Path.cwd(), args.url, args.endpoint_url)
    print(f"default DVC remote: {settings['url']}"
          + (f" at {settings['endpointurl']}" if "endpointurl" in settings else "")
          + " (credentials from the environment)")


def _data_transfer(args):
    from pipeline.data import transfer

    moved = transfer(Path.cwd(), args.direction, args.targets)
    print(f"{args.direction}: {moved} files")


RUN_INPUTS = ("dataset", "cache_dir", "mlflow_parent_run_id", "data_version")  # set by `dudch run` itself


def _data_version(pin, run_id):
    """What prepare is cached by besides its parameters: the data's DVC md5. Data that no pin
    identifies gets a value of its own (this run's), so its preparation is never reused."""
    return pin["md5"] or f"unpinned-{run_id}"


def _pipeline_parameters(with_run_inputs=False):
    from pipeline.pipeline import dudch_pipeline

    return {name: p for name, p in inspect.signature(dudch_pipeline.pipeline_func).parameters.items()
            if with_run_inputs or name not in RUN_INPUTS}


def parameter_descriptions():
    """{name: description} from the `Args:` section of the pipeline's docstring (the same text
    the KFP run form shows)."""
    from pipeline.pipeline import dudch_pipeline

    args = (dudch_pipeline.pipeline_func.__doc__ or "").partition("Args:")[2]
    return dict(re.findall(r"^\s+(\w+): (.+)$", args, flags=re.MULTILINE))


def _with_defaults(params):
    """`params` completed with the default of every pipeline parameter it does not set."""
    defaults = {name: p.default for name, p in _pipeline_parameters().items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **params}


def _params(args):
    described = parameter_descriptions()
    for name, p in _pipeline_parameters().items():
        kind = getattr(p.annotation, '__name__', str(p.annotation))
        print(f"{name:<28} {kind:<6} {str(p.default):<12} {described.get(name, '')}")


def _parse_params(pairs, with_run_inputs=False):
    declared, parsed = _pipeline_parameters(with_run_inputs), {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in declared:
            raise DudchError(f"unknown pipeline parameter {shown(pair)}; see `dudch params` for the names")
        kind = declared[name].annotation
        try:
            parsed[name] = json.loads(value) if kind not in (str, float, int) else kind(value)
        except ValueError:
            raise DudchError(f"{name} needs a {getattr(kind, '__name__', kind)}, got {shown(value)}") from None
    return parsed


def _run(args):
    root = Path.cwd().resolve()
    if args.image:  # read when the components are defined (on importing pipeline.pipeline)
        from components import IMAGE_ENV

        os.environ[IMAGE_ENV] = args.image
    from pipeline import tracking
    from pipeline.cluster import RETRIES_ENV
    from pipeline.console import RUNNER_LOG, RunConsole

    # Locally a failed task is not retried: the mistakes a retry cannot fix are the common ones
    # here, and the cluster's backoff would cost minutes. A user's setting wins.
    os.environ.setdefault(RETRIES_ENV, "0")

    from pipeline import validate

    flags = dict(bits=args.bits, max_items=args.max_items, seed=args.seed)
    params = _parse_params(args.param)
    twice = sorted(set(flags) & set(params))
    if twice:
        raise DudchError(f"set {twice[0]} with --{twice[0].replace('_', '-')}, not --param {twice[0]}=...")
    params.update(flags)
    validate.check_parameters(_with_defaults(params))
    dataset, pin, data_uri = _resolve_dataset(root, args.dataset, params, on_this_machine=True)
    if not params.get("data_repo"):  # else the task fetches it: not on this machine yet
        validate.check_dataset(dataset, _with_defaults(params))
    if args.image:
        _check_image(args.image, tracking.tracking_uri(root))
    tracking.check_writable(root / ".dudch" / "cache", "the feature cache")  # else found after encoding
    experiment_id = tracking.connect(root)
    run_id = tracking.start_parent_run(root, experiment_id, _with_defaults(params), dataset, pin, data_uri)
    logs, scratch = root / ".dudch" / "logs" / run_id, root / ".dudch" / "tmp" / run_id
    print(f"MLflow parent run {run_id} in {redact(tracking.tracking_uri(root))}", flush=True)
    if not args.verbose:
        print(f"Logs: {logs.relative_to(root)}/ (a file per task; kfp.log: the local runner)", flush=True)

    import builtins

    import kfp.local

    from pipeline.pipeline import dudch_pipeline

    # Without a cap each concurrent task starts a torch/BLAS/numba thread per core, and they
    # thrash (10x slower student iterations measured on 2 cores). A user's setting wins.
    threads = str(max(1, (os.cpu_count() or 1) // LOCAL_PARALLEL_TASKS))
    for variable in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(variable, threads)
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")
    started, status, plain_print = time.perf_counter(), "FAILED", builtins.print
    console = RunConsole(logs)
    # The tasks' outputs; in containers, all of .dudch, the one folder the DockerRunner mounts.
    outputs = root / ".dudch" if args.image else root / ".dudch" / "kfp"
    # Each task's launcher makes a temporary folder (`mktemp -d`) that it never removes: here
    # they land in one folder per run, removed when the run ends.
    scratch.mkdir(parents=True)
    os.environ["TMPDIR"] = str(scratch)
    handlers = {stop: signal.signal(stop, _interrupt) for stop in (signal.SIGINT, signal.SIGTERM)}
    _adopt_orphans()
    try:
        with contextlib.nullcontext() if args.verbose else console:
            # Caching as on a cluster: prepare and teacher are reused when their inputs are
            # identical (and the earlier output still exists, see --keep-runs).
            runner, task_dataset = _local_runner(args.image, dataset, scratch)
            kfp.local.init(runner=runner, pipeline_root=str(outputs), enable_caching=not args.no_cache,
                           cache_root=str(root / ".dudch" / "kfp-cache"))
            dudch_pipeline(dataset=task_dataset, cache_dir=str(root / ".dudch" / "cache"),
                           mlflow_parent_run_id=run_id, data_version=_data_version(pin, run_id), **params)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        _stop_descendants()  # any that the runner's last moments left
        raise DudchError(f"stopped (Ctrl-C or SIGTERM); MLflow run {run_id} is marked KILLED") from None
    except RuntimeError as error:
        reason = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines()[0][:200]
        if args.verbose:
            raise DudchError(f"the pipeline failed ({reason}); the failing task's output is above") from None
        print("\n".join(console.failure_report()), flush=True)
        failed = (console.failures or console.killed() or [None])[0]
        raise DudchError(f"task {failed['task']} failed: {failed['error']}" if failed else
                         f"the pipeline failed ({reason}); see {logs / RUNNER_LOG}") from None
    finally:
        # kfp 2.17's parallel tasks can leave builtins.print swapped for its indenting one,
        # which indents what follows and breaks importing numba (for the summary).
        builtins.print = plain_print
        for stop, handler in handlers.items():
            signal.signal(stop, handler)
        # The store's own error log (a traceback) would bury the one line below.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        try:
            if tracking.is_running(run_id):  # the pipeline's exit task ends it, unless it never ran
                tracking.finish_parent_run(run_id, status)
        except Exception as error:  # the store stopped answering: say so, don't bury the error
            print(f"warning: could not end MLflow run {run_id} ({redact(first_line(error))[:120]}); "
                  f"`dudch report` and `dudch compare` show it as INTERRUPTED", file=sys.stderr)
        shutil.rmtree(scratch, ignore_errors=True)
        _keep_latest(outputs, args.keep_runs, "dudch-*")
        _keep_latest(root / ".dudch" / "logs", args.keep_runs)
    print(f"\nPipeline finished in {time.perf_counter() - started:.0f} s. Results (query set, "
          f"mAP@50 and mAP@all; distinct: distinct database codes / database size):\n")
    print(tracking.format_table(tracking.report(experiment_id, run_id)))
    print(f"\nCompare runs in the MLflow UI:\n  .venv/bin/mlflow ui --backend-store-uri "
          f"{redact(tracking.tracking_uri(root))}\n")


def _interrupt(signum, frame):
    """Ctrl-C or `kill`: stop the run now. The local runner waits for its running tasks and then
    starts the queued ones before it lets go, so every task process is stopped, from now on."""
    threading.Thread(target=_keep_stopping, daemon=True).start()
    raise KeyboardInterrupt


def _adopt_orphans():
    """Make this process the parent of its descendants whose parent dies (Linux's child
    subreaper), so that a task whose shell is stopped first is still found and stopped."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _keep_stopping():
    while True:
        _stop_descendants()
        time.sleep(0.2)


def _stop_descendants():
    """SIGTERM every process this one started, and theirs (the tasks' shells and Pythons)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [os.getpid()]
    while frontier:
        started = children.get(frontier.pop(), [])
        found += started
        frontier += started
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def _keep_latest(folder, count, pattern="*"):
    """Remove all but the `count` newest run folders (named like `pattern`) in `folder` (0: keep all)."""
    if not count or not folder.is_dir():
        return
    runs = sorted((p for p in folder.glob(pattern) if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in runs[:-count]:
        shutil.rmtree(old, ignore_errors=True)


# What a task in a container is given of this process's environment (the rest, PATH first, is
# the image's own).
TASK_ENV_PREFIXES = ("MLFLOW_", "DUDCH_", "AWS_", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "HF_HUB_OFFLINE", "TMPDIR")


def _check_image(image, tracking_uri):
    """Refuse `dudch run --image` up front when its tasks could not start: no Docker engine, an
    image neither here nor pullable, or an MLflow store a container cannot reach."""
    import docker

    if not tracking_uri.startswith(("http://", "https://")):
        raise DudchError("--image runs the tasks in containers, which cannot reach a local sqlite store; "
                         "start an MLflow server (mlflow/server.sh) and set MLFLOW_TRACKING_URI=http://...")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as error:
        raise DudchError(f"no Docker engine answers ({first_line(error)[:120]}); start dockerd or set "
                         f"DOCKER_HOST") from None
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(image)
        except docker.errors.APIError as error:
            raise DudchError(f"cannot pull image {image} ({first_line(error.explanation or error)[:160]}); "
                             f"build and push it (make image-test shows how) or check the name") from None


def _local_runner(image, dataset, scratch):
    """(KFP local runner, the SOURCE as the tasks see it). In a subprocess the
    tasks see this machine. In containers (`image`) they see one mount, .dudch (outputs, logs,
    caches, this run's scratch folder), at its own path: the dataset's folder is linked into the
    scratch folder (hard links: no copy), as KFP's workspace mount would delete it after the run.
    They run as this user, so that what they write here is this user's."""
    import kfp.local

    if not image:
        return kfp.local.SubprocessRunner(use_venv=False), dataset
    kind, _, path = dataset.partition(":")
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    staged = scratch / "dataset"
    shutil.copytree(folder, staged, copy_function=_link_or_copy)
    environment = {k: v for k, v in os.environ.items() if k.startswith(TASK_ENV_PREFIXES)}
    runner = kfp.local.DockerRunner(network_mode="host", user=f"{os.getuid()}:{os.getgid()}",
                                    environment={**environment, "HOME": "/tmp"})
    return runner, f"{kind}:{staged / Path(path).relative_to(folder)}"


def _link_or_copy(source, destination):
    try:
        os.link(source, destination)
    except OSError:  # another file system
        shutil.copy2(source, destination)


def _resolve_dataset(root, source, params, on_this_machine):
    """(the SOURCE the tasks read, its DVC pin, its URI for MLflow). With data_repo the prepare
    task fetches the pinned version; else the path is read where the tasks run: on this machine
    (checked against its pin here) or in the cluster's pods (not checkable from here)."""
    from dudch import sources
    from pipeline import data

    kind, path = sources.parse(source)
    repo = params.get("data_repo")
    if repo:
        return source, data.pin(path, repo, params.get("data_rev") or None), repo
    if not on_this_machine:
        return source, dict(dvc_file=None, md5=None, rev=None), path or kind
    local = (root / (path or sources.DEFAULT_OPENCLIPART)).resolve()
    if not local.exists():
        fix = "run `dudch data openclipart`" if kind == "openclipart" else "check the path"
        raise DudchError(f"dataset not found at {local}; {fix}")
    pin = data.pin(local, root, check_workspace=True)
    if pin["md5"] is None:
        print(f"warning: {local} is not tracked by DVC, so no data version is recorded for it; "
              f"`dvc add` it and commit the .dvc file", file=sys.stderr)
    return f"{kind}:{local}", pin, local


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
    if "dataset" not in params:
        raise DudchError("--param dataset=SOURCE is required (e.g. manifest:data/own/pairs.jsonl "
                         "with data_repo=GIT_URL and data_rev=REV)")
    params.setdefault("cache_dir", "/tmp/dudch-cache")
    from pipeline import tracking, validate

    validate.check_parameters(_with_defaults({k: v for k, v in params.items() if k not in RUN_INPUTS}))

    root = Path.cwd().resolve()
    experiment_id = tracking.connect(root)
    dataset, pin, data_uri = _resolve_dataset(root, params["dataset"], params, on_this_machine=False)
    if "mlflow_parent_run_id" not in params:
        run_params = {k: v for k, v in params.items() if k not in RUN_INPUTS}
        params["mlflow_parent_run_id"] = tracking.start_parent_run(
            root, experiment_id, _with_defaults(run_params), dataset, pin, data_uri)
    params.setdefault("data_version", _data_version(pin, params["mlflow_parent_run_id"]))

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
    link = f"{host}/#/runs/details/{run.run_id}"
    import mlflow

    mlflow.MlflowClient().set_tag(params["mlflow_parent_run_id"], "kfp.run_url", link)
    print(f"run {run.run_id}\n{link}\nMLflow parent run {params['mlflow_parent_run_id']}: it ends "
          f"FINISHED or FAILED when the pipeline does (its exit task)")


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


def _promote(args):
    from pipeline import registry, tracking

    tracking.connect(Path.cwd())
    result = registry.promote(args.run, args.bits, args.name, args.alias, args.force)
    print(f"{result['name']} version {result['version']} (a student of {result['teacher']}) is @{args.alias} "
          f"({result['decision']})\n"
          f"load it with mlflow.pyfunc.load_model('models:/{result['name']}@{args.alias}')")


def _search(args):
    from pipeline import registry, tracking

    tracking.connect(Path.cwd())
    rows, warning = registry.search(args.model, args.text, args.image, args.top)
    print(f"{'rank':>4}  {'id':<42} {'hamming':>7}  {'match':<5}  text")
    for row in rows:
        match = "exact" if row["exact"] else ""
        print(f"{row['rank']:>4}  {row['id']:<42} {row['distance']:>7}  {match:<5}  {row['text']}")
    if warning:
        print(f"note: {warning}", file=sys.stderr)


def _index(args):
    from pipeline import index, tracking

    root = Path.cwd().resolve()
    tracking.connect(root)
    started = time.perf_counter()
    if hasattr(args, "dataset"):
        dataset, pin, _ = _resolve_dataset(root, args.dataset, {}, on_this_machine=True)
        result = index.add(args.model, dataset, pin["md5"], str(root / ".dudch" / "cache"), args.name, args.alias,
                           progress=sys.stderr.isatty())
        change = f"{_items(result['added'])} added"
    else:
        result = index.remove(args.model, index.read_ids(args.ids), args.name, args.alias)
        change = f"{_items(result['removed'])} removed"
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    moved = f"@{args.alias} moved to it" if args.alias else "no alias moved (pass --alias to move one)"
    uri = f"models:/{result['name']}/{result['version']}"
    print(f"{result['name']} version {result['version']}: version {result['parent']} with {change}, "
          f"{result['items']} items in all, in {time.perf_counter() - started:.0f} s; {moved}\n"
          f"search it: dudch search --model {uri} --text ...")


def _serve(args):
    import uvicorn

    from pipeline import serving, tracking

    tracking.connect(Path.cwd())
    os.environ[serving.MODEL_ENV] = args.model
    app = serving.served_app()  # loaded here, so that a model that cannot be served is one line, before listening
    print(f"serving {args.model} at http://{args.host}:{args.port}/invocations ({args.workers} worker"
          f"{'s' if args.workers > 1 else ''}); Ctrl-C stops it", flush=True)
    if args.workers == 1:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    else:
        uvicorn.run("pipeline.serving:served_app", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level="warning")


def _items(count):
    return f"{count} item{'' if count == 1 else 's'}"


def _compare(args):
    from pipeline import registry, tracking

    comparison = registry.compare(tracking.connect(Path.cwd()), args.last)
    print(json.dumps(comparison) if args.json else registry.format_comparison(comparison))


def _report(args):
    from pipeline import tracking

    experiment_id = tracking.connect(Path.cwd())
    result = tracking.report(experiment_id, args.run_id)
    if args.json:
        print(json.dumps({k: result[k] for k in ("run_id", "dataset", "data_version", "teacher", "results")}))
    else:
        print(f"pipeline run {result['run_id']} ({result['status']}), data {result['dataset']} "
              f"{result['data_version']}, teacher {result['teacher']}\n")
        print(tracking.format_table(result))


if __name__ == "__main__":
    sys.exit(main())
