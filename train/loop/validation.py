"""Validation over the named held-out sets (data.val_sets): loss, perplexity and bits per byte of each,
each set checked at start-up to fill at least one batch (so a run never trains for hours and then fails
at its first validation)."""

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from model.loss import IGNORE_INDEX

from ..parallel.distributed import Dist, all_reduce_sum
from .data import DataBundle
from .step import StepRunner, labelled_tokens

log = logging.getLogger("train")


@dataclass
class SetResult:
    loss: float  # nats per labelled token
    bpb: float  # bits per UTF-8 byte of the text predicted

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)


class Validator:
    """val_batches batches of micro_batch_size rows per data-parallel rank from each set, at every layout, run
    by the step runner (under pipeline parallelism a step's worth of micro-batches at a time, the last step
    filled up with rows whose labels are all ignored): the same windows, hence the same loss, with and without
    PP (and in launch/eval.py)."""

    def __init__(self, data: DataBundle, env: Dist, micro_batch_size: int, val_batches: int):
        self.data, self.env, self.micro_batch_size, self.val_batches = data, env, micro_batch_size, val_batches
        self.enabled = val_batches > 0 and bool(data.val_sets)
        if val_batches > 0 and not data.val_sets:
            log.warning("no shard set has a validation split: validation is off (build with val_fraction > 0)")
        if self.enabled:
            for name in data.val_sets:
                self._check_fits(name)
            self.byte_table, self.dummy_prefix = data.tokenizer.token_bytes()

    def _check_fits(self, name: str) -> None:
        val, rows, seq_len = self.data.val_sets[name], self.micro_batch_size, self.data.seq_len
        have, need = val.n_windows(seq_len), rows * self.env.dp_size
        if have < need:
            raise ValueError(f"{val.name} (validation set {name}): {have} validation windows of data.seq_len + 1 = "
                             f"{seq_len + 1} tokens cannot fill one batch of micro_batch_size x "
                             f"data-parallel ranks = {rows} x {self.env.dp_size} = {need}; lower micro_batch_size, "
                             f"rebuild the shards with a larger val_fraction, or set val_batches=0")

    def results(self, runner: StepRunner) -> dict[str, SetResult]:
        """Each validation set's figures, over all ranks (empty when validation is off)."""
        if not self.enabled:
            return {}
        runner.model.eval()
        figures = {name: self._one_set(name, runner) for name in self.data.val_sets}
        runner.model.train()
        return figures

    @torch.no_grad()
    def _one_set(self, name: str, runner: StepRunner) -> SetResult:
        """Only the ranks that hold the loss (every rank, or a pipeline's last stage) count tokens and bytes."""
        total, count, n_bytes = torch.zeros((), device=self.env.device, dtype=torch.float64), 0, 0
        batches = self.data.validation(name, self.micro_batch_size, self.val_batches)
        for batch, loss in runner.loss_sums(batches):
            total += loss.double()
            if runner.holds_loss and self.env.cp_rank == 0:  # a CP group's ranks hold parts of one batch's loss
                count += labelled_tokens(batch)
                n_bytes += label_bytes(batch["input_ids"], batch["labels"], self.byte_table, self.dummy_prefix,
                                       self.data.tokenizer.bos_id)
        total, count, n_bytes = all_reduce_sum([total.item(), count, n_bytes], self.env.device)
        return SetResult(total / max(count, 1), bits_per_byte(total, n_bytes))


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50))  # capped: a diverged run's loss would overflow


def label_bytes(input_ids, labels, table: np.ndarray, dummy_prefix: bool, bos_id: int) -> int:
    """UTF-8 bytes of the text the labels (B, T) stand for (Tokenizer.token_bytes gives the table and
    dummy_prefix): ignored labels count 0, and a document's first token (its input a BOS) one byte less
    where encoding put a space before the document's first word."""
    inputs, labels = np.asarray(input_ids), np.asarray(labels)
    counted = labels != IGNORE_INDEX
    n = table[np.where(counted, labels, 0)] * counted  # (B, T)
    if dummy_prefix:
        n = n - (counted & (inputs == bos_id) & (n > 0))
    return int(n.sum())


def bits_per_byte(nats_total: float, bytes_total: int) -> float:
    """Bits per UTF-8 byte of text: comparable across tokenizers, unlike the loss per token."""
    return nats_total / math.log(2) / max(bytes_total, 1)
