"""Validation loss and perplexity over the first validation split, checked at start-up to fill at
least one batch (so a run never trains for hours and then fails at its first validation)."""

import logging
import math

import torch

from .config import TrainConfig
from .data import DataBundle
from .distributed import Dist, all_reduce_sum
from .pipeline import microbatches
from .step import labelled_tokens, loss_sum

log = logging.getLogger("train")


class Validator:
    """Under pipeline parallelism a validation batch is one step's worth of micro-batches (the schedule
    splits it), and val_batches counts micro-batches, rounded up to whole steps."""

    def __init__(self, cfg: TrainConfig, data: DataBundle, env: Dist, autocast: torch.dtype | None):
        self.cfg, self.data, self.env, self.autocast = cfg, data, env, autocast
        self.enabled = cfg.val_batches > 0 and bool(data.val_sets)
        self.rows, self.batches = cfg.micro_batch_size, cfg.val_batches
        if env.pp > 1:
            per_step = microbatches(cfg, env.dp_size)
            self.rows, self.batches = self.rows * per_step, -(-cfg.val_batches // per_step)
        if cfg.val_batches > 0 and not data.val_sets:
            log.warning("no shard set has a validation split: validation is off (build with val_fraction > 0)")
        if self.enabled:
            self._check_fits()

    def _check_fits(self) -> None:
        val, need = self.data.val_sets[0], self.rows * self.env.dp_size
        have = val.n_windows(self.cfg.data.seq_len)
        if have < need:
            what = "micro_batch_size" if self.env.pp == 1 else "micro_batch_size x pipeline micro-batches"
            raise ValueError(f"{val.name}: {have} validation windows of data.seq_len + 1 = {self.cfg.data.seq_len + 1}"
                             f" tokens cannot fill one batch of {what} x data-parallel ranks = "
                             f"{self.rows} x {self.env.dp_size} = {need}; lower micro_batch_size, "
                             f"rebuild the shards with a larger val_fraction, or set val_batches=0")

    @torch.no_grad()
    def loss(self, model, pipeline=None) -> float | None:
        """Mean validation loss per labelled token over all ranks (None when validation is off). Only the
        ranks that hold the loss (every rank, or a pipeline's last stage) count their tokens."""
        if not self.enabled:
            return None
        model.eval()
        total, count = torch.zeros((), device=self.env.device, dtype=torch.float64), 0
        holds_loss = pipeline is None or pipeline.last
        for batch in self.data.validation(self.rows, self.batches):
            if pipeline is not None:
                total += pipeline.loss_sum(batch).double()
            else:
                positions = batch["position_ids"].to(self.env.device) if "position_ids" in batch else None
                total += loss_sum(model, batch["input_ids"].to(self.env.device), batch["labels"].to(self.env.device),
                                  positions, autocast=self.autocast).double()
            count += labelled_tokens(batch) if holds_loss else 0
        model.train()
        total, count = all_reduce_sum([total.item(), count], self.env.device)
        return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50))  # capped: a diverged run's loss would overflow
