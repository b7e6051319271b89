"""The end-of-run sample from a tensor- or pipeline-parallel model: the next token's logits for
model/generate.py, computed by the model as it is parallelized (no rank gathers the whole model).

- The window is padded on the right to data.seq_len. Causal attention keeps the logits of the last real
  position blind to the padding, and the shape is the one the model was built for: TP's sequence split
  needs a length divisible by tp, the pipeline's stages keep the shapes of their first step, and
  compiled blocks see no new shape.
- Under TP the head's logits are a DTensor, gathered for the one position.
- Under PP the window goes through the schedule as a validation batch does (every row of one step's
  micro-batches the window), and the last stage's logits are broadcast over the pipeline, so that every
  rank draws the same token (the seed is the same on every rank).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..parallel.distributed import Dist, whole


def next_logits_fn(model, pipeline, env: Dist, seq_len: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """next_logits(window (1, T <= seq_len)) -> (1, V) on every rank, or None where the model can be called
    as it is (no TP, no PP)."""
    if env.tp == 1 and env.pp == 1:
        return None

    def next_logits(window: torch.Tensor) -> torch.Tensor:
        last = window.shape[1] - 1
        padded = F.pad(window, (0, seq_len - window.shape[1]))  # (1, seq_len); id 0 after the window
        if pipeline is not None:
            return pipeline.logits_at(padded, last)
        return whole(model(padded)[:, last, :])  # (1, V)

    return next_logits
