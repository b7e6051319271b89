"""The Llama architecture (Llama 2 / 3 / 3.1 / 3.2) in plain PyTorch: no distributed code here.

Shape letters: B batch, T sequence length, D model dim, H query heads, K key/value heads,
Hd head dim (D / H), V vocabulary, F SwiGLU hidden size.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import attention
from .config import ModelConfig, RopeScaling
from .init import Shard, canonical_name, normal_shard
from .loss import linear_cross_entropy


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies (Hd/2,) of the rotary embedding, with Llama 3.1 scaling if given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq.float()
    # Llama 3.1: wavelengths longer than the original context / low_freq_factor are slowed by
    # `factor`; shorter than original / high_freq_factor kept; smooth blend in between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    scaled = torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), blended, scaled)
    return scaled.float()


def rope_cos_sin(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (max_seq_len, Hd) for every position."""
    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (T, Hd): the two halves rotate together
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, heads, Hd) by position. Pairs are (i, i + Hd/2), the Hugging Face layout:
    a fixed permutation of Meta's interleaved pairs, so weights map across with renames only
    once q/k rows are permuted the way Meta's own conversion script does."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 for stability under bf16, as Meta's reference does.
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight

    def reset_parameters(self):
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # (k, v) of this rank's part of the sequence -> the whole sequence's, where the sequence is split over
        # ranks (set by train/parallel/context_parallel.py); None: the rank holds whole sequences.
        self.gather_kv = None

    def forward(self, x, cos, sin, mask=None):
        """mask: None (causal) or the micro-batch's attention.document_mask, shared by every layer."""
        B, T, _ = x.shape
        # -1, not n_heads: under tensor parallelism each rank's wq/wk/wv give it H/tp and K/tp of the heads.
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, H, Hd)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, K, Hd)
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, K, Hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, Hd)
        if self.gather_kv is not None:
            k, v = self.gather_kv(k, v)  # (B, K, T_whole, Hd): the queries stay this rank's
        y = attention.attend(q, k, v, mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*Hd) -> (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig, document_masking: bool = False):
        super().__init__()
        self.cfg = cfg
        # Attention within documents only (data.document_masking), their starts read from position_ids;
        # mask_kind None picks attention.default_kind for the device ("sdpa" on CPU, "flex" on CUDA).
        self.document_masking, self.mask_kind = document_masking, None
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A ModuleDict keyed "0".."L-1" keeps state-dict keys stable when blocks are wrapped.
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied models have no output module: the head reads the embedding table directly, which
        # survives meta-device materialisation and sharding (a shared Parameter would not).
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Rope tables are derived, never saved; rebuilt by init_weights after a meta-device build.
        # The fused head + loss; tensor parallelism swaps in its vocabulary-parallel twin
        # (train/parallel/loss_parallel.py).
        self.head_loss = linear_cross_entropy
        # (h, position_ids) -> the mask of this rank's queries over the whole sequence where it is split over ranks
        # (None when no split micro-batch is in flight); set by train/parallel/context_parallel.py.
        self.sequence_mask = None
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_rope(self):
        device = next(self.parameters()).device
        self.rope_cos, self.rope_sin = rope_cos_sin(self.cfg, device=device)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, shard_of: Callable[[torch.Tensor], Shard] | None = None):
        """Initialise every parameter in place; the scheme (GPT-2 / OLMo style):

        - embeddings, input projections (wq, wk, wv, w1, w3) and the untied output: N(0, init_std)
        - projections that write into the residual stream (wo, w2): N(0, init_std / sqrt(2 * n_layers)),
          so the residual's variance does not grow with depth
        - RMSNorm weights: 1

        The values are a function of (seed, parameter name, element position) alone (model/init.py): a
        parameter split over ranks gets, on each rank, the values the whole model has there. shard_of(p)
        says which part of the whole parameter p holds (train/parallel/build.py's, for DTensors); by default all
        of it. seed None draws one from torch's global generator.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        std, depth_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            name = canonical_name(name)
            shard = shard_of(p) if shard_of else Shard(p, tuple(p.shape))
            if name.endswith("norm.weight"):
                shard.local.fill_(1.0)
            else:
                normal_shard(shard, depth_std if name.endswith(("wo.weight", "w2.weight")) else std, seed, name)
        self.init_rope()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T); or, given labels (B, T), the summed cross-entropy
        (fused with the output projection, never holding all logits). position_ids (B, T) restart
        rope at each document and, with document_masking, confine attention to it.

        A pipeline stage (train/parallel/pipeline.py) holds some of the blocks: without the embedding its input is the
        hidden states (B, T, D) of the stage before, and without the norm and head it returns its own."""
        T = input_ids.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if position_ids is None:
            cos, sin = self.rope_cos[:T, None, :], self.rope_sin[:T, None, :]  # (T, 1, Hd)
        else:
            cos, sin = self.rope_cos[position_ids, None, :], self.rope_sin[position_ids, None, :]  # (B, T, 1, Hd)
        h = input_ids if self.tok_embeddings is None else self.tok_embeddings(input_ids)  # (B, T, D)
        if torch.is_autocast_enabled(h.device.type):
            # The residual stream in the compute dtype, as with FSDP's bf16 parameters: one and
            # many GPUs give the same numbers, and half the activation memory and traffic.
            h = h.to(torch.get_autocast_dtype(h.device.type))
        mask = self.sequence_mask(h, position_ids) if self.sequence_mask is not None else None
        if mask is None:
            mask = self.document_mask(position_ids, h)
        for block in self.layers.values():
            h = block(h, cos, sin, mask)
        if self.norm is None:
            return h
        h = self.norm(h)
        head = self.tok_embeddings.weight if self.output is None else self.output.weight  # (V, D)
        if labels is not None:
            return self.head_loss(h, head, labels)
        return F.linear(h, head)  # (B, T, V)

    def document_mask(self, position_ids: torch.Tensor | None, h: torch.Tensor):
        """The micro-batch's document mask (None: plain causal attention), built here once for all the
        blocks; h is the residual stream, in the attention's compute dtype."""
        if not self.document_masking or position_ids is None:
            return None  # no positions (generation from one prompt): each row is one document, plain causal
        return attention.document_mask(position_ids, self.mask_kind or attention.default_kind(h.device), h.dtype)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = None,
                document_masking: bool = False) -> Llama:
    """Construct on the meta device (no memory), then materialise on `device` and initialise."""
    with torch.device("meta"):
        model = Llama(cfg, document_masking)
    model.to_empty(device=device)
    model.init_weights(seed=seed)
    return model
