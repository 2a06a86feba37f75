"""DUDCH: deep unsupervised discrete cross-modal hashing by knowledge distillation.

The algorithms only: data preparation, the DJSRH teacher, similarity reconstruction, the
asymmetric DCC student and the retrieval metrics. Nothing here imports KFP or MLflow, so every
stage runs and tests anywhere; `components/` and `pipeline/` wire it into Kubeflow and MLflow.
"""

__version__ = "0.1.0"


class DudchError(Exception):
    """A problem the user can fix. Its message is one line: what is wrong, then the fix."""


def first_line(error, limit=200):
    """An exception (or message) as one short line, for quoting inside a DudchError."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]
