"""The start-up header's name of what runs (train/loop/trainer.py model_name): the preset's name when its shape
runs as published, "<preset>-shaped (overridden: ...)" naming each changed shape key when the config overrides it
(the header said "model 8b: 16.5M parameters" for an 8b reduced to dim 64 and 2 layers)."""

from train.config import ModelSection
from train.loop.trainer import model_name
from train.parallel.build import resolve_model_config


def resolved(**section) -> tuple[str, object]:
    """The preset's name and the ModelConfig a run resolves from a `model` section (a 4096-token tokenizer)."""
    model = ModelSection(**section)
    return model.preset, resolve_model_config(model, vocab_size=4096, seq_len=64, tp=1)


def test_a_preset_as_published_is_named_by_its_name():
    assert model_name(*resolved(preset="debug")) == "debug"  # the tokenizer's vocabulary is not an override
    assert model_name(*resolved(preset="8b", vocab_from_tokenizer=False)) == "8b"


def test_an_overridden_shape_names_each_changed_key():
    name = model_name(*resolved(preset="8b", dim=64, n_layers=2, n_heads=4, n_kv_heads=2))
    assert name.startswith("8b-shaped (overridden: ") and name.endswith(")"), name
    changed = name.removeprefix("8b-shaped (overridden: ").removesuffix(")").split(", ")
    assert changed == ["dim 64", "2 layers", "4 heads", "2 kv heads"]


def test_a_key_set_to_the_presets_own_value_is_no_override():
    assert model_name(*resolved(preset="8b", n_layers=32, rope_theta=500000.0)) == "8b"
    assert model_name(*resolved(preset="debug", max_seq_len=512)) == "debug-shaped (overridden: max_seq_len 512)"
