"""One training step under torch.profiler (`profile_step=N`): where a step's time goes, to decide what
to speed up next. Writes <run>/profile/trace_rank<r>.json (open in Perfetto or chrome://tracing) and
<run>/profile/summary_rank<r>.txt: the step's kernel time by kind, then the 25 costliest kernels.
On the CPU the same split is made of the operators' own CPU time."""

import contextlib
import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger("train")

# Kinds of kernels by name, first match wins (lower case). cuBLAS on Hopper names its GEMMs sm90_xmma_*
# or nvjet_*; cuDNN attention cudnn_*/*fmha*; inductor's fused kernels triton_* (flex attention's
# triton_tem_* first); NCCL nccl*; the fused AdamW multi_tensor_apply_kernel<...FusedAdam...>.
KINDS = (
    ("attention", ("flash", "fmha", "cudnn", "sdpa", "triton_tem", "attention")),
    ("communication", ("nccl", "all_reduce", "all_gather", "reduce_scatter")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "matmul", "addmm", "aten::mm", "aten::bmm")),
    ("optimizer", ("adam",)),
    ("copy / fill", ("memcpy", "memset", "copy_", "fill_", "elementwise_kernel")),
    ("fused by inductor", ("triton",)),
)


def kind_of(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, marks in KINDS if any(m in lower for m in marks)), "other")


class StepProfiler:
    """A loop hook (train/loop/hooks.py): the profiler on from the chosen step's batch to its result."""

    def __init__(self, step: int, run_dir: Path, rank: int, device: torch.device):
        self.step, self.folder, self.rank, self.device = step, run_dir / "profile", rank, device
        self.running: contextlib.AbstractContextManager | None = None

    def before_step(self, step: int, batch: dict) -> dict:
        if step == self.step:
            self.running = self._profiled()
            self.running.__enter__()
        return batch

    def after_step(self, step: int, result) -> None:
        if self.running is not None:
            running, self.running = self.running, None
            running.__exit__(None, None, None)  # writes the trace and the summary

    def close(self) -> None:
        """A step that failed under the profiler: stop it, writing nothing."""
        if self.running is not None:
            running, self.running = self.running, None
            running.__exit__(RuntimeError, RuntimeError("the step failed"), None)

    @contextlib.contextmanager
    def _profiled(self):
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the step's kernels end inside the profile
        self.folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.folder / f"trace_rank{self.rank}.json"))
        summary = self.folder / f"summary_rank{self.rank}.txt"
        summary.write_text(summarize(prof, on_gpu=self.device.type == "cuda", step=self.step))
        if self.rank == 0:
            log.info("step %d profiled: %s", self.step, summary)


def summarize(prof, on_gpu: bool, step: int) -> str:
    """The step's time by kind of kernel (self time, so nothing is counted twice), then the top 25."""
    if on_gpu:
        rows = [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
                if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
        what = "GPU kernel time"
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages() if e.self_cpu_time_total > 0]
        what = "CPU operator self time"
    rows.sort(key=lambda r: -r[1])
    total = sum(us for _, us, _ in rows) or 1.0
    by_kind: dict[str, float] = {}
    for name, us, _ in rows:
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + us
    lines = [f"step {step}: {what} {total / 1e3:.1f} ms", "", f"{'kind':<20} {'ms':>9} {'share':>6}"]
    lines += [f"{k:<20} {us / 1e3:>9.2f} {100 * us / total:>5.1f}%" for k, us in sorted(by_kind.items(),
                                                                                     key=lambda kv: -kv[1])]
    lines += ["", f"{'ms':>9} {'share':>6} {'calls':>6}  kernel"]
    lines += [f"{us / 1e3:>9.2f} {100 * us / total:>5.1f}% {n:>6}  {name[:140]}" for name, us, n in rows[:25]]
    return "\n".join(lines) + "\n"
