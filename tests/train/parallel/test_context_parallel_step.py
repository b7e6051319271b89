"""Context parallelism's pieces: the load-balanced split of a window over the cp ranks (in process), the layouts
TrainConfig refuses at start-up, and one torchrun of 2 gloo ranks (tests/support/cp_worker.py) for the step's
gradients against one rank's, eager and with torch.compile'd blocks, and the mask each rank builds."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from train.config import TrainConfig
from train.parallel.context_parallel import local_positions


@pytest.mark.parametrize("cp", [2, 4])
def test_the_ranks_hold_the_window_once_between_them(cp):
    T = 16 * cp
    held = torch.cat([local_positions(T, cp, rank) for rank in range(cp)])
    assert sorted(held.tolist()) == list(range(T))
    assert all(len(local_positions(T, cp, rank)) == T // cp for rank in range(cp))


@pytest.mark.parametrize("cp", [2, 4])
def test_causal_attention_work_is_the_same_on_every_cp_rank(cp):
    """A query at window position p attends to p + 1 keys: each rank's queries, summed, the same number of (query,
    key) pairs, (T(T+1)/2) / cp. A contiguous split would give the last rank the most (cp=2: 3x the first's)."""
    T = 16 * cp
    work = [int((local_positions(T, cp, rank) + 1).sum()) for rank in range(cp)]
    assert work == [T * (T + 1) // 2 // cp] * cp


def config(seq_len: int = 64, **parallel) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.shards, cfg.data.seq_len, cfg.global_batch_size, cfg.micro_batch_size = ["a"], seq_len, 16, 1
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


@pytest.mark.parametrize("world_size, seq_len, parallel, message", [
    (4, 64, {"cp": 3}, "parallel.cp=3 x parallel.dp_replicate x parallel.tp x parallel.pp = 3 x 1 must divide the "
                       "world size 4"),
    (4, 64, {"cp": 2, "tp": 4}, "parallel.cp=2 x parallel.dp_replicate x parallel.tp x parallel.pp = 2 x 4 must "
                                "divide"),
    (4, 64, {"cp": 2, "pp": 4}, "parallel.cp=2 x parallel.dp_replicate x parallel.tp x parallel.pp = 2 x 4 must "
                                "divide"),
    (4, 62, {"cp": 2}, "data.seq_len=62 must be divisible by 2 x parallel.cp x parallel.tp = 4"),
    (4, 36, {"cp": 2, "tp": 2}, "data.seq_len=36 must be divisible by 2 x parallel.cp x parallel.tp = 8"),
], ids=["world", "world_with_tp", "world_with_pp", "seq_len", "seq_len_with_tp"])
def test_layouts_cp_cannot_run_are_refused_in_one_line(world_size, seq_len, parallel, message):
    with pytest.raises(ValueError) as e:
        config(seq_len, **parallel).check(world_size=world_size)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_layouts_cp_can_run_pass():
    config(cp=2).check(world_size=4)  # cp2 x dp_shard2
    config(cp=2, tp=2).check(world_size=4)  # 64 = 2 x 2 x 2 x 8
    config(cp=2, dp_replicate=2).check(world_size=8)
    config(cp=2, pp=2).check(world_size=4)  # each pipeline stage all-gathers K/V over its cp group
    config(60, cp=1, tp=2).check(world_size=2)  # without CP, no split into chunks


# torch.compile on the CPU (inductor) builds its kernels with a C++ compiler.
CXX = shutil.which("c++") or shutil.which("g++")
# Inductor's unvectorised C++ compiles in half the time, and one compile thread saves starting a pool of them: the
# compiled step costs about 30 s on 2 cores rather than 90 (from an empty cache; CI's is).
QUICK_INDUCTOR = {"TORCHINDUCTOR_VEC_ISA_OK": "0", "TORCHINDUCTOR_COMPILE_THREADS": "1"}


@pytest.fixture(scope="module")
def worker():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "support" / "cp_worker.py"), *(["--compile"] if CXX else [])]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **QUICK_INDUCTOR}, capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("document_masking", [True, False])
def test_cp2_step_gradients_equal_one_rank(worker, document_masking):
    """Loss, token count, gradient norm and every parameter's gradient of the mean loss to 1e-5."""
    _, out = worker
    assert f"OK gradients document_masking={document_masking}" in out, out


def test_each_cp_rank_masks_its_queries_by_window_and_document(worker):
    _, out = worker
    assert "OK masks" in out, out


@pytest.mark.skipif(CXX is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_cp2_step_with_compiled_blocks_equals_one_rank(worker):
    """parallel.compile under CP: each block's graph holds the K/V all-gather (a functional collective, whose
    backward reduce-scatters) and the masked attention; the step's loss and gradients equal one rank's to 1e-5."""
    code, out = worker
    assert code == 0 and "OK compiled gradients document_masking=True" in out, out


@pytest.mark.parametrize("document_masking", [True, False], ids=["documents", "causal"])
def test_flex_block_mask_attends_as_the_sdpa_mask(document_masking):
    """CUDA's mask kind under context parallelism (a BlockMask for flex attention, the kernel docs/gpu.md lists)
    gives each rank's queries the attention the CPU's additive SDPA mask gives (flex's forward runs on the CPU);
    windows of 256 with documents crossing the two ranks' chunks and tiles of both kinds (skipped and partial)."""
    from model.attention import attend
    from train.parallel.context_parallel import window_mask

    T, cp, B, H, Hd = 256, 2, 2, 4, 16
    gen = torch.Generator().manual_seed(0)
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[0, [0, 50, 70, 130, 200]] = True
    starts[1, [0, 127, 129]] = True
    steps = torch.arange(T)
    positions = steps - torch.cummax(torch.where(starts, steps, 0), dim=1).values  # 0 at each document's start
    for rank in range(cp):
        here = local_positions(T, cp, rank)
        q = torch.randn(B, H, len(here), Hd, generator=gen)
        k, v = torch.randn(B, H, T, Hd, generator=gen), torch.randn(B, H, T, Hd, generator=gen)
        dense = window_mask(here, positions[:, here], T, document_masking, "sdpa", torch.float32)
        blocks = window_mask(here, positions[:, here], T, document_masking, "flex", torch.float32)
        torch.testing.assert_close(attend(q, k, v, blocks), attend(q, k, v, dense), atol=1e-5, rtol=1e-5)
