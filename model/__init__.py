"""The Llama model: config and presets, modules, parameter and FLOP counts, HF key mapping."""

from .config import PRESETS, ModelConfig, RopeScaling, preset
from .flops import flops_per_token, num_params
from .llama import Llama, build_model

__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "preset", "flops_per_token", "num_params", "Llama", "build_model"]
