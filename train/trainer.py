"""The training loop: data -> FSDP2 Llama -> loss -> AdamW, with logging, validation and checkpoints."""

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from model import flops_per_token, num_params
from model.generate import generate

from . import checkpoint as ckpt
from . import hf_io
from .config import TrainConfig
from .data import DataBundle, open_data
from .distributed import Dist, all_reduce_sum, collective_timeout, destroy_distributed, init_distributed
from .metrics import MetricSinks, peak_memory_gib, peak_tflops
from .optim import build_optimizer, build_scheduler, clip_in_next_step
from .parallelize import single_device_autocast
from .setup import build_parallel_model, check_memory, resolve_model_config, setup_logging, validate_batch
from .signals import EXIT_STOPPED, StopRequest
from .stability import StabilityMonitor

log = logging.getLogger("train")


def loss_sum(model, input_ids, labels, position_ids=None, autocast: torch.dtype | None = None) -> torch.Tensor:
    """Sum of token cross-entropies in fp32 (normalised by the caller, token-weighted)."""
    with torch.autocast(input_ids.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        return model(input_ids, position_ids, labels=labels)


@torch.no_grad()
def evaluate(model, data: DataBundle, cfg: TrainConfig, env: Dist) -> float:
    """Mean validation loss per token over all ranks."""
    model.eval()
    total, count = torch.zeros((), device=env.device, dtype=torch.float64), 0
    for batch in data.validation(cfg.micro_batch_size, cfg.val_batches):
        total += loss_sum(model, batch["input_ids"].to(env.device), batch["labels"].to(env.device),
                          autocast=single_device_autocast(cfg.parallel, env)).double()
        count += batch["labels"].numel()
    model.train()
    total, count = all_reduce_sum([total.item(), count], env.device)
    return total / max(count, 1)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, env: Dist):
        self.cfg, self.run_dir, self.env = cfg, run_dir, env
        self.accum = validate_batch(cfg, env.world_size)
        self.data = open_data(cfg, env)
        self.model_cfg = resolve_model_config(cfg, self.data.tokenizer.vocab_size)
        check_memory(self.model_cfg, cfg, env)
        self.model = build_parallel_model(self.model_cfg, cfg, env)
        self.autocast = single_device_autocast(cfg.parallel, env)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.steps, cfg.optim)
        self.checkpointer = ckpt.Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                              cfg.checkpoint.keep_every, env.is_main, cfg.checkpoint.async_save)
        self.step, self.tokens_seen, self.skipped_steps, self.rollbacks, self.wandb_id = 0, 0, 0, 0, None
        self.stability = StabilityMonitor(cfg.stability)
        self._pending_faults = {"nan": set(cfg.faults.nan_loss_steps), "spike": set(cfg.faults.spike_data_steps)}
        self.flops_per_token = flops_per_token(self.model_cfg, cfg.data.seq_len)
        self.peak = peak_tflops(env.device, cfg.peak_tflops)
        self._resume_or_init()
        self.sinks = MetricSinks(run_dir, env.is_main, cfg.wandb, OmegaConf.to_container(OmegaConf.structured(cfg)),
                                 self.wandb_id)
        self.wandb_id = self.sinks.wandb_id
        # The sample ledger: which global samples each step consumed on this rank. After a resume
        # the re-done steps are appended again; the last line of a step is the one that counts.
        (run_dir / "ledger").mkdir(exist_ok=True)
        self.ledger = open(run_dir / "ledger" / f"rank{env.rank}.jsonl", "a")
        self.stop = StopRequest()

    # -- checkpoints ------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What must not change across a resume (checked key by key)."""
        return {"model": asdict(self.model_cfg), "tokenizer_sha256": self.data.tokenizer.sha256,
                "data.seq_len": self.cfg.data.seq_len}

    def _resume_or_init(self) -> None:
        self.checkpointer.clean_partial()
        dist.barrier()
        resume = self.cfg.checkpoint.resume
        path = None
        if resume == "auto":
            path = self.checkpointer.latest()
        elif resume.isdigit():
            path = self.checkpointer.folder / ckpt.step_dirname(int(resume))
        elif resume != "none":
            path = Path(resume)
        if path is not None:
            saved = ckpt.read_train_state(path) if ckpt.is_complete(path) else None
            if saved is None:
                raise FileNotFoundError(f"checkpoint.resume={resume}: {path} is not a complete checkpoint")
            self._check_fingerprint(saved["fingerprint"], path)
            state = ckpt.load(path, self.model, self.optimizer)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.skipped_steps, self.wandb_id = state.get("skipped_steps", 0), state.get("wandb_id")
            self.scheduler.load_state_dict(state["scheduler"])
            self.data.train.load_state_dict(state["loader"])
            log.info("resumed from %s at step %d (%d tokens seen)", path, self.step, self.tokens_seen)
        elif self.cfg.checkpoint.init_from:
            hf_io.init_from(Path(self.cfg.checkpoint.init_from), self.model)  # a DCP checkpoint or an HF folder
            log.info("initialised weights from %s (fresh optimizer, schedule and data)", self.cfg.checkpoint.init_from)

    def _check_fingerprint(self, saved: dict, path: Path) -> None:
        now = self.fingerprint()
        for key in now:
            if key == "model":
                for field_name, value in now["model"].items():
                    if saved["model"].get(field_name) != value:
                        raise ValueError(f"cannot resume from {path}: model.{field_name} was "
                                         f"{saved['model'].get(field_name)} and is now {value}; use a new run_name")
            elif saved.get(key) != now[key]:
                raise ValueError(f"cannot resume from {path}: {key} was {saved.get(key)} and is now {now[key]}; "
                                 f"use a new run_name")

    def save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
                 "scheduler": self.scheduler.state_dict(), "loader": self.data.train.state_dict(),
                 "rng": torch.get_rng_state().tolist(), "wandb_id": self.wandb_id, "fingerprint": self.fingerprint(),
                 "world_size": self.env.world_size}
        path = self.checkpointer.save(self.step, self.model, self.optimizer, state)
        blocked = time.perf_counter() - t0
        how = "staged; writing in the background" if self.cfg.checkpoint.async_save else "saved"
        log.info("checkpoint %s %s; training blocked %.2f s", path, how, blocked)
        self.sinks.write({"step": self.step, "checkpoint_blocked_s": blocked})

    # -- one optimizer step -----------------------------------------------------------------
    def train_step(self, batch: dict) -> tuple[float, torch.Tensor, bool, str | None]:
        """Forward/backward over the accumulation micro-batches, clip, and step. Returns the global
        mean loss, the global gradient norm, whether any rank asked to stop, and the stability
        verdict (None, "skip" or "rollback"; the update is applied only for None)."""
        dev, mb = self.env.device, self.cfg.micro_batch_size
        rank_tokens = batch["labels"].numel()
        batch = self._inject_faults(batch)
        # Gradients are averaged over ranks by FSDP, so dividing each rank's token-summed loss by
        # its token count gives the global token mean: the update of one big batch.
        local = torch.zeros((), device=dev)
        for i in range(self.accum):
            rows = slice(i * mb, (i + 1) * mb)
            inp, lab = batch["input_ids"][rows].to(dev, non_blocking=True), batch["labels"][rows].to(dev, non_blocking=True)
            pos = batch["position_ids"][rows].to(dev) if "position_ids" in batch else None
            if self.autocast is None:
                self.model.set_requires_gradient_sync(i == self.accum - 1)  # reduce once, on the last
            loss = loss_sum(self.model, inp, lab, pos, self.autocast)
            if self.step + 1 in self._pending_faults.get("nan", set()):
                loss = loss * float("nan")
            (loss / rank_tokens).backward()
            local += loss.detach()
        self._pending_faults.get("nan", set()).discard(self.step + 1)
        grad_norm = clip_in_next_step(self.optimizer, self.model.parameters(), self.cfg.optim.grad_clip)
        # One all-reduce and one host sync per step carry every decision: the global loss, whether
        # the gradient is finite (the norm is global, so a NaN on any rank shows on every rank), and
        # whether any rank got a stop signal.
        flags = torch.stack([local.float(), (~torch.isfinite(grad_norm)).float(),
                             torch.tensor(float(self.stop.signum is not None), device=dev)])
        dist.all_reduce(flags)
        loss_total, non_finite, stop = flags.tolist()
        step_loss = loss_total / (rank_tokens * self.env.world_size)
        verdict = self.stability.verdict(step_loss, finite=not non_finite)
        if verdict is None:
            self.optimizer.step()
        else:
            self.skipped_steps += 1
            log.warning("step %d: loss %.4f, gradient norm %s: update skipped (%s; %d skipped so far)", self.step + 1,
                        step_loss, f"{grad_norm.item():.3g}", "non-finite" if non_finite else "loss spike",
                        self.skipped_steps)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return step_loss, grad_norm, stop > 0, verdict

    def _inject_faults(self, batch: dict) -> dict:
        """Deliberate faults from the config (tests and drills): random tokens for a spike."""
        if self.step + 1 in self._pending_faults.get("spike", set()):
            self._pending_faults["spike"].discard(self.step + 1)
            generator = torch.Generator().manual_seed(self.step)
            noise = torch.randint(0, self.model_cfg.vocab_size, batch["input_ids"].shape, generator=generator)
            batch = {**batch, "input_ids": noise, "labels": noise.roll(-1, dims=1)}
        return batch

    def rollback(self) -> None:
        """Restore the last checkpoint, then skip the data from it up to and including this step."""
        self.checkpointer.wait()
        path = self.checkpointer.latest()
        if path is None or not self.cfg.stability.rollback:
            log.warning("step %d: cannot roll back (%s); continuing without this step's update", self.step,
                        "no checkpoint yet" if path is None else "stability.rollback=false")
            return
        bad_end = self.data.train.samples_consumed
        state = ckpt.load(path, self.model, self.optimizer)
        bad_start = state["loader"]["samples_consumed"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.data.train.samples_consumed = bad_end  # the loader's other state is unchanged
        self.stability.reset()
        self.rollbacks += 1
        log.warning("rolled back to %s (step %d); skipped samples [%d, %d)", path.name, self.step, bad_start, bad_end)
        self.sinks.write({"step": self.step, "rollback_to_step": self.step, "skipped_samples_start": bad_start,
                          "skipped_samples_end": bad_end})

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, env = self.cfg, self.env
        tokens_per_step = cfg.global_batch_size * cfg.data.seq_len
        log.info("model %s: %.1fM parameters (%.1fM without embeddings), %.3g FLOPs/token; %d ranks, "
                 "global batch %d x %d tokens = %d micro-batches of %d x %d accumulation steps",
                 cfg.model.preset, num_params(self.model_cfg) / 1e6, num_params(self.model_cfg, True) / 1e6,
                 self.flops_per_token, env.world_size, cfg.global_batch_size, cfg.data.seq_len, env.world_size,
                 cfg.micro_batch_size, self.accum)
        progress = None
        if env.is_main:
            from tqdm import tqdm

            progress = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stdout, disable=None)
        window_losses, window_data_s, window_t0 = [], 0.0, time.perf_counter()
        last = {}
        while self.step < cfg.steps:
            t_data = time.perf_counter()
            batch = next(self.data.train)
            window_data_s += time.perf_counter() - t_data
            self.ledger.write(json.dumps({"step": self.step + 1, "samples": batch["sample_index"].tolist()}) + "\n")
            self.ledger.flush()
            step_loss, grad_norm, stop, verdict = self.train_step(batch)
            self.step += 1
            self.tokens_seen += tokens_per_step
            if verdict == "rollback":
                self.rollback()
                if progress is not None:
                    progress.n = self.step
                    progress.refresh()
                continue
            window_losses.append(step_loss)
            if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - window_t0
                tps = len(window_losses) * tokens_per_step / elapsed
                tps_device = tps / env.world_size
                last = {
                    "step": self.step,
                    "loss": sum(window_losses) / len(window_losses),
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm.item(),
                    "tokens_per_s": tps,
                    "tokens_per_s_per_device": tps_device,
                    "tflops_per_device": tps_device * self.flops_per_token / 1e12,
                    "peak_memory_gib": peak_memory_gib(env.device),
                    "data_wait_s": window_data_s,
                    "tokens_seen": self.tokens_seen,
                    "skipped_steps": self.skipped_steps,
                    "rollbacks": self.rollbacks,
                }
                if self.peak:
                    last["mfu"] = last["tflops_per_device"] / self.peak
                self.sinks.write(last)
                if progress is not None and not progress.disable:
                    progress.set_postfix_str(self._postfix(last), refresh=False)
                else:  # no live bar (not a terminal: SLURM, CI, other ranks): a log line instead
                    log.info("step %d: %s", self.step, self._postfix(last))
                window_losses, window_data_s, window_t0 = [], 0.0, time.perf_counter()
            if progress is not None:
                progress.update(1)
            if cfg.val_interval and cfg.val_batches and self.step % cfg.val_interval == 0 and self.step < cfg.steps:
                self.validate()
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 and self.step < cfg.steps:
                self.save_checkpoint()
            if stop and self.step < cfg.steps:
                log.warning("stop requested (signal %s): checkpointing at step %d and exiting with status %d",
                            self.stop.signum or "on another rank", self.step, EXIT_STOPPED)
                self.save_checkpoint()
                self.checkpointer.wait()
                if progress is not None:
                    progress.close()
                return {"step": self.step, "stopped": True}
        if progress is not None:
            progress.close()
            if last and not progress.disable:
                log.info("step %d: %s", self.step, self._postfix(last))
        result = {"step": self.step, "val_loss": self.validate() if cfg.val_batches else None}
        if cfg.checkpoint.save_final:
            self.save_checkpoint()
        self.checkpointer.wait()
        return result

    def validate(self) -> float:
        val_loss = evaluate(self.model, self.data, self.cfg, self.env)
        log.info("step %d: validation loss %.4f, perplexity %.2f", self.step, val_loss, math.exp(min(val_loss, 50)))
        self.sinks.write({"step": self.step, "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50))})
        return val_loss

    def _postfix(self, m: dict) -> str:
        text = (f"loss {m['loss']:.4f} lr {m['lr']:.2e} gnorm {m['grad_norm']:.2f} "
                f"{m['tokens_per_s']:,.0f} tok/s ({m['tokens_per_s_per_device']:,.0f}/dev) "
                f"{m['tflops_per_device']:.1f} TFLOP/s")
        if "mfu" in m:
            text += f" MFU {100 * m['mfu']:.1f}%"
        return text + f" mem {m['peak_memory_gib']:.1f} GiB data {m['data_wait_s']:.2f}s"

    def sample(self, prompt: str, max_new_tokens: int) -> str:
        """A continuation of `prompt` (every rank runs it: the sharded model needs all of them)."""
        tok = self.data.tokenizer
        ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)], device=self.env.device)
        torch.manual_seed(self.cfg.seed)  # the same draws on every rank
        out = generate(self.model, ids, max_new_tokens, temperature=0.8, top_k=50)
        return tok.decode(out[0, 1:].tolist())

    def close(self) -> None:
        self.sinks.close()
        self.ledger.close()


def run(cfg: TrainConfig, run_dir: Path) -> dict:
    """Entry point of one process of a training job."""
    trainer = None
    try:
        try:
            env = init_distributed(cfg.parallel.dp_replicate, cfg.collective_timeout_s)
            setup_logging(run_dir, env.rank)
            torch.manual_seed(cfg.seed)
            trainer = Trainer(cfg, run_dir, env)
            return _train(trainer, cfg, run_dir)
        except RuntimeError as e:  # a hung or dead peer, or too little memory: one line, not a traceback
            where = f"at step {trainer.step + 1}" if trainer else "during start-up"
            if isinstance(e, torch.OutOfMemoryError):
                raise MemoryError(
                    f"out of device memory {where} (micro_batch_size={cfg.micro_batch_size}, data.seq_len="
                    f"{cfg.data.seq_len}, parallel.activation_checkpointing={cfg.parallel.activation_checkpointing}): "
                    "lower micro_batch_size (global_batch_size stays, through accumulation) or set "
                    "parallel.activation_checkpointing=selective or full; `python launch/plan.py` shows the budget"
                ) from None
            timeout = collective_timeout(e, where, int(os.environ.get("RANK", "0")), cfg.collective_timeout_s)
            if timeout is None:
                raise
            raise timeout from None
        finally:
            if trainer:
                trainer.close()
    finally:
        destroy_distributed()


def _train(trainer: Trainer, cfg: TrainConfig, run_dir: Path) -> dict:
    if trainer.env.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))  # as resolved (demo data paths)
    result = trainer.fit()
    if result.get("stopped"):
        return result
    if trainer.data.unigram_baseline is not None and result["val_loss"] is not None:
        result["unigram_baseline"] = trainer.data.unigram_baseline
        log.info("validation loss %.3f nats/token vs unigram baseline %.3f of the same tokens",
                 result["val_loss"], result["unigram_baseline"])
    if cfg.sample_prompt:
        text = trainer.sample(cfg.sample_prompt, cfg.sample_tokens)
        log.info("sample: %r", text)
        result["sample"] = text
    return result
