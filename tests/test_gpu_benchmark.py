"""benchmarks/gpu.py works the first time it meets a GPU: its tiny mode runs every part of it
(encoding in fp32 and bf16, a teacher epoch on pixels, a student iteration, mAP@all, the
device-against-CPU checks and a whole pipeline run) on the CPU, and writes its report."""

import subprocess
import sys

from tests.helpers import ROOT


def test_the_gpu_benchmark_runs_in_tiny_mode_and_writes_its_report(tmp_path):
    out = tmp_path / "gpu.md"
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--tiny", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = out.read_text()
    assert report.startswith("# GPU benchmark (tiny smoke-test mode: not a measurement)")
    for row in ("| encoding, fp32", "| encoding, bf16", "| teacher epoch on pixels", "| student outer iteration",
                "| mAP@all, 20 queries x 500 codes x 32 bits", "| whole pipeline, 120 items, bits [8, 16]"):
        assert row in report
    for stage in ("| prepare | - |", "| teacher | 8 |", "| similarity | 16 |", "| student | 8 |", "| evaluate | 16 |"):
        assert stage in report
    assert "100.000% of the bits identical" in report  # the "device" is the CPU here
    assert "largest difference in mAP@50 or mAP@all 0.0000" in report


def test_the_full_benchmark_refuses_to_run_without_a_gpu(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs the real benchmark")
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--out", str(tmp_path / "gpu.md")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "no CUDA device here" in done.stderr and not (tmp_path / "gpu.md").exists()
