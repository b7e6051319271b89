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
"""

import dataclasses
import logging
from inspect import signature

import torch
import torch.distributed as dist
from torch import nn

from model import Llama, ModelConfig

from ..config import TrainConfig
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
from .distributed import Dist, whole

log = logging.getLogger("train")


def virtual_stages(schedule: str, configured: int) -> int:
    """Stages per rank: as configured, else 2 for the looped and V schedules and 1 for the others."""
    return configured or (2 if schedule in LOOPED or schedule == "ZBVZeroBubble" else 1)


def microbatches(cfg: TrainConfig, dp_size: int) -> int:
    return cfg.global_batch_size // (cfg.micro_batch_size * dp_size)


def check_pipeline(cfg: TrainConfig, model_cfg: ModelConfig, dp_size: int) -> None:
    """Start-up checks of a pipeline layout, each one line naming its key."""
    par = cfg.parallel
    if par.pp == 1:
        return
    pipe = Pipeline(par.pp_schedule, microbatches(cfg, dp_size), virtual_stages(par.pp_schedule, par.pp_virtual_stages))
    problem = stage_problem(pipe, par.pp, model_cfg.n_layers)
    if problem:  # the planner's words for the keys of launch/plan.py
        raise ValueError(f"parallel.{problem.replace('virtual_stages=', 'pp_virtual_stages=')}")
    problem = microbatch_problem(pipe, par.pp)
    if problem:
        raise ValueError(f"parallel.pp_schedule={par.pp_schedule}: global_batch_size / (micro_batch_size x "
                         f"data-parallel ranks) = {cfg.global_batch_size} / ({cfg.micro_batch_size} x {dp_size}) = "
                         f"{problem}; {microbatch_advice(cfg, dp_size, par.pp)}")
    if model_cfg.tie_embeddings:
        raise ValueError("parallel.pp needs an untied head (model.tie_embeddings=false): the embedding sits on the "
                         "first stage and the head on the last")
    if par.pp_schedule in ZERO_BUBBLE and par.compile:
        raise ValueError(f"parallel.pp_schedule={par.pp_schedule} splits the backward, which torch.compile'd blocks "
                         f"do not allow: set parallel.compile=false or use 1F1B / Interleaved1F1B")
    if par.pp_schedule == "ZBVZeroBubble" and (cfg.val_batches > 0 or cfg.sample_prompt):
        # torch's eval of this schedule still runs the V's same-rank backward hand-offs, and fails on them.
        raise ValueError(f"parallel.pp_schedule=ZBVZeroBubble cannot run validation or the sample in torch "
                         f"{torch.__version__.split('+')[0]}: use InterleavedZeroBubble, or set val_batches=0 and "
                         f"sample_prompt=''")
    stage_layers(model_cfg.n_layers, par.pp * pipe.virtual_stages, par.pp_layers_per_stage)


def microbatch_advice(cfg: TrainConfig, dp_size: int, pp: int) -> str:
    """The settings that give the pipeline a number of micro-batches every schedule takes (plan_pp.microbatch_fixes)."""
    smaller, per_rank = microbatch_fixes(cfg.global_batch_size // dp_size, cfg.micro_batch_size, pp)
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


def split(model: Llama, cfg: TrainConfig, env: Dist) -> tuple[list[Llama], list[int], int]:
    """This rank's stages of `model`, their indices, and the number of stages in all."""
    par = cfg.parallel
    v = virtual_stages(par.pp_schedule, par.pp_virtual_stages)
    layers = stage_layers(model.cfg.n_layers, par.pp * v, par.pp_layers_per_stage)
    ids = rank_stages(env.pp_rank, par.pp, Pipeline(par.pp_schedule, virtual_stages=v))
    last = par.pp * v - 1
    stages = [assemble(model, {str(i): model.layers[str(i)] for i in layers[s]},
                       model.tok_embeddings if s == 0 else None, model.norm if s == last else None,
                       model.output if s == last else None) for s in ids]
    log.info("pipeline: %d stages of blocks %s; this rank holds stage %s", par.pp * v,
             ", ".join(f"{r.start}-{r.stop - 1}" for r in layers), ", ".join(map(str, ids)))
    return stages, ids, par.pp * v


def merge(stages: list[Llama]) -> Llama:
    """The rank's model: all its stages' (parallelized) modules under the whole model's names."""
    blocks = dict(sorted(((k, b) for s in stages for k, b in s.layers.items()), key=lambda kv: int(kv[0])))
    first = next((s.tok_embeddings for s in stages if s.tok_embeddings is not None), None)
    last = next((s for s in stages if s.norm is not None), None)
    return assemble(stages[0], blocks, first, last and last.norm, last and last.output)


class PipelineRun:
    """The schedule over this rank's stages: one training step's forward and backward, validation, and the
    logits of one position for the end-of-run sample."""

    def __init__(self, stages: list[Llama], ids: list[int], n_stages: int, cfg: TrainConfig, env: Dist):
        # Imported here, under PP only: it imports torch._dynamo, a second at every start-up otherwise.
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

        group = env.pp_mesh.get_group()
        self.stages = [PipelineStage(m, i, n_stages, env.device, group=group) for m, i in zip(stages, ids)]
        self.first, self.last = 0 in ids, n_stages - 1 in ids
        self.n_micro, self.device, self.poison = microbatches(cfg, env.dp_size), env.device, False
        self.rows, self.vocab_size, self.group = self.n_micro * cfg.micro_batch_size, stages[0].cfg.vocab_size, group
        self.capture: list | None = None  # the list the last stage's logits go to, when sampling
        # The last stage's final norm, whose output the sample cuts to one position before the head (logits_at).
        self.head_norm = next((m.norm for m, i in zip(stages, ids) if i == n_stages - 1), None)
        pipe = Pipeline(cfg.parallel.pp_schedule, virtual_stages=len(stages))
        owner = next(r for r in range(env.pp) if n_stages - 1 in rank_stages(r, env.pp, pipe))  # 0 under ZBV's V
        self.last_rank = dist.get_global_rank(group, owner)
        schedule = get_schedule_class(cfg.parallel.pp_schedule)
        single = issubclass(schedule, PipelineScheduleSingle)
        self.schedule = schedule(self.stages[0] if single else self.stages, n_microbatches=self.n_micro,
                                 loss_fn=self._loss, scale_grads=False)
        # The outputs are the losses, which `losses` collects: not merged (scalars would not concatenate).
        self.no_outputs = {"return_outputs": False} if "return_outputs" in signature(schedule.step).parameters else {}

    def _loss(self, summed_loss: torch.Tensor, _target) -> torch.Tensor:
        if self.capture is not None:  # no labels were given: the last stage's output is the logits (1, 1, V)
            self.capture.append(whole(summed_loss[:, -1, :]).float())  # (1, V)
            return torch.zeros((), device=self.device)
        return summed_loss * float("nan") if self.poison else summed_loss  # a fault drill poisons it

    def _run(self, batch: dict, train: bool) -> torch.Tensor:
        """This rank's summed loss over the batch: the last stage's, zero on the others."""
        labels = batch["labels"].to(self.device)
        # Positions given to every stage: a later stage's input under TP is its sequence shard (B, T / tp, D),
        # from which it could not tell the rope positions.
        positions = batch.get("position_ids", torch.arange(labels.shape[1]).expand(labels.shape))
        kwargs = {"labels": labels, "position_ids": positions.to(self.device)}
        args = (batch["input_ids"].to(self.device),) if self.first else ()
        losses: list[torch.Tensor] = []
        # The target only satisfies the schedule (the last stage's output is already the loss).
        run = self.schedule.step if train else self.schedule.eval
        run(*args, target=kwargs["labels"], losses=losses, **self.no_outputs, **kwargs)
        return torch.stack(losses).sum().float() if self.last else torch.zeros((), device=self.device)

    def forward_backward(self, batch: dict, poison_loss: bool = False) -> torch.Tensor:
        self.poison = poison_loss
        return self._run(batch, train=True)

    @torch.no_grad()
    def loss_sum(self, batch: dict) -> torch.Tensor:
        return self._run(batch, train=False)

    @torch.no_grad()
    def logits_at(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """The logits (1, V) at `position` of token ids (1, T), on every rank of the pipeline. The last stage
        applies the head to that one position of one row: the (rows, T, V) logits of a step would be
        gigabytes at a 128k vocabulary."""
        rows = ids.to(self.device).expand(self.rows, -1).contiguous()  # (rows, T): the shape the stages run
        positions = torch.arange(ids.shape[1], device=self.device).expand(rows.shape)
        captured: list[torch.Tensor] = []
        self.capture = captured
        cut = self.head_norm.register_forward_hook(lambda _m, _a, h: h[:1, position:position + 1]) if self.last \
            else None  # the norm's output (B, T, D) -> (1, 1, D), what the head then reads
        try:
            self.schedule.eval(*((rows,) if self.first else ()), target=rows, losses=[], **self.no_outputs,
                               position_ids=positions)
        finally:
            self.capture = None
            if cut is not None:
                cut.remove()
        logits = captured[0] if self.last else torch.empty(1, self.vocab_size, device=self.device)
        dist.broadcast(logits, src=self.last_rank, group=self.group)
        return logits
