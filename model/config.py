"""Llama model configuration and the published presets (Meta's shapes)."""

from dataclasses import dataclass, replace


@dataclass
class RopeScaling:
    """Llama 3.1 frequency scaling of the rotary embedding (stretches long wavelengths)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads = n_heads)
    vocab_size: int = 8192
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None  # set to bypass Meta's rule (e.g. to copy another shape)
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        for key in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"model.dim / model.n_heads = {self.head_dim} must be even for rotary embeddings")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.kv_heads})"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size by Meta's rule: 2/3 of 4*dim, times the multiplier, rounded up."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5, max_seq_len=8192)

PRESETS: dict[str, ModelConfig] = {
    # Tiny: trains in seconds on a laptop CPU; vocab usually replaced by the tokenizer's.
    "debug": ModelConfig(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=8192, multiple_of=64,
                         rope_theta=10000.0, max_seq_len=1024),
    # Llama 3.2 1B and 3B: tied embeddings, rope scaled by 32.
    "1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256,
                      tie_embeddings=True, rope_scaling=RopeScaling(factor=32.0), **_LLAMA3),
    "3b": ModelConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0, multiple_of=256,
                      tie_embeddings=True, rope_scaling=RopeScaling(factor=32.0), **_LLAMA3),
    # Llama 3.1 8B, 70B, 405B.
    "8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024,
                      rope_scaling=RopeScaling(factor=8.0), **_LLAMA3),
    "70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096,
                       rope_scaling=RopeScaling(factor=8.0), **_LLAMA3),
    "405b": ModelConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2,
                        multiple_of=4096, rope_scaling=RopeScaling(factor=8.0), **_LLAMA3),
    # Llama 2 7B: the SentencePiece-era shape (32k vocab, MHA, theta 10k, 4k context).
    "7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, rope_theta=10000.0,
                      norm_eps=1e-5, max_seq_len=4096),
    # The shapes torchtitan's side-by-side benchmark defines (untied, no rope scaling).
    "tt_1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256,
                         **_LLAMA3),
    "tt_8b_l8": ModelConfig(dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
                            multiple_of=1024, **_LLAMA3),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A copy of a preset with fields overridden (e.g. ``vocab_size`` from the tokenizer)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
