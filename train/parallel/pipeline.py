"""Pipeline parallelism (parallel.pp > 1): the Llama split by layers into stages that run through one of
torch.distributed.pipelining's schedules; the pipeline's micro-batches replace gradient accumulation.

- Stages: pp x v of them, v = parallel.pp_virtual_stages per rank. Stage s holds a contiguous range of
  blocks, the first stage also the embedding, the last the final norm, the head and the fused loss.
  The split (torchtitan's, and the planner's): n_layers // stages blocks each, and the remainder one each
  to the stages from the second on (the first also holds the embedding, the last the head and the
  loss, and the last takes what is left); parallel.pp_layers_per_stage overrides it.
- Rank r of the pipeline holds stages r, r + pp, r + 2pp, ... (1F1B, GPipe and the looped schedules), or
  r and 2pp - 1 - r (ZBVZeroBubble's V).
- Each stage is a Llama of its own made of the whole model's modules, so its parameters keep the whole
  model's names, and it gets float8, TP, AC, compile and FSDP exactly as a whole model does. The rank's
  model (`merge`), a Llama of all its stages' modules, is what the optimizer and the checkpoints see: a
  checkpoint saved at pp 2 loads at pp 1 or 4.
- The last stage returns each micro-batch's summed token loss (the labels reach every stage as a keyword
  argument); the schedule's loss function is that sum as it is, and the gradients are not scaled, so they
  accumulate loss sums exactly as gradient accumulation does (train/loop/step.py divides by the tokens).
- Under context parallelism (parallel.cp) a step's micro-batches are split over the cp group before the schedule
  runs (train/parallel/context_parallel.py): every stage gets its part of each micro-batch's sequence and positions,
  builds its mask from them, and all-gathers K/V with the same stage of the other cp ranks' pipelines.
- PipelineRun is the trainer's step runner under PP (train/loop/step.py StepRunner): a step, validation a step's
  worth of micro-batches at a time, and the sample's next token through the schedule.
"""

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from inspect import signature

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model import Llama, ModelConfig
from model.loss import IGNORE_INDEX

from ..config import BatchShape, ParallelSection
from ..planner.plan_pp import (
    LOOPED,
    ZERO_BUBBLE,
    Pipeline,
    microbatch_fixes,
    microbatch_problem,
    rank_stages,
    stage_problem,
)
from ..planner.plan_pp import stage_layers as even_split
from .context_parallel import ContextParallel, holder
from .distributed import Dist, whole

log = logging.getLogger("train")


def virtual_stages(schedule: str, configured: int) -> int:
    """Stages per rank: as configured, else 2 for the looped and V schedules and 1 for the others."""
    return configured or (2 if schedule in LOOPED or schedule == "ZBVZeroBubble" else 1)


def check_pipeline(parallel_cfg: ParallelSection, model_cfg: ModelConfig, batch_shape: BatchShape, dp_size: int,
                   evaluates: bool) -> None:
    """Start-up checks of a pipeline layout, each one line naming its key. `evaluates`: the run validates
    (val_batches > 0) or samples (sample_prompt) through the schedule."""
    pp, schedule = parallel_cfg.pp, parallel_cfg.pp_schedule
    if pp == 1:
        return
    v = virtual_stages(schedule, parallel_cfg.pp_virtual_stages)
    pipe = Pipeline(schedule, batch_shape.microbatches(dp_size), v)
    problem = stage_problem(pipe, pp, model_cfg.n_layers)
    if problem:  # the planner's words for the keys of launch/plan.py
        raise ValueError(f"parallel.{problem.replace('virtual_stages=', 'pp_virtual_stages=')}")
    problem = microbatch_problem(pipe, pp)
    if problem:
        raise ValueError(f"parallel.pp_schedule={schedule}: global_batch_size / (micro_batch_size x "
                         f"data-parallel ranks) = {batch_shape.global_batch_size} / ({batch_shape.micro_batch_size} x "
                         f"{dp_size}) = {problem}; {microbatch_advice(batch_shape, dp_size, pp)}")
    if model_cfg.tie_embeddings:
        raise ValueError("parallel.pp needs an untied head (model.tie_embeddings=false): the embedding sits on the "
                         "first stage and the head on the last")
    if schedule in ZERO_BUBBLE and parallel_cfg.compile:
        raise ValueError(f"parallel.pp_schedule={schedule} splits the backward, which torch.compile'd blocks "
                         f"do not allow: set parallel.compile=false or use 1F1B / Interleaved1F1B")
    if schedule == "ZBVZeroBubble" and evaluates:  # (lm-eval's tasks in the loop run through it too)
        # torch's eval of this schedule still runs the V's same-rank backward hand-offs, and fails on them.
        raise ValueError(f"parallel.pp_schedule=ZBVZeroBubble cannot run validation, the sample or eval.tasks in torch "
                         f"{torch.__version__.split('+')[0]}: use InterleavedZeroBubble, or set val_batches=0, "
                         f"sample_prompt='' and eval.tasks=[]")
    stage_layers(model_cfg.n_layers, pp * pipe.virtual_stages, parallel_cfg.pp_layers_per_stage)


def microbatch_advice(batch_shape: BatchShape, dp_size: int, pp: int) -> str:
    """The settings that give the pipeline a number of micro-batches every schedule takes (plan_pp.microbatch_fixes)."""
    smaller, per_rank = microbatch_fixes(batch_shape.global_batch_size // dp_size, batch_shape.micro_batch_size, pp)
    lower = f"micro_batch_size={smaller} or " if smaller else ""
    return f"set {lower}global_batch_size={per_rank * dp_size} (a multiple of pp={pp} micro-batches per step)"


def stage_layers(n_layers: int, n_stages: int, override: list[int] | None) -> list[range]:
    """The blocks of each stage: parallel.pp_layers_per_stage, or the planner's split (plan_pp.stage_layers)."""
    sizes = list(override) if override else even_split(n_layers, n_stages)
    if len(sizes) != n_stages or sum(sizes) != n_layers or min(sizes) < 1:
        raise ValueError(f"parallel.pp_layers_per_stage={sizes} must give {n_stages} stages (pp x virtual stages) "
                         f"at least 1 block each, {n_layers} (model.n_layers) in all")
    starts = [sum(sizes[:s]) for s in range(n_stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


def assemble(like: Llama, blocks: dict[str, nn.Module], embedding, norm, output) -> Llama:
    """A Llama made of given modules (no new parameters): a stage, or a rank's stages together."""
    with torch.device("meta"):
        part = Llama(dataclasses.replace(like.cfg, n_layers=1), like.document_masking)  # its block replaced below
    part.cfg, part.mask_kind, part.head_loss = like.cfg, like.mask_kind, like.head_loss
    part.layers = nn.ModuleDict(blocks)
    part.tok_embeddings, part.norm, part.output = embedding, norm, output
    part.rope_cos, part.rope_sin = like.rope_cos, like.rope_sin
    return part


def split(model: Llama, parallel_cfg: ParallelSection, env: Dist) -> tuple[list[Llama], list[int], int]:
    """This rank's stages of `model`, their indices, and the number of stages in all."""
    pp, schedule = parallel_cfg.pp, parallel_cfg.pp_schedule
    v = virtual_stages(schedule, parallel_cfg.pp_virtual_stages)
    layers = stage_layers(model.cfg.n_layers, pp * v, parallel_cfg.pp_layers_per_stage)
    ids = rank_stages(env.pp_rank, pp, Pipeline(schedule, virtual_stages=v))
    last = pp * v - 1
    stages = [assemble(model, {str(i): model.layers[str(i)] for i in layers[s]},
                       model.tok_embeddings if s == 0 else None, model.norm if s == last else None,
                       model.output if s == last else None) for s in ids]
    log.info("pipeline: %d stages of blocks %s; this rank holds stage %s", pp * v,
             ", ".join(f"{r.start}-{r.stop - 1}" for r in layers), ", ".join(map(str, ids)))
    return stages, ids, pp * v


def merge(stages: list[Llama]) -> Llama:
    """The rank's model: all its stages' (parallelized) modules under the whole model's names."""
    blocks = dict(sorted(((k, b) for s in stages for k, b in s.layers.items()), key=lambda kv: int(kv[0])))
    first = next((s.tok_embeddings for s in stages if s.tok_embeddings is not None), None)
    last = next((s for s in stages if s.norm is not None), None)
    return assemble(stages[0], blocks, first, last and last.norm, last and last.output)


class PipelineRun:
    """The schedule over this rank's stages: one training step's forward and backward, validation, and the
    logits of one position for the end-of-run sample (a StepRunner, train/loop/step.py)."""

    def __init__(self, model: Llama, stages: list[Llama], ids: list[int], n_stages: int, pp_schedule: str,
                 batch_shape: BatchShape, env: Dist):
        # Imported here, under PP only: it imports torch._dynamo, a second at every start-up otherwise.
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

        group = env.pp_mesh.get_group()
        self.model = model  # the rank's stages as one Llama (merge): what the optimizer and checkpoints see
        self.stages = [PipelineStage(m, i, n_stages, env.device, group=group) for m, i in zip(stages, ids)]
        self.first, self.last = 0 in ids, n_stages - 1 in ids
        self.holds_loss = self.last
        self.n_micro, self.device = batch_shape.microbatches(env.dp_size), env.device
        self.seq_len = batch_shape.seq_len
        self.on_loss: Callable[[torch.Tensor], torch.Tensor] | None = None  # a loop hook's, during a training step
        self.rows, self.vocab_size = self.n_micro * batch_shape.micro_batch_size, stages[0].cfg.vocab_size
        self.group = group
        # parallel.cp: the step's sequences split over the cp group, the seams set on every stage (in_flight)
        self.context_parallel = ContextParallel(stages, env) if env.cp > 1 else None
        self.capture: Callable | None = None  # what the last stage's logits go to, when sampling or scoring
        # The last stage's final norm, whose output the sample cuts to one position before the head (logits_at).
        self.head_norm = next((m.norm for m, i in zip(stages, ids) if i == n_stages - 1), None)
        pipe = Pipeline(pp_schedule, virtual_stages=len(stages))
        owner = next(r for r in range(env.pp) if n_stages - 1 in rank_stages(r, env.pp, pipe))  # 0 under ZBV's V
        self.last_rank = dist.get_global_rank(group, owner)
        schedule = get_schedule_class(pp_schedule)
        single = issubclass(schedule, PipelineScheduleSingle)
        self.schedule = schedule(self.stages[0] if single else self.stages, n_microbatches=self.n_micro,
                                 loss_fn=self._loss, scale_grads=False)
        # The outputs are the losses, which `losses` collects: not merged (scalars would not concatenate).
        self.no_outputs = {"return_outputs": False} if "return_outputs" in signature(schedule.step).parameters else {}

    def _loss(self, summed_loss: torch.Tensor, _target) -> torch.Tensor:
        if self.capture is not None:  # no labels: the last stage's output is the logits (B, P, V) of the rows and
            self.capture(whole(summed_loss).float())  # positions the norm's hook kept (1 and 1 for the sample)
            return torch.zeros((), device=self.device)
        return self.on_loss(summed_loss) if self.on_loss is not None else summed_loss  # (a test's drill poisons it)

    def _run(self, batch: dict, train: bool) -> torch.Tensor:
        """This rank's summed loss over the batch: the last stage's, zero on the others."""
        labels = batch["labels"].to(self.device)
        # Positions given to every stage: a later stage's input under TP is its sequence shard (B, T / tp, D),
        # from which it could not tell the rope positions (nor, under CP, its mask).
        positions = batch.get("position_ids", torch.arange(labels.shape[1]).expand(labels.shape)).to(self.device)
        losses: list[torch.Tensor] = []
        # The target only satisfies the schedule (the last stage's output is already the loss).
        run = self.schedule.step if train else self.schedule.eval
        with self.split(batch["input_ids"].to(self.device), labels, positions) as (inputs, labels, positions):
            run(*((inputs,) if self.first else ()), target=labels, losses=losses, **self.no_outputs, labels=labels,
                position_ids=positions)
        return torch.stack(losses).sum().float() if self.last else torch.zeros((), device=self.device)

    def forward_backward(self, batch: dict, on_loss: Callable | None = None) -> torch.Tensor:
        self.on_loss = on_loss  # for this step's micro-batches only: validation's losses stay as they are
        try:
            return self._run(batch, train=True)
        finally:
            self.on_loss = None

    @torch.no_grad()
    def loss_sum(self, batch: dict) -> torch.Tensor:
        return self._run(batch, train=False)

    def loss_sums(self, batches: Iterable[dict]) -> Iterator[tuple[dict, torch.Tensor]]:
        """Validation micro-batches through the schedule a step's worth at a time (pipeline_steps)."""
        for batch in pipeline_steps(batches, self.n_micro):
            yield batch, self.loss_sum(batch)

    def next_logits(self, window: torch.Tensor) -> torch.Tensor:
        """The logits (1, V) after window (1, T), on every rank: the window padded on the right to data.seq_len
        (the stages keep the shapes of their first step; causal attention keeps the last real position blind
        to the padding), every row of one step's micro-batches that window (logits_at)."""
        padded = F.pad(window, (0, self.seq_len - window.shape[1]))  # (1, seq_len); id 0 after the window
        return self.logits_at(padded, [window.shape[1] - 1])

    @torch.no_grad()
    def logits_at(self, ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """The logits (B, V) of token ids (B <= rows, T) each at its row's position, on every rank of the pipeline
        (B windows of lm-eval's greedy requests, or the sample's one). The rows of one step are the B windows and
        copies of the last; the last stage applies the head to one position of each row (RowEnds): the
        (rows, T, V) logits of a step would be gigabytes at a 128k vocabulary."""
        ids = ids.to(self.device)
        rows = torch.cat([ids, ids[-1:].expand(self.rows - len(ids), -1)])  # (rows, T): the shape the stages run
        rope = torch.arange(ids.shape[1], device=self.device).expand(rows.shape)  # each row's position ids
        ends = RowEnds([*positions, *positions[-1:] * (self.rows - len(ids))], ids.shape[1],
                       self.context_parallel, self.rows // self.n_micro)
        self.capture = ends.logits.append
        cut = self.head_norm.register_forward_hook(ends.cut) if self.last else None
        try:
            with self.split(rows, rows, rope) as (rows, _, rope):
                self.schedule.eval(*((rows,) if self.first else ()), target=rows, losses=[], **self.no_outputs,
                                   position_ids=rope)
        finally:
            self.capture = None
            if cut is not None:
                cut.remove()
        logits = ends.held(len(ids)) if self.last else torch.zeros(len(ids), self.vocab_size, device=self.device)
        dist.broadcast(logits, src=self.last_rank, group=self.group)
        if self.context_parallel is not None:  # each row's position is held by one cp rank: the others' are zeros
            dist.all_reduce(logits, group=self.context_parallel.group)
        return logits

    @torch.no_grad()
    def token_scores(self, asked: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each (window (T <= data.seq_len,), targets (n,)) of up to `rows`: the log-probabilities (n,) of the
        targets at the window's last n positions and whether each is the greedy choice, on every rank (lm-eval's
        requests, train/evaluation/harness.py Scorer). The windows are rows of one step run through the schedule,
        padded; the last stage's head reads only the span of positions they score (WindowScores), and its figures
        are broadcast to the pipeline (and summed over a cp group, whose ranks hold disjoint positions)."""
        rows = torch.zeros(self.rows, self.seq_len, dtype=torch.long, device=self.device)  # the shape the stages run
        for i, (window, _) in enumerate(asked):
            rows[i, :len(window)] = window
        positions = torch.arange(self.seq_len, device=self.device).expand(rows.shape)
        with self.split(rows, rows, positions) as (rows, _, positions):
            scores = WindowScores(asked, positions[0], self.rows // self.n_micro)
            self.capture = scores.fill
            cut = self.head_norm.register_forward_hook(scores.cut) if self.last else None
            try:
                self.schedule.eval(*((rows,) if self.first else ()), target=rows, losses=[], **self.no_outputs,
                                   position_ids=positions)
            finally:
                self.capture = None
                if cut is not None:
                    cut.remove()
        dist.broadcast(scores.scored, src=self.last_rank, group=self.group)
        if self.context_parallel is not None:
            dist.all_reduce(scores.scored, group=self.context_parallel.group)
        return [(part[0], part[1].bool()) for part in scores.parts]

    def split(self, inputs: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor):
        """This rank's part of a step's micro-batches (B, T) while the schedule runs: its cp rank's under CP."""
        if self.context_parallel is None:
            return nullcontext((inputs, labels, positions))
        return self.context_parallel.in_flight(inputs, labels, positions)


class RowEnds:
    """logits_at's bookkeeping on the last stage: each row's index `at` among the positions this rank holds (all of
    them without CP; under CP the cp rank that holds a row's position (holder) reads it, the others read their first
    and keep zeros), the norm's output cut to those a micro-batch at a time (cut), and the head's logits of each
    micro-batch (logits)."""

    def __init__(self, positions: list[int], seq_len: int, cp, micro_batch: int):
        held = [holder(p, seq_len, cp.cp) if cp else (0, p) for p in positions]
        self.mine = [cp is None or owner == cp.rank for owner, _ in held]
        self.at = [at if mine else 0 for (_, at), mine in zip(held, self.mine)]
        self.micro_batch = micro_batch
        self.logits: list[torch.Tensor] = []  # each micro-batch's (micro_batch, 1, V)

    def cut(self, _module, _args, h: torch.Tensor) -> torch.Tensor:
        """The final norm's output (B, T, D) -> (B, 1, D): each row's one position (slices: h may be a DTensor). The
        micro-batch is the one after those whose logits came (a stage's first run infers its shapes with a forward of
        its own, whose output goes to no loss)."""
        first = len(self.logits) * self.micro_batch
        return torch.cat([h[row:row + 1, at:at + 1] for row, at in enumerate(self.at[first:first + len(h)])])

    def held(self, n: int) -> torch.Tensor:
        """The logits (n, V) of the first n rows, zeros where another cp rank holds the position."""
        logits = torch.cat(self.logits)[:n, 0]  # (rows, 1, V) -> (n, V)
        mine = torch.tensor(self.mine[:n], device=logits.device)
        return logits.masked_fill(~mine[:, None], 0.0)


class WindowScores:
    """token_scores' bookkeeping on the last stage: the span of positions [lo, hi) that holds any window's scored
    positions among those this rank holds (`held`: all of them without CP), where the head is applied (cut), and
    each window's figures (fill) in `scored` (2, total n): its log-probabilities and greedy flags, seen window by
    window as `parts`."""

    def __init__(self, asked: list[tuple[torch.Tensor, torch.Tensor]], held: torch.Tensor, micro_batch: int):
        self.ends = [len(window) for window, _ in asked]
        self.targets = [targets.to(held.device) for _, targets in asked]
        self.starts = [end - len(t) for end, t in zip(self.ends, self.targets)]  # each window's first scored position
        kept = ((held >= min(self.starts)) & (held < max(self.ends))).nonzero()[:, 0]
        self.lo, self.hi = (int(kept.min()), int(kept.max()) + 1) if len(kept) else (0, 1)
        self.at = held[self.lo:self.hi]
        self.scored = torch.zeros(2, sum(len(t) for t in self.targets), device=held.device)
        self.parts = self.scored.split([len(t) for t in self.targets], dim=1)  # views of scored, window by window
        self.micro_batch, self.filled = micro_batch, 0

    def real_rows(self, micro_batch: int) -> int:
        return max(0, min(self.micro_batch, len(self.targets) - micro_batch * self.micro_batch))

    def cut(self, _module, _args, h: torch.Tensor) -> torch.Tensor:
        """The last stage's final norm output (B, T, D) -> (B, hi - lo, D), what the head then reads: at most a
        micro-batch's logits of a training step at once, each micro-batch's scored (fill) before the next."""
        return h[:, self.lo:self.hi]

    def fill(self, logits: torch.Tensor) -> None:
        """The next micro-batch's logits (rows, hi - lo, V): its windows' figures into scored."""
        first, self.filled = self.filled * self.micro_batch, self.filled + 1
        for row in range(self.real_rows(self.filled - 1)):
            i = first + row
            fill_scores(self.parts[i], logits[row], self.at - self.starts[i], self.targets[i])


def fill_scores(scored: torch.Tensor, logits: torch.Tensor, at: torch.Tensor, targets: torch.Tensor) -> None:
    """scored[:, k] = (log-probability of targets[k], greedy flag) from logits (P, V) whose row j predicts the token
    scored at at[j] (rows with at outside [0, n) score nothing: positions between a cp rank's chunks)."""
    mine = (at >= 0) & (at < targets.shape[0])
    k, logits = at[mine], logits[mine]
    scored[0, k] = F.log_softmax(logits, dim=-1).gather(1, targets[k][:, None])[:, 0]
    scored[1, k] = (logits.argmax(-1) == targets[k]).float()


def pipeline_steps(batches: Iterable[dict], per_step: int) -> Iterator[dict]:
    """Micro-batches joined per_step at a time into the batches a pipeline step runs (the schedule splits each
    back into them); the last one filled up with copies of its last micro-batch whose labels are all ignored,
    which add nothing to the loss, the tokens or the bytes: the same windows, hence the same validation loss,
    with and without PP."""
    group: list[dict] = []
    for batch in batches:
        group.append(batch)
        if len(group) == per_step:
            yield {key: torch.cat([b[key] for b in group]) for key in batch}
            group = []
    if group:
        filler = {**group[-1], "labels": torch.full_like(group[-1]["labels"], IGNORE_INDEX)}
        group += [filler] * (per_step - len(group))
        yield {key: torch.cat([b[key] for b in group]) for key in filler}
