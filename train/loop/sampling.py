"""The end-of-run sample (sample_prompt): a continuation drawn on every rank from the model as it is parallelized
(no rank gathers the whole model), through the step runner's next_logits (train/loop/step.py StepRunner).

- Under TP or PP the window is padded on the right to data.seq_len. Causal attention keeps the logits of the last
  real position blind to the padding, and the shape is the one the model was built for: TP's sequence split
  needs a length divisible by tp, the pipeline's stages keep the shapes of their first step, and compiled blocks
  see no new shape. TP's logits are a DTensor, gathered for the one position.
- Under PP the window goes through the schedule as a validation batch does (every row of one step's micro-batches
  the window), and the last stage's logits are broadcast over the pipeline.
- The seed is the same on every rank, so every rank draws the same tokens.
"""

import torch

from model.generate import generate


def sample(runner, tokenizer, prompt: str, max_new_tokens: int, seq_len: int, seed: int, device) -> str:
    """A continuation of `prompt` within a window of seq_len tokens (every rank calls it: the sharded, split or
    pipelined model needs all of them)."""
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(prompt)], device=device)
    torch.manual_seed(seed)  # the same draws on every rank
    out = generate(runner.model, ids, max_new_tokens, temperature=0.8, top_k=50, max_len=seq_len,
                   next_logits=runner.next_logits)
    return tokenizer.decode(out[0, 1:].tolist())
