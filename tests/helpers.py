import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPENCLIPART = ROOT / "data" / "openclipart"


def interruptible():
    """A `preexec_fn` that lets the child take Ctrl-C as a terminal's foreground job does. A job
    started in the background (`make test &`, nohup) ignores SIGINT, and every process it starts
    inherits that, so without this a test's SIGINT would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_pipeline(*args, env):
    """`dudch run ARGS` in the project root: (CompletedProcess, parent run id, the run's KFP
    output folder); the test fails here, with the run's output, when the run does."""
    before = set((ROOT / ".dudch" / "kfp").glob("dudch-*"))
    done = dudch("run", *args, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (kfp_dir,) = set((ROOT / ".dudch" / "kfp").glob("dudch-*")) - before
    return done, done.stdout.split("MLflow parent run ")[1].split()[0], kfp_dir


def dudch(*args, env=None, cwd=ROOT, timeout=900, reuse=False):
    """Run the real `dudch` console script of this virtualenv; returns the CompletedProcess.
    A run keeps every earlier run's outputs (tests read theirs back after later runs) and, unless
    `reuse`, reuses no task output of an earlier run (whatever ran in this checkout before)."""
    if args[:1] == ("run",):
        args = (*args, "--keep-runs", "0") + (() if reuse else ("--no-cache",))
    command = [str(Path(sys.executable).with_name("dudch")), *args]
    return subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
