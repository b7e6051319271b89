"""The training loop: data -> parallel Llama -> loss -> AdamW, with logging, validation and checkpoints.

`fit` is the loop. The step runs through a StepRunner (train/loop/step.py: the plain step or the pipeline
schedule); Cadence says what is due at a step, Validator and Rollback do it, TrainState is everything a
checkpoint holds. The side concerns are hooks (train/loop/hooks.py), called in order around each step:
Throughput (figures per logging window), SampleLedger, StepProfiler, MetricSinks, Progress (bar or log line),
DownstreamTasks (eval.tasks, train/loop/downstream.py), then those the config's `hooks` name.
"""

import logging
import time
from dataclasses import asdict, fields
from pathlib import Path

from omegaconf import OmegaConf

from model import PRESETS, ModelConfig, flops_per_token, num_params

from ..config import BatchShape, TrainConfig
from ..interop.hf_import import check_init_before_build, init_from
from ..observe.metrics import MetricSinks, peak_tflops
from ..observe.profiler import StepProfiler
from ..optim import build_optimizer, build_scheduler
from ..parallel.build import resolve_model_config
from ..parallel.distributed import Dist, layout, on_every_rank
from ..parallel.memory_gate import check_memory
from ..state.checkpoint import TrainState, resume
from ..state.checkpoint_io import Checkpointer
from ..state.ledger import SampleLedger
from ..state.rollback import Rollback
from ..state.stability import StabilityMonitor, Verdict
from .cadence import Cadence
from .data import open_data
from .downstream import DownstreamTasks
from .hooks import HookList, load_hooks
from .mixing import adaptive_mixing
from .progress import Progress
from .sampling import sample
from .signals import EXIT_STOPPED, StopRequest
from .step import StepResult, StepRunner, build_runner, labelled_tokens, reduce_step
from .throughput import Throughput
from .validation import Validator

log = logging.getLogger("train")

# How the start-up header names a shape field that differs from the preset's (others: "<field> <value>").
_SHAPE_WORDS = {"n_layers": "{} layers", "n_heads": "{} heads", "n_kv_heads": "{} kv heads"}


def downstream_tasks(train_cfg: TrainConfig, tokenizer, env: Dist) -> DownstreamTasks | None:
    """The hook that runs eval.tasks (loaded here, at start-up), or None without tasks; a chat run asks them
    through its chat template; micro_batch_size continuations are scored per forward, as many as a step's."""
    if not train_cfg.eval.tasks:
        return None
    from data_pipeline.chat import ChatEncoder

    chat = ChatEncoder(tokenizer, train_cfg.data.template) if train_cfg.data.format == "chat" else None
    return DownstreamTasks(train_cfg.eval, tokenizer, chat, env.is_main, train_cfg.micro_batch_size)


def model_name(preset_name: str, model_cfg: ModelConfig) -> str:
    """What runs, for the start-up header: the preset's name, or "8b-shaped (overridden: dim 64, 2 layers)" when
    the resolved shape differs from the preset's (the vocabulary is not counted: it is usually the tokenizer's)."""
    base = PRESETS[preset_name]
    changed = [(f.name, getattr(model_cfg, f.name)) for f in fields(ModelConfig)
               if f.name != "vocab_size" and getattr(model_cfg, f.name) != getattr(base, f.name)]
    if not changed:
        return preset_name
    words = [_SHAPE_WORDS.get(name, name + " {}").format(value) for name, value in changed]
    return f"{preset_name}-shaped (overridden: {', '.join(words)})"


class Trainer:
    def __init__(self, train_cfg: TrainConfig, run_dir: Path, env: Dist):
        self.train_cfg, self.run_dir, self.env = train_cfg, run_dir, env
        configured = load_hooks(train_cfg.hooks)  # first: a hook that cannot be imported fails in a second
        self.data = on_every_rank(lambda: open_data(train_cfg.data, env, train_cfg.global_batch_size, train_cfg.seed),
                                  "open its data")  # e.g. a node without the shards
        self.downstream = on_every_rank(lambda: downstream_tasks(train_cfg, self.data.tokenizer, env),
                                        "load eval.tasks")  # a task that does not load fails before the model is built
        if train_cfg.epochs:  # before anything sized by steps (schedule, cadence, progress) is built
            train_cfg.steps = self.data.steps_for(train_cfg.epochs, train_cfg.global_batch_size)
        # Checks that each validation set fills a batch.
        self.validator = Validator(self.data, env, train_cfg.micro_batch_size, train_cfg.val_batches)
        # data.mixing=adaptive: the weights follow the validation losses (a hook; its state is checkpointed)
        self.mixing = adaptive_mixing(train_cfg.data, self.data.train, self.validator.enabled and
                                      train_cfg.val_interval > 0, env.is_main)
        self.model_cfg = resolve_model_config(train_cfg.model, self.data.tokenizer.vocab_size, train_cfg.data.seq_len,
                                              train_cfg.parallel.tp)
        # init_from's shape before the memory gate: a shape left to the preset is named, not found too large.
        check_init_before_build(train_cfg.checkpoint, run_dir / "checkpoints", self.model_cfg, self.data.tokenizer)
        self.runner = self._build_runner()
        self.model = self.runner.model
        self._restore_state()
        self.cadence = Cadence(train_cfg.steps, train_cfg.log_interval,
                               train_cfg.val_interval if train_cfg.val_batches else 0, train_cfg.checkpoint.interval)
        self.hooks = HookList(self.side_concerns(), configured)
        self.stop = StopRequest()  # last: until the loop starts, SIGTERM ends a rank at once (signals.release_term)

    def _build_runner(self) -> StepRunner:
        """The rank's model, once its memory estimate fits the device (train/parallel/memory_gate.py), and what
        runs it (train/loop/step.py). The components get the config's sections and a BatchShape."""
        train_cfg, data_cfg = self.train_cfg, self.train_cfg.data
        batch_shape = BatchShape(train_cfg.micro_batch_size, train_cfg.global_batch_size, data_cfg.seq_len)
        check_memory(self.model_cfg, train_cfg.parallel, batch_shape, self.env, data_cfg.document_masking,
                     train_cfg.memory_check)
        return build_runner(self.model_cfg, train_cfg.parallel, batch_shape, self.env, seed=train_cfg.seed,
                            document_masking=data_cfg.document_masking,
                            evaluates=train_cfg.val_batches > 0 or bool(train_cfg.sample_prompt or
                                                                        train_cfg.eval.tasks))

    def side_concerns(self) -> list:
        """The built-in hooks, in the order they are called (train/loop/hooks.py)."""
        train_cfg, env = self.train_cfg, self.env
        sinks = MetricSinks(self.run_dir, env.is_main, train_cfg.wandb, train_cfg.tensorboard,
                            OmegaConf.to_container(OmegaConf.structured(train_cfg)), self.state.wandb_id)
        self.state.wandb_id = sinks.wandb_id
        throughput = Throughput(train_cfg.global_batch_size * train_cfg.data.seq_len, env.world_size,
                                flops_per_token(self.model_cfg, train_cfg.data.seq_len),
                                peak_tflops(env.device, train_cfg.peak_tflops), env.device)
        loader = self.data.train
        ledger = SampleLedger(self.run_dir, env, self.state.counters.step,
                              (lambda: loader.mixture) if len(loader.sources) > 1 else None)
        return [throughput, ledger,
                StepProfiler(train_cfg.profile_step, self.run_dir, env.rank, env.device), sinks,
                Progress(train_cfg.steps, env.is_main)] + ([self.downstream] if self.downstream else []) \
            + ([self.mixing] if self.mixing else [])

    def _restore_state(self) -> None:
        """Optimizer, schedule and the rest of the train state: fresh, or from the checkpoint to resume."""
        train_cfg, ckpt_cfg = self.train_cfg, self.train_cfg.checkpoint
        optimizer = build_optimizer(self.model, train_cfg.optim)
        scheduler = build_scheduler(optimizer, train_cfg.steps, train_cfg.optim)
        self.state = TrainState(self.model, optimizer, scheduler, self.data.train,
                                StabilityMonitor(train_cfg.stability), self.fingerprint(), train_cfg.optim,
                                self.mixing)
        self.store = Checkpointer(self.run_dir / "checkpoints", ckpt_cfg.keep_last, ckpt_cfg.keep_every,
                                  self.env.is_main, ckpt_cfg.async_save)
        self.rollback = Rollback(self.state, self.store, train_cfg.stability, self.env.is_main)
        resumed = resume(self.state, self.store, ckpt_cfg, train_cfg.data.allow_change,
                         lambda source: init_from(source, self.model, self.data.tokenizer))
        step = self.state.counters.step
        if step > train_cfg.steps:  # it would train nothing, and its schedule has ended
            raise ValueError(f"steps={train_cfg.steps}: {resumed} is at step {step}, the run is already past steps; "
                             f"raise steps to train on, or resume an earlier checkpoint with checkpoint.resume=STEP")
        if resumed and step == train_cfg.steps:  # e.g. the demo run again: say how to train on or start over
            log.info("the run is already at steps=%d: nothing to train; raise steps to train on, or start a new "
                     "run: a new run_name=NAME, or checkpoint.resume=none checkpoint.overwrite=true to start this one "
                     "over (its records moved aside)", step)
        self.rollback.reapply(resumed)

    def fingerprint(self) -> dict:
        """What must not change across a resume (checked key by key, see checkpoint.check_fingerprint)."""
        loader = self.data.train
        return {"model": asdict(self.model_cfg),
                "tokenizer_sha256": self.data.tokenizer.sha256, "data.seq_len": self.train_cfg.data.seq_len,
                "data.shards": [s.identity for s in loader.sources], "data.weights": loader.mixture.weights.tolist(),
                "seed": self.train_cfg.seed}

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to train_cfg.steps, or until a stop request; then the final checkpoint and validation."""
        self._log_start()
        self.hooks.on_start(self)
        while self.state.counters.step < self.train_cfg.steps:
            step = self.state.counters.step + 1
            result = self.train_step(step)
            self.hooks.after_step(step, result)  # first: a drill's crash lands before a written save is made visible
            self.store.finish_if_written()
            if result.verdict is Verdict.ROLLBACK and self._roll_back():
                continue
            if self.cadence.log_due(step):
                self.hooks.write({**self.hooks.report(step), **self._figures(result)})
            if result.stop and step < self.train_cfg.steps:
                return self._stop()
            if self.cadence.checkpoint_due(step):
                self.save_checkpoint()
            if self.cadence.validation_due(step):
                self.validate()
        return self._finish()

    def train_step(self, step: int) -> StepResult:
        """The next batch, forward/backward over its micro-batches and, unless the stability verdict
        says otherwise, the update. The step counter moves on whatever the verdict."""
        state, t0 = self.state, time.perf_counter()
        batch = next(self.data.train)
        data_wait_s = time.perf_counter() - t0
        batch = self.hooks.before_step(step, batch)
        local_loss = self.runner.forward_backward(batch, self.hooks.loss_fn(step))
        result = reduce_step(self.model, state.optimizer, local_loss, labelled_tokens(batch), self.stop.requested,
                             self.train_cfg.optim.grad_clip, self.env, self.runner.holds_loss)
        result.data_wait_s = data_wait_s
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
        state.counters.tokens_seen += self.train_cfg.global_batch_size * self.train_cfg.data.seq_len
        return result

    def _roll_back(self) -> bool:
        skip = self.rollback()
        if skip is None:
            return False
        self.hooks.on_rollback(skip.to_step)  # e.g. the ledger: the undone steps' samples are skipped, not consumed
        self.hooks.write({"step": skip.to_step, "rollback_to_step": skip.to_step, "skipped_samples_start": skip.start,
                          "skipped_samples_end": skip.end})
        return True

    def _figures(self, result: StepResult) -> dict:
        """The trainer's own figures in a logging window's record (the hooks' report adds the rest)."""
        counters = self.state.counters
        return {"lr": self.state.scheduler.get_last_lr()[0], "grad_norm": result.grad_norm.item(),
                "tokens_seen": counters.tokens_seen, "skipped_steps": counters.skipped_steps,
                "rollbacks": counters.rollbacks}

    def _stop(self) -> dict:
        """After a stop request (every rank agreed in the step's all-reduce): one checkpoint, then out."""
        step = self.state.counters.step
        log.warning("stop requested (%s): checkpointing at step %d and exiting with status %d", self.stop.why(), step,
                    EXIT_STOPPED)
        self.save_checkpoint()
        self.store.wait()
        return {"step": step, "stopped": True}

    def _finish(self) -> dict:
        """The final checkpoint first, in place before validation (which waits for it), so that nothing
        after it can lose it; then validation."""
        if self.train_cfg.checkpoint.save_final:
            self.save_checkpoint()
        return {"step": self.state.counters.step, "val_loss": self.validate()}

    def _log_start(self) -> None:
        train_cfg, env = self.train_cfg, self.env
        name = model_name(train_cfg.model.preset, self.model_cfg)
        log.info("model %s: %.1fM parameters (%.1fM without embeddings), %.3g FLOPs/token; %d ranks (%s), global "
                 "batch %d x %d tokens = %d data-parallel ranks x micro-batches of %d x %d accumulation steps",
                 name, num_params(self.model_cfg) / 1e6, num_params(self.model_cfg, True) / 1e6,
                 flops_per_token(self.model_cfg, train_cfg.data.seq_len), env.world_size, layout(env),
                 train_cfg.global_batch_size, train_cfg.data.seq_len, env.dp_size, train_cfg.micro_batch_size,
                 train_cfg.global_batch_size // (train_cfg.micro_batch_size * env.dp_size))
        if train_cfg.optim.warmup_steps > train_cfg.steps:
            log.warning("optim.warmup_steps=%d is longer than the run (steps=%d): the peak optim.lr=%g is never "
                        "reached", train_cfg.optim.warmup_steps, train_cfg.steps, train_cfg.optim.lr)

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
        how = "staged; writing in the background" if self.train_cfg.checkpoint.async_save else "saved"
        log.info("checkpoint %s %s; training blocked %.2f s", path, how, blocked)
        self.hooks.write({"step": self.state.counters.step, "checkpoint_blocked_s": blocked})

    def validate(self) -> float | None:
        """Every validation set's loss, perplexity and bits per byte; returns the first set's loss, which is
        also logged as val_loss (the headline figure). A background save is put in place first: a failure
        in validation must not lose it."""
        self.store.wait()
        t0 = time.perf_counter()
        results, step = self.validator.results(self.runner), self.state.counters.step
        if not results:
            return None
        record = {"step": step, "val_s": time.perf_counter() - t0}
        for name, r in results.items():
            log.info("step %d: validation loss %.4f, perplexity %.2f, %.4f bits/byte (%s)", step, r.loss,
                     r.perplexity, r.bpb, name)
            record |= {f"val/{name}/loss": r.loss, f"val/{name}/perplexity": r.perplexity, f"val/{name}/bpb": r.bpb}
        record |= self.hooks.after_validation(step, {name: r.loss for name, r in results.items()})
        first = next(iter(results.values()))
        self.hooks.write({**record, "val_loss": first.loss, "val_perplexity": first.perplexity})
        return first.loss

    def sample(self, prompt: str, max_new_tokens: int) -> str:
        """A continuation of `prompt` (train/loop/sampling.py; every rank runs it)."""
        return sample(self.runner, self.data.tokenizer, prompt, max_new_tokens, self.train_cfg.data.seq_len,
                      self.train_cfg.seed, self.env.device)

    def close(self) -> None:
        """The hooks' files, bar and W&B run closed (also after a failure; once)."""
        self.hooks.close()

