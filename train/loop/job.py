"""One process of a training job, from the typed config to the result: values checked, process
group joined, run folder locked, logging set up, then the trainer; a hung or dead peer or too little
memory becomes one line instead of a traceback."""

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from ..config import TrainConfig
from ..observe.logs import setup_logging
from ..parallel.distributed import Dist, collective_failure, destroy_distributed, init_distributed
from ..state.run_lock import RunInUse, RunLock
from .trainer import Trainer

log = logging.getLogger("train")


def run(train_cfg: TrainConfig, run_dir: Path) -> dict:
    """Train; returns {"step", "val_loss", ...} or {"step", "stopped": True} after a stop request."""
    trainer = lock = None
    finished = False  # else an error, which the other ranks may not share
    try:
        train_cfg.check(int(os.environ.get("WORLD_SIZE", "1")))
        parallel_cfg = train_cfg.parallel
        env = init_distributed(parallel_cfg.dp_replicate, train_cfg.collective_timeout_s, parallel_cfg.tp,
                               parallel_cfg.pp, parallel_cfg.cp)
        lock = lock_run_folder(run_dir, env)
        setup_logging(run_dir, env.rank)
        torch.manual_seed(train_cfg.seed)
        trainer = Trainer(train_cfg, run_dir, env)
        result = _train(trainer, train_cfg, run_dir)
        finished = True
        return result
    except RuntimeError as e:
        where = f"at step {trainer.state.counters.step + 1}" if trainer else "during start-up"
        one_line = _one_line(e, train_cfg, where)
        if one_line is None:
            raise
        raise one_line from None
    finally:
        if trainer:
            trainer.close()
        destroy_distributed(every_rank_here=finished)
        if lock:
            lock.release()


def lock_run_folder(run_dir: Path, env: Dist) -> RunLock | None:
    """Rank 0 locks the run folder for the job's life; every rank learns whether it could, so all of
    them stop at once when another job holds it."""
    lock, problem = None, [""]
    if env.is_main:
        try:
            lock = RunLock.acquire(run_dir)
        except OSError as e:
            problem = [str(e)]
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise RunInUse(problem[0] if env.is_main else f"rank 0 could not lock {run_dir}: see its error")
    return lock


def _one_line(e: RuntimeError, train_cfg: TrainConfig, where: str) -> Exception | None:
    """The one-line error for running out of device memory, or a collective that lost a peer or timed out."""
    if isinstance(e, torch.OutOfMemoryError):
        return MemoryError(
            f"out of device memory {where} (micro_batch_size={train_cfg.micro_batch_size}, data.seq_len="
            f"{train_cfg.data.seq_len}, parallel.activation_checkpointing="
            f"{train_cfg.parallel.activation_checkpointing}): "
            "lower micro_batch_size (global_batch_size stays, through accumulation) or set "
            "parallel.activation_checkpointing=selective or full; `llm-plan` shows the budget")
    return collective_failure(e, where, int(os.environ.get("RANK", "0")), train_cfg.collective_timeout_s)


def _train(trainer: Trainer, train_cfg: TrainConfig, run_dir: Path) -> dict:
    if trainer.env.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(train_cfg))  # as resolved (demo data paths)
    result = trainer.fit()
    if result.get("stopped"):
        return result
    if trainer.data.unigram_baseline is not None and result["val_loss"] is not None:
        result["unigram_baseline"] = trainer.data.unigram_baseline
        log.info("validation loss %.3f nats/token vs unigram baseline %.3f of the same tokens",
                 result["val_loss"], result["unigram_baseline"])
    if train_cfg.sample_prompt:
        result["sample"] = trainer.sample(train_cfg.sample_prompt, train_cfg.sample_tokens)
        log.info("sample: %r", result["sample"])
    if train_cfg.report and trainer.env.is_main:
        write_report(run_dir)
    return result


def write_report(run_dir: Path) -> None:
    """<run>/report.png, the run's curves (train/observe/report.py); a failure is one warning, never a failed run."""
    try:
        from ..observe.report import write_report as draw  # matplotlib: imported only here, at the end

        path = draw([run_dir], run_dir / "report.png")
    except Exception as e:  # noqa: BLE001 - no matplotlib, a full disk, a record it cannot read: the run is done
        log.warning("report not written (%s: %s); with matplotlib installed (pip install 'matplotlib>=3.7'), "
                    "`llm-report %s` draws it", type(e).__name__, e, run_dir)
        return
    log.info("report: %s (training and validation curves; llm-report overlays runs)", path)
