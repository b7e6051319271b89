"""The memory and throughput planner through its command line."""

import subprocess
import sys

from helpers import REPO


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "plan.py"), *args], capture_output=True, text=True,
                          timeout=120)


def test_validation_against_measured_and_published_figures():
    proc = plan("--validate")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" ok") == 6


def test_plan_prints_assumptions_and_a_recommendation():
    proc = plan("+conf=8b", "gpus=8")
    assert proc.returncode == 0, proc.stderr
    assert "assumptions:" in proc.stdout and "GB/s" in proc.stdout
    assert "recommendation: micro_batch_size=" in proc.stdout


def test_a_model_too_large_for_its_gpus_is_flagged():
    proc = plan("+conf=405b", "gpus=8")
    assert proc.returncode == 1
    assert "DOES NOT FIT" in proc.stdout and "nothing fits on 8 GPUs" in proc.stdout
