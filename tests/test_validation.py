"""`dudch run` refuses bad parameters and datasets before anything starts: one line naming the
problem, exit 2, in seconds, and no MLflow run is created."""

import time

import pytest

from tests import datasets
from tests.helpers import dudch

CASES = [
    (("--bits", "-8"), "--bits -8 is out of range: code lengths are 8 to 1024 bits"),
    (("--bits", "0"), "--bits 0 is out of range"),
    (("--bits", "100000"), "--bits 100000 is out of range"),
    (("--bits", "16", "16"), "--bits lists 16 more than once"),
    (("--seed", "-1"), "seed must be 0 or more, got -1"),
    (("--max-items", "3"), "--max-items 3 is too few: a run needs at least 10 items"),
    (("--param", "similarity_rule=nonsense"), "similarity_rule='nonsense' is not one of: mutual_knn, union_knn, quantile, graded"),
    (("--param", "seed=3"), "set seed with --seed, not --param"),
    (("--param", "teacher_epochs=0"), "teacher_epochs must be positive, got 0"),
    (("--param", "similarity_related_fraction=1.5"), "similarity_related_fraction must be between 0 and 1"),
    (("--param", "student_optimizer=rmsprop"), "student_optimizer='rmsprop' is not one of: sgd, adam"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_parameters_are_refused_up_front(tmp_path, args, message):
    store = tmp_path / "mlflow.db"
    started = time.time()
    done = dudch("run", *args, env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    assert done.returncode == 2, done.stdout[-1000:] + done.stderr[-1000:]
    assert done.stderr.count("\n") == 1 and message in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert time.time() - started < 10
    assert not store.exists()  # nothing was started, so nothing is left RUNNING


def test_an_empty_manifest_is_refused_up_front(tmp_path):
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("")
    done = dudch("run", "--dataset", f"manifest:{manifest}", env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr
    *warning, error = done.stderr.strip().splitlines()
    assert error.startswith("error: ") and "is empty; add one record per image-text pair" in error
    assert len(warning) <= 1  # that unpinned data is not versioned
