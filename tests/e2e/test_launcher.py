"""`llm-pretrain --nproc_per_node=N ...` (launch/launcher.py): a failing 2-process run ends in the rank's one line and
its status, without torchrun's `ChildFailedError` traceback; and which rank's line it reports."""

import subprocess
import sys

from helpers import TINY, env, tiny_data
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from launch.launcher import EXIT_PEER_LOST, report, split_args


def test_a_config_error_on_two_processes_is_one_line(tmp_path_factory, tmp_path):
    """A batch that does not divide over 2 ranks: both ranks fail at the config check; the user sees rank 0's
    line alone (the other rank's goes to the launcher's files) and its status, nothing of torchrun's."""
    cmd = [sys.executable, "-c", "from launch.pretrain import main; main()", "--nproc_per_node=2", "+conf=debug",
           f"hydra.run.dir={tmp_path / 'run'}", *TINY, *tiny_data(tmp_path_factory), "global_batch_size=6",
           "micro_batch_size=2"]  # `llm-pretrain ...`: the installed command runs this main
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = proc.stderr.splitlines()
    assert line.startswith("error (rank 0): global_batch_size=6 must be divisible"), line


def failure(local_rank: int, exitcode: int, timestamp: int) -> ProcessFailure:
    """torch's record of a worker that ended: no error file (our workers write none), its time of failure."""
    ended = ProcessFailure(local_rank=local_rank, pid=1000 + local_rank, exitcode=exitcode, error_file="<N/A>")
    ended.timestamp = timestamp
    return ended


def test_which_rank_is_reported(tmp_path, capsys):
    """torch records a rank still ending when it saw the first failure as SIGTERMed (-15): rank 0's own line is
    on the console, so nothing is added; a rank that failed alone (rank 0 only lost it, status 76) has its line
    added, or for a crash the end of the stderr file torch's launch wrote for it."""
    rank0_said = {0: (1, "error (rank 0): global_batch_size=6 ..."), 1: (1, "error (rank 1): global_batch_size=6 ...")}
    assert report({0: failure(0, -15, 2), 1: failure(1, 1, 1)}, rank0_said, tmp_path) == 1
    assert capsys.readouterr().err == ""
    rank1_said = {1: (1, "error (rank 1): out of memory at step 7")}
    assert report({0: failure(0, EXIT_PEER_LOST, 2), 1: failure(1, 1, 1)}, rank1_said, tmp_path) == 1
    assert capsys.readouterr().err == "error (rank 1): out of memory at step 7\n"
    stderr = tmp_path / "run_id" / "attempt_0" / "1" / "stderr.log"
    stderr.parent.mkdir(parents=True)
    stderr.write_text("Traceback (most recent call last):\n  ...\nSegmentationError: it crashed\n")
    assert report({0: failure(0, EXIT_PEER_LOST, 2), 1: failure(1, 139, 1)}, {}, tmp_path) == 139
    assert capsys.readouterr().err == stderr.read_text()


def test_torchrun_options_come_before_the_overrides():
    assert split_args(["--nproc_per_node", "2", "--standalone", "+conf=debug", "steps=3"]) == (
        ["--nproc_per_node", "2", "--standalone"], ["+conf=debug", "steps=3"])
    assert split_args(["+conf=debug", "steps=3"]) is None  # one process, or a worker under torchrun
    assert split_args(["--cfg", "job", "+conf=debug"]) is None  # Hydra's own flags
