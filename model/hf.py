"""Key mapping between this project's Llama and Hugging Face transformers' LlamaForCausalLM.

Used by the model tests (parity with transformers) and by checkpoint export and import.
Our rotary embedding pairs dimensions (i, i + Hd/2) exactly as transformers does, so weights
map with renames only: no permutation of q/k rows is needed in either direction.
"""

import torch

from .config import ModelConfig, RopeScaling

_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def to_hf_key(key: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    if key in _TOP_KEYS:
        return _TOP_KEYS[key]
    prefix, layer, rest = key.split(".", 2)
    if prefix != "layers" or rest not in _LAYER_KEYS:
        raise KeyError(f"no Hugging Face name for parameter {key!r}")
    return f"model.layers.{layer}.{_LAYER_KEYS[rest]}"


def from_hf_key(key: str) -> str:
    """Inverse of `to_hf_key`."""
    for ours, theirs in _TOP_KEYS.items():
        if key == theirs:
            return ours
    parts = key.split(".", 3)
    inverse = {v: k for k, v in _LAYER_KEYS.items()}
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in inverse:
        return f"layers.{parts[2]}.{inverse[parts[3]]}"
    raise KeyError(f"unexpected key {key!r} in a Hugging Face Llama state dict")


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers' (a tied model has no lm_head: it is the embedding)."""
    return {to_hf_key(k): v for k, v in state_dict.items()}


def from_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' state dict -> ours (ignores rotary caches some checkpoints carry)."""
    out = {from_hf_key(k): v for k, v in state_dict.items() if "rotary_emb" not in k}
    if cfg.tie_embeddings:
        out.pop("output.weight", None)  # some tied checkpoints still carry a copy of the head
    return out


def to_hf_config(cfg: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict:
    """A transformers LlamaConfig as a plain dict (what config.json holds)."""
    rope_scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope_scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    }


def from_hf_config(hf: dict) -> ModelConfig:
    """A ModelConfig from a transformers Llama config.json dict."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    rope_scaling = None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        rope_scaling = RopeScaling(
            factor=scaling["factor"],
            low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_position_embeddings=scaling["original_max_position_embeddings"],
        )
    elif scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {scaling!r} in the Hugging Face config")
    theta = hf.get("rope_theta") or (scaling or {}).get("rope_theta", 10000.0)
    if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        raise ValueError("Hugging Face config has head_dim != hidden_size / num_attention_heads; not supported")
    return ModelConfig(
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads"),
        vocab_size=hf["vocab_size"],
        ffn_hidden_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_seq_len=hf.get("max_position_embeddings", 8192),
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )
