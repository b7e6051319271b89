"""Sampling text from a Llama: temperature, top-k and top-p (nucleus) sampling."""

import torch


@torch.no_grad()
def generate(model, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | None = None) -> torch.Tensor:
    """Extend ids (B, T) by up to `max_new_tokens` sampled tokens (no KV cache: the whole window is
    recomputed each token, which is plenty for eyeballing what a run learnt)."""
    was_training = model.training
    model.eval()
    max_len = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        logits = model(ids[:, -max_len:])[:, -1, :].float()  # (B, V)
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
        if eos_id is not None and (next_id == eos_id).all():
            break
    model.train(was_training)
    return ids
