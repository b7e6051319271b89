"""Sampling text from a Llama: temperature, top-k and top-p (nucleus) sampling."""

import torch


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """ValueError naming the first setting that means nothing (before any work: top_p=0 would drop every
    token and fail deep in torch.multinomial)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is negative; pass 0 or more tokens to sample")
    if not temperature >= 0:  # NaN included
        raise ValueError(f"temperature={temperature} is not 0 or more; pass 0 (greedy) or more (1 samples as trained)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} is negative; pass 0 (off) or the number of likeliest tokens to keep")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is outside (0, 1]; pass 1 (off) or the probability mass to keep, e.g. 0.95")


@torch.no_grad()
def generate(model, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | list[int] | None = None, next_logits=None,
             max_len: int = 0) -> torch.Tensor:
    """Extend ids (B, T) by up to `max_new_tokens` sampled tokens (no KV cache: the whole window of the
    last `max_len` tokens, model.cfg.max_seq_len by default, is recomputed each token, which is plenty for
    eyeballing what a run learnt). temperature 0 is greedy. next_logits(window) -> (B, V) replaces
    model(window)[:, -1] where the model cannot be called as it is (a parallelized one, train/loop/sampling.py).
    eos_id: the token, or tokens (a chat model's end of turn and its EOS), that end a sample; sampling stops once
    every sample has ended (the tokens after a sample's end are the caller's to cut)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    max_len = max_len or model.cfg.max_seq_len
    next_logits = next_logits or (lambda window: model(window)[:, -1, :])
    stops = torch.tensor([] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id),
                         dtype=ids.dtype, device=ids.device)
    ended = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = next_logits(ids[:, -max_len:]).float()  # (B, V)
        if temperature <= 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if top_p < 1.0:
                sorted_logits, order = logits.sort(dim=-1, descending=True)
                cumulative = sorted_logits.softmax(-1).cumsum(-1)
                # Drop tokens once the mass before them already reaches top_p (keep at least one).
                drop = cumulative - sorted_logits.softmax(-1) >= top_p
                logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
            next_id = torch.multinomial(logits.softmax(-1), 1)  # (B, 1)
        ids = torch.cat([ids, next_id], dim=1)
        if len(stops):
            ended |= torch.isin(next_id[:, 0], stops)
            if ended.all():
                break
    model.train(was_training)
    return ids
