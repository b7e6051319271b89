"""The memory and throughput planner through its command line."""

import subprocess
import sys

import pytest

from helpers import REPO


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "plan.py"), *args], capture_output=True, text=True,
                          timeout=120)


def test_validation_against_measured_and_published_figures():
    proc = plan("--validate")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" ok") == 8


def test_plan_prints_assumptions_and_a_recommendation():
    proc = plan("+conf=8b", "gpus=8")
    assert proc.returncode == 0, proc.stderr
    assert "assumptions:" in proc.stdout and "GB/s" in proc.stdout
    assert "recommendation: micro_batch_size=" in proc.stdout


def test_a_model_too_large_for_its_gpus_is_flagged():
    proc = plan("+conf=405b", "gpus=8")
    assert proc.returncode == 1
    assert "DOES NOT FIT" in proc.stdout and "nothing fits on 8 GPUs" in proc.stdout


@pytest.mark.parametrize("arg, names", [
    ("gpus=abc", "gpus takes an integer"), ("gpus=0", "gpus must be > 0"), ("overlap=1.5", "overlap must be within"),
    ("+conf=nope", "no conf/nope.yaml"), ("model.dimm=3", "did you mean 'model.dim'"),
    ("model.dim=63", "divisible by model.n_heads"), ("data.seq_len=0", "data.seq_len=0"),
])
def test_bad_input_is_one_line(arg, names, capsys):
    from launch.plan import main  # in-process: a subprocess per row would cost seconds of imports each

    with pytest.raises(SystemExit) as exit_:
        main([arg])
    out, err = capsys.readouterr()
    assert exit_.value.code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and names in err, err


def test_help_prints_usage():
    proc = plan("--help")
    assert proc.returncode == 0 and "python launch/plan.py +conf=70b gpus=64" in proc.stdout

