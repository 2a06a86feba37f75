import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPENCLIPART = ROOT / "data" / "openclipart"


def dudch(*args, env=None, cwd=ROOT, timeout=900):
    """Run the real `dudch` console script of this virtualenv; returns the CompletedProcess."""
    command = [str(Path(sys.executable).with_name("dudch")), *args]
    return subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
