"""Throughput, MFU and memory figures, and the sinks they go to: console, JSONL file, W&B, TensorBoard."""

import json
import logging
import os
import resource
import socket
from pathlib import Path

import torch

from ..config import TensorBoardSection, WandbSection
from .jsonl import open_to_append

log = logging.getLogger("train")

# Dense bf16 peak TFLOP/s per GPU (no sparsity), from the vendors' data sheets.
PEAK_TFLOPS = {
    "A100": 312.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM and NVL; torchtitan uses 989 for H100
    "H200": 989.0,
    "B200": 2250.0,
}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """Peak bf16 TFLOP/s of one device; None when unknown (then MFU is not printed)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: GPU memory allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _wandb_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    if not has_key:
        return "offline"
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
        return "online"
    except OSError:
        return "offline"


def _lines(path: Path) -> int:
    """How many records an append-only JSONL file already holds (0 when it does not exist)."""
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _start_wandb(run_dir: Path, wandb_cfg: WandbSection, config: dict, wandb_id: str | None):
    """The W&B run (resumed when wandb_id is given), or None: disabled, or W&B failed to start."""
    try:
        mode = _wandb_mode(wandb_cfg.mode)
        if mode == "disabled":
            return None
        import wandb  # only when enabled: the GPU images may not have it

        # Quiet: W&B's own lines (a header, and at the end a history and summary panel of some 34 lines) stay
        # off the console; our two lines (here and in MetricSinks.close) say where the run is. Its warnings and
        # errors still show. show_info is read from wandb.setup's settings, quiet from the run's.
        wandb.setup(settings=wandb.Settings(show_info=False))
        run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=run_dir.name, id=wandb_id,
                         resume="allow", dir=str(run_dir), config=config, mode=mode,
                         settings=wandb.Settings(quiet=True))
        # Charts plot against the training step, which goes back after a rollback or a resume from an
        # older checkpoint: a re-done step is drawn again, after the first try, instead of being dropped.
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
    except Exception as e:  # no wandb package, no network for online mode, a broken service: keep training
        log.warning("W&B did not start (%s); continuing without W&B (metrics.jsonl has everything; "
                    "wandb.mode=disabled skips it)", e)
        return None
    log.info("W&B run %s (%s) %s", run.id, mode, f"in {run_dir / 'wandb'}" if run.offline else f"at {run.url}")
    return run


def _wandb_end_line(run) -> str:
    """The one line a finished W&B run leaves on the console: where it is, and for an offline run how to upload
    it (the history and summary are in metrics.jsonl and the run's .wandb file)."""
    if run.offline:
        return f"W&B run {run.id} saved offline: `wandb sync {run.settings.sync_dir}` uploads it"
    return f"W&B run {run.id} synced: {run.url}"


def _start_tensorboard(run_dir: Path, tensorboard_cfg: TensorBoardSection):
    """A SummaryWriter in tensorboard.dir (<run>/tensorboard when empty), or None: disabled, or it failed."""
    if not tensorboard_cfg.enabled:
        return None
    folder = run_dir / (tensorboard_cfg.dir or "tensorboard")
    try:
        from torch.utils.tensorboard import SummaryWriter  # only when enabled: the GPU images may not have it
    except ImportError as e:
        log.warning("TensorBoard did not start (%s): pip install 'tensorboard>=2.14', or set tensorboard.enabled="
                    "false; continuing without TensorBoard (metrics.jsonl has everything)", e)
        return None
    try:
        writer = SummaryWriter(log_dir=str(folder))
    except Exception as e:  # a folder that cannot be made or written
        log.warning("TensorBoard cannot write to %s (%s): make it writable or set tensorboard.dir to another "
                    "folder; continuing without TensorBoard (metrics.jsonl has everything)", folder, e)
        return None
    log.info("TensorBoard event files in %s", folder)
    return writer


def _tensorboard_write(writer, record: dict) -> None:
    """Every number of a record as a scalar at the record's training step (the key is the tag)."""
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
            writer.add_scalar(key, value, global_step=record["step"])
    writer.flush()


class MetricSinks:
    """Rank 0 writes every record to the JSONL file, to W&B and (tensorboard.enabled) to TensorBoard, at the
    record's training step; other ranks write nothing.

    W&B drops a row logged at a lower step than one it has already seen, and the training step goes back
    after a rollback or a resume from an older checkpoint. So W&B's own step is the record's line number
    in metrics.jsonl: append-only, it only grows, across rollbacks, restarts and the several offline
    folders of one resumed run (`wandb sync` uploads them in order and drops nothing). The training step
    is logged as the metric `step`, the x-axis of every chart."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_cfg: WandbSection, tensorboard_cfg: TensorBoardSection,
                 config: dict, wandb_id: str | None):
        """config: the run's whole config as plain values, which W&B records with the run."""
        self.enabled = enabled
        self.jsonl, self.wandb_run, self.wandb_id, self.wandb_step = None, None, wandb_id, 0
        self.tensorboard = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        self.jsonl = open_to_append(path)
        self.wandb_step = _lines(path)
        self.wandb_run = _start_wandb(run_dir, wandb_cfg, config, wandb_id)
        if self.wandb_run is not None:
            self.wandb_id = self.wandb_run.id
            self.wandb_step = max(self.wandb_step, self.wandb_run.step)  # an online resume knows the server's
        self.tensorboard = _start_tensorboard(run_dir, tensorboard_cfg)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.wandb_run is not None:
            try:  # committed at once: a job killed right after still has this row in its .wandb file
                self.wandb_run.log(record, step=self.wandb_step, commit=True)
            except Exception as e:  # e.g. SLURM's SIGTERM killed W&B's service process: keep training
                log.warning("W&B logging failed (%s); continuing without W&B (metrics.jsonl has everything)", e)
                self.wandb_run = None
        self.wandb_step += 1  # one W&B step per line of metrics.jsonl, logged to W&B or not
        if self.tensorboard is not None:
            try:
                _tensorboard_write(self.tensorboard, record)
            except Exception as e:  # e.g. the disk filled up: keep training
                log.warning("TensorBoard logging failed (%s); continuing without TensorBoard", e)
                self.tensorboard = None

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
                log.info(_wandb_end_line(self.wandb_run))
            except Exception as e:
                log.warning("W&B finish failed (%s)", e)
        if self.tensorboard is not None:
            try:
                self.tensorboard.close()  # flushes
            except Exception as e:
                log.warning("TensorBoard close failed (%s)", e)
