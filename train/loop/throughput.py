"""Training figures over each logging window: mean loss, tokens/s (global and per device), TFLOP/s,
MFU, peak memory and time spent waiting for data (a loop hook, train/loop/hooks.py). The window's time leaves out
evaluation (the seconds a validation record's val_s and a downstream record's eval_s say it took), so that
tokens/s is the training's own whatever eval.tasks and val_interval cost."""

import time

from ..observe.metrics import peak_memory_gib


class Throughput:
    def __init__(self, tokens_per_step: int, world_size: int, flops_per_token: float, peak_tflops: float | None,
                 device):
        self.tokens_per_step, self.world_size, self.device = tokens_per_step, world_size, device
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self._start_window()

    def _start_window(self) -> None:
        self.losses, self.data_wait_s, self.eval_s, self.t0 = [], 0.0, 0.0, time.perf_counter()

    def after_step(self, step: int, result) -> None:
        self.losses.append(result.loss)
        self.data_wait_s += result.data_wait_s

    def write(self, record: dict) -> None:
        self.eval_s += record.get("val_s", 0.0) + record.get("eval_s", 0.0)

    def on_rollback(self, to_step: int) -> None:
        self.losses.pop()  # the step that was rolled back (the one just done) is not counted; its wait is

    def report(self, step: int) -> dict:
        """The window's figures, and a new window from now."""
        elapsed = time.perf_counter() - self.t0 - self.eval_s
        tps = len(self.losses) * self.tokens_per_step / elapsed
        per_device = tps / self.world_size
        figures = {"step": step, "loss": sum(self.losses) / max(len(self.losses), 1), "tokens_per_s": tps,
                   "tokens_per_s_per_device": per_device, "tflops_per_device": per_device * self.flops_per_token / 1e12,
                   "peak_memory_gib": peak_memory_gib(self.device), "data_wait_s": self.data_wait_s}
        if self.peak_tflops:
            figures["mfu"] = figures["tflops_per_device"] / self.peak_tflops
        self._start_window()
        return figures


def summary_line(m: dict) -> str:
    """One line of a report, for the progress bar or the log."""
    text = (f"loss {m['loss']:.4f} lr {m['lr']:.2e} gnorm {m['grad_norm']:.2f} "
            f"{m['tokens_per_s']:,.0f} tok/s ({m['tokens_per_s_per_device']:,.0f}/dev) "
            f"{m['tflops_per_device']:.1f} TFLOP/s")
    if "mfu" in m:
        text += f" MFU {100 * m['mfu']:.1f}%"
    return text + f" mem {m['peak_memory_gib']:.1f} GiB data {m['data_wait_s']:.2f}s"
