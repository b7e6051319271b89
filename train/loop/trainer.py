"""The training loop: data -> parallel Llama -> loss -> AdamW, with logging, validation and checkpoints.

`fit` is the loop; what happens around a step lives in small objects: Throughput (figures per
logging window), Progress (bar or log line), SampleLedger, Cadence (what is due at a step),
FaultDrills (deliberate faults), Validator, Rollback, StepProfiler, and TrainState (everything a checkpoint holds).
"""

import logging
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from model import flops_per_token, num_params
from model.generate import generate

from ..config import TrainConfig
from ..interop.hf_import import init_from
from ..observe.metrics import MetricSinks, peak_tflops
from ..observe.profiler import StepProfiler
from ..optim import build_optimizer, build_scheduler
from ..parallel.build import build_parallel_model, resolve_model_config
from ..parallel.distributed import Dist, layout, on_every_rank
from ..parallel.memory_gate import check_memory
from ..parallel.parallelize import single_device_autocast
from ..state.checkpoint import TrainState, resume
from ..state.checkpoint_io import Checkpointer
from ..state.ledger import SampleLedger
from ..state.rollback import Rollback
from ..state.stability import StabilityMonitor, Verdict
from .cadence import Cadence
from .data import open_data
from .faults import FaultDrills
from .progress import Progress
from .sampling import next_logits_fn
from .signals import EXIT_STOPPED, StopRequest
from .step import StepResult, forward_backward, labelled_tokens, reduce_step
from .throughput import Throughput
from .validation import Validator

log = logging.getLogger("train")


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, env: Dist):
        self.cfg, self.run_dir, self.env = cfg, run_dir, env
        self.data = on_every_rank(lambda: open_data(cfg, env), "open its data")  # e.g. a node without the shards
        self.autocast = single_device_autocast(cfg.parallel, env)
        self.validator = Validator(cfg, self.data, env, self.autocast)  # checks the val split fills a batch
        self.model_cfg = resolve_model_config(cfg, self.data.tokenizer.vocab_size)
        check_memory(self.model_cfg, cfg, env)
        self.model, self.pipeline = build_parallel_model(self.model_cfg, cfg, env)
        self._restore_state()
        self.sinks = MetricSinks(run_dir, env.is_main, cfg.wandb, OmegaConf.to_container(OmegaConf.structured(cfg)),
                                 self.state.wandb_id)
        self.state.wandb_id = self.sinks.wandb_id
        self.ledger = SampleLedger(run_dir, env, start_step=self.state.counters.step)
        self.faults = FaultDrills(cfg.faults, self.model_cfg.vocab_size)
        self.cadence = Cadence(cfg)
        flops = flops_per_token(self.model_cfg, cfg.data.seq_len)
        self.throughput = Throughput(cfg.global_batch_size * cfg.data.seq_len, env.world_size, flops,
                                     peak_tflops(env.device, cfg.peak_tflops), env.device)
        self.stop = StopRequest()
        self.profiler = StepProfiler(cfg.profile_step, run_dir, env.rank, env.device)

    def _restore_state(self) -> None:
        """Optimizer, schedule and the rest of the train state: fresh, or from the checkpoint to resume."""
        cfg = self.cfg
        optimizer = build_optimizer(self.model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.steps, cfg.optim)
        self.state = TrainState(self.model, optimizer, scheduler, self.data.train, StabilityMonitor(cfg.stability),
                                self.fingerprint(), cfg.optim)
        self.store = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.keep_every,
                                  self.env.is_main, cfg.checkpoint.async_save)
        self.rollback = Rollback(self.state, self.store, cfg.stability, self.env.is_main)
        resumed = resume(self.state, self.store, cfg.checkpoint, cfg.data.allow_change,
                         lambda source: init_from(source, self.model, self.data.tokenizer))
        step = self.state.counters.step
        if step > cfg.steps:  # it would train nothing, and its schedule has ended
            raise ValueError(f"steps={cfg.steps}: {resumed} is at step {step}, the run is already past steps; raise "
                             f"steps to train on, or resume an earlier checkpoint with checkpoint.resume=STEP")
        if resumed and step == cfg.steps:
            log.info("the run is already at steps=%d: nothing to train (raise steps to train on)", step)
        self.rollback.reapply(resumed)

    def fingerprint(self) -> dict:
        """What must not change across a resume (checked key by key, see checkpoint.check_fingerprint)."""
        loader = self.data.train
        return {"model": asdict(self.model_cfg),
                "tokenizer_sha256": self.data.tokenizer.sha256, "data.seq_len": self.cfg.data.seq_len,
                "data.shards": [s.identity for s in loader.sources], "data.weights": loader.mixture.weights.tolist(),
                "seed": self.cfg.seed}

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        self._log_start()
        progress = Progress(self.cfg.steps, self.state.counters.step, self.env.is_main)
        try:
            while self.state.counters.step < self.cfg.steps:
                with self.profiler.around(self.state.counters.step + 1):
                    result = self.train_step(self._next_batch())
                self.faults.step_done(before_crash=self.store.wait_written)  # a crash between two saves
                self.store.finish_if_written()
                if result.verdict is Verdict.ROLLBACK and self._roll_back(progress):
                    continue
                step = self.state.counters.step
                self.throughput.add(result.loss)
                if self.cadence.log_due(step):
                    progress.report(self._report(result))
                progress.at(step)
                if result.stop and step < self.cfg.steps:
                    return self._stop()
                if self.cadence.checkpoint_due(step):
                    self.save_checkpoint()
                if self.cadence.validation_due(step):
                    self.validate()
        finally:
            progress.close()
        return self._finish()

    def train_step(self, batch: dict) -> StepResult:
        """Forward/backward over the accumulation micro-batches and, unless the stability verdict
        says otherwise, the update. The step counter moves on whatever the verdict."""
        state, step = self.state, self.state.counters.step + 1
        batch = self.faults.batch(step, batch)
        if self.pipeline:
            local_loss = self.pipeline.forward_backward(batch, poison_loss=self.faults.poison_loss(step))
        else:
            local_loss = forward_backward(self.model, batch, self.cfg.micro_batch_size, self.env.device,
                                          self.autocast, poison_loss=self.faults.poison_loss(step))
        stop = self.stop.signum is not None or self.faults.stop_requested(step)
        result = reduce_step(self.model, state.optimizer, local_loss, labelled_tokens(batch), stop,
                             self.cfg.optim.grad_clip, self.env, last_stage=not self.pipeline or self.pipeline.last)
        result.verdict = state.stability.verdict(result.loss, finite=not result.non_finite)
        if result.verdict is Verdict.OK:
            state.optimizer.step()
        else:
            state.counters.skipped_steps += 1
            log.warning("step %d: loss %.4f, gradient norm %.3g: update skipped (%s; %d skipped so far)", step,
                        result.loss, result.grad_norm.item(), "non-finite" if result.non_finite else "loss spike",
                        state.counters.skipped_steps)
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()
        state.counters.step = step
        state.counters.tokens_seen += self.cfg.global_batch_size * self.cfg.data.seq_len
        return result

    def _roll_back(self, progress: Progress) -> bool:
        skip = self.rollback()
        if skip is None:
            return False
        self.ledger.forget_after(skip.to_step)  # the undone steps' samples are skipped, not consumed
        self.sinks.write({"step": skip.to_step, "rollback_to_step": skip.to_step, "skipped_samples_start": skip.start,
                          "skipped_samples_end": skip.end})
        progress.at(skip.to_step)
        return True

    def _next_batch(self) -> dict:
        t0 = time.perf_counter()
        batch = next(self.data.train)
        self.throughput.waited_for_data(time.perf_counter() - t0)
        self.ledger.record(self.state.counters.step + 1, batch["sample_index"])
        return batch

    def _report(self, result: StepResult) -> dict:
        counters = self.state.counters
        figures = {**self.throughput.report(counters.step), "lr": self.state.scheduler.get_last_lr()[0],
                   "grad_norm": result.grad_norm.item(), "tokens_seen": counters.tokens_seen,
                   "skipped_steps": counters.skipped_steps, "rollbacks": counters.rollbacks}
        self.sinks.write(figures)
        return figures

    def _stop(self) -> dict:
        """After a stop request (every rank agreed in the step's all-reduce): one checkpoint, then out."""
        step = self.state.counters.step
        signum = self.stop.signum
        why = signal.Signals(signum).name if signum else "faults.stop_at_step" if self.faults.stop_requested(step) \
            else "on another rank"
        log.warning("stop requested (%s): checkpointing at step %d and exiting with status %d", why, step, EXIT_STOPPED)
        self.save_checkpoint()
        self.store.wait()
        return {"step": step, "stopped": True}

    def _finish(self) -> dict:
        """The final checkpoint first, in place before validation (which waits for it), so that nothing
        after it can lose it; then validation."""
        if self.cfg.checkpoint.save_final:
            self.save_checkpoint()
        return {"step": self.state.counters.step, "val_loss": self.validate()}

    def _log_start(self) -> None:
        cfg, env = self.cfg, self.env
        log.info("model %s: %.1fM parameters (%.1fM without embeddings), %.3g FLOPs/token; %d ranks (%s), global "
                 "batch %d x %d tokens = %d data-parallel ranks x micro-batches of %d x %d accumulation steps",
                 cfg.model.preset, num_params(self.model_cfg) / 1e6, num_params(self.model_cfg, True) / 1e6,
                 self.throughput.flops_per_token, env.world_size, layout(env), cfg.global_batch_size,
                 cfg.data.seq_len, env.dp_size, cfg.micro_batch_size,
                 cfg.global_batch_size // (cfg.micro_batch_size * env.dp_size))
        if cfg.optim.warmup_steps > cfg.steps:
            log.warning("optim.warmup_steps=%d is longer than the run (steps=%d): the peak optim.lr=%g is never "
                        "reached", cfg.optim.warmup_steps, cfg.steps, cfg.optim.lr)

    # -- around the loop ------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """A checkpoint of the current state, unless it is saved already or unfit (rollbacks return to it)."""
        step = self.state.counters.step
        if step == self.store.last_saved_step:  # e.g. a run resumed at its last step: nothing new to save
            return
        unfit = self.state.unfit_to_save(self.env.device)
        if unfit:
            latest = self.store.latest()
            log.warning("step %d: no checkpoint written: %s (the latest stays %s)", step, unfit,
                        latest.name if latest else "none")
            return
        t0 = time.perf_counter()
        path = self.state.save(self.store)
        blocked = time.perf_counter() - t0
        how = "staged; writing in the background" if self.cfg.checkpoint.async_save else "saved"
        log.info("checkpoint %s %s; training blocked %.2f s", path, how, blocked)
        self.sinks.write({"step": self.state.counters.step, "checkpoint_blocked_s": blocked})

    def validate(self) -> float | None:
        """Every validation set's loss, perplexity and bits per byte; returns the first set's loss, which is
        also logged as val_loss (the headline figure). A background save is put in place first: a failure
        in validation must not lose it."""
        self.store.wait()
        results, step = self.validator.results(self.model, self.pipeline), self.state.counters.step
        if not results:
            return None
        record = {"step": step}
        for name, r in results.items():
            log.info("step %d: validation loss %.4f, perplexity %.2f, %.4f bits/byte (%s)", step, r.loss,
                     r.perplexity, r.bpb, name)
            record |= {f"val/{name}/loss": r.loss, f"val/{name}/perplexity": r.perplexity, f"val/{name}/bpb": r.bpb}
        first = next(iter(results.values()))
        self.sinks.write({**record, "val_loss": first.loss, "val_perplexity": first.perplexity})
        return first.loss

    def sample(self, prompt: str, max_new_tokens: int) -> str:
        """A continuation of `prompt` (every rank runs it: the sharded, split or pipelined model needs all
        of them), within a window of data.seq_len tokens."""
        tok, seq_len = self.data.tokenizer, self.cfg.data.seq_len
        ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)], device=self.env.device)
        torch.manual_seed(self.cfg.seed)  # the same draws on every rank
        out = generate(self.model, ids, max_new_tokens, temperature=0.8, top_k=50, max_len=seq_len,
                       next_logits=next_logits_fn(self.model, self.pipeline, self.env, seq_len))
        return tok.decode(out[0, 1:].tolist())

    def close(self) -> None:
        self.sinks.close()
        self.ledger.close()

