"""Cross-entropy over a large vocabulary without materialising all the logits.

The output projection and the loss are fused and run chunk by chunk over the tokens: each chunk's
logits (chunk, V) exist only briefly, and the gradients for the hidden states and the output weight
are computed right away in the forward (the softmax gradient needs nothing else), so the backward
only scales them. For a 128k vocabulary at 16k tokens this saves the ~8 GiB of fp32 logits and
their gradient that `F.cross_entropy(logits.float(), ...)` keeps alive.
"""

import torch

IGNORE_INDEX = -100


def _chunk_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor,
                         needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed CE of one chunk and d(sum CE)/d(logits) in the logits' dtype (None without needs_grad),
    computed in fp32; logits (n, V), labels (n,)."""
    dtype = logits.dtype
    logits = logits.float()
    valid = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    target = logits.gather(1, safe[:, None]).squeeze(1)  # (n,)
    loss = ((lse - target) * valid).sum()
    if not needs_grad:
        return loss, None
    grad = torch.exp(logits - lse[:, None])  # softmax (n, V)
    grad.scatter_add_(1, safe[:, None], -torch.ones_like(target)[:, None])  # minus the one-hot target
    return loss, (grad * valid[:, None]).to(dtype)


_compiled_chunk = None


def compiled_chunk_kernel():
    """The chunk kernel through torch.compile: one fused pass over (n, V) instead of several."""
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_grad, dynamic=False)
    return _compiled_chunk


def _chunk_fn(device: torch.device):
    """The chunk kernel: compiled on CUDA; eager on the CPU, where compiling would cost every run's start-up
    more than it saves (the compiled kernel is checked against eager on the CPU by tests/model/test_model.py)."""
    return compiled_chunk_kernel() if device.type == "cuda" else _chunk_loss_and_grad


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, needs_grad, chunk_kernel):
        # hidden (N, D), weight (V, D), labels (N,). needs_grad comes from the caller: grad mode is
        # always off in here, and ctx.needs_input_grad stays True under no_grad (validation).
        # chunk_kernel(logits, labels, needs_grad) -> (summed loss, d loss / d logits).
        ctx.weight_dtype = weight.dtype
        if torch.is_autocast_enabled(hidden.device.type):
            # Cast once here: autocast would cast the weight again for every chunk (it never caches
            # a transposed view) and leave each chunk's weight gradient in bf16 to be added up in fp32.
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            logits = h @ weight.t()  # (n, V) in the compute dtype, as an unfused head would give
            loss, grad = chunk_kernel(logits, labels[start:start + chunk_size], needs_grad)
            total += loss
            if needs_grad:
                grad_hidden[start:start + chunk_size] = grad @ weight
                # Accumulate the weight gradient over chunks in fp32 (straight from the matmul on CUDA).
                if hidden.is_cuda and hidden.dtype != torch.float32:
                    grad_weight = torch.addmm(grad_weight, grad.t(), h, out_dtype=torch.float32)
                else:
                    grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden * grad_output.to(grad_hidden.dtype), grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_size: int | None = None, chunk_kernel=None) -> torch.Tensor:
    """Sum over tokens of cross_entropy(hidden @ weight.T, labels); hidden (..., D), labels (...).
    Labels equal to -100 are ignored. The default chunk keeps each chunk's fp32 logits near 1 GiB.
    chunk_kernel replaces the per-chunk loss and softmax gradient (the vocabulary-parallel loss's, whose
    weight holds a slice of the vocabulary, train/parallel/loss_parallel.py)."""
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if chunk_size is None:
        chunk_size = max(256, (1 << 28) // weight.shape[0])
    # Without a backward to come (no_grad, inference_mode, frozen inputs) only the loss is computed:
    # the gradients made in the forward would cost two more matmuls of the head's size per chunk.
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    chunk_kernel = chunk_kernel or _chunk_fn(hidden.device)
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_size, needs_grad, chunk_kernel)
