"""data.mixing=adaptive (train/loop/mixing.py): the rule on a real two-source loader (the shared test shards' train
and val splits as the two sources), the bounded renormalisation, and the one-line refusals of bad settings. The
runs that show it at work (fixed vs adaptive, a resume): tests/e2e/test_adaptive_mixing.py."""

import pytest

from data_pipeline.loader import ShardSet, TokenLoader
from train.config import AdaptiveMixing as AdaptiveSettings
from train.config import DataSection
from train.loop.mixing import MIN_WEIGHT, AdaptiveMixing, adaptive_mixing, bounded


def data_section(**adaptive) -> DataSection:
    return DataSection(shards=["domain", "replay"], val_sets={"domain": "d", "replay": "r"}, weights=[0.8, 0.2],
                       mixing="adaptive", adaptive=AdaptiveSettings(**adaptive))


@pytest.fixture
def loader(shards):
    return TokenLoader([ShardSet.open(shards, "train"), ShardSet.open(shards, "val")], seq_len=64,
                       global_batch_size=8, weights=[0.8, 0.2], adaptive=True)


def test_a_drifting_source_gains_weight_and_gives_it_back_when_recovered(loader):
    mixing = AdaptiveMixing(data_section(max_drift=0.02, step=0.5), loader, validates=True, is_main=True)
    assert mixing.after_validation(0, {"domain": 5.0, "replay": 4.0}) == {"mixture/domain": 0.8,
                                                                          "mixture/replay": 0.2}
    assert mixing.reference == {"domain": 5.0, "replay": 4.0}
    next(loader)
    held = mixing.after_validation(10, {"domain": 4.0, "replay": 4.0 * 1.019})  # within max_drift: no change
    assert held == {"mixture/domain": 0.8, "mixture/replay": 0.2} and loader.mixture.start == 0
    raised = mixing.after_validation(20, {"domain": 3.5, "replay": 4.0 * 1.03})  # forgetting: x 1.5
    assert raised["mixture/replay"] == pytest.approx(0.3) and raised["mixture/domain"] == pytest.approx(0.7)
    assert loader.mixture.start == loader.samples_consumed == 8  # a new segment from the next sample
    again = mixing.after_validation(30, {"domain": 3.4, "replay": 4.0 * 1.01})  # under max_drift, over the start
    assert again == raised  # held between 0 and max_drift
    back = mixing.after_validation(40, {"domain": 3.3, "replay": 3.9})  # recovered: / 1.5, not below its start
    assert back["mixture/replay"] == pytest.approx(0.2) and back["mixture/domain"] == pytest.approx(0.8)


def test_bounds_hold_after_every_change(loader):
    mixing = AdaptiveMixing(data_section(step=3.0, floor=[0.5, 0.0], ceiling=[1.0, 0.45]), loader, True, True)
    mixing.after_validation(0, {"domain": 5.0, "replay": 4.0})
    first = mixing.after_validation(1, {"domain": 4.0, "replay": 4.5})  # x 4 would give 0.5: the ceiling holds it
    assert first["mixture/replay"] == pytest.approx(0.45) and first["mixture/domain"] == pytest.approx(0.55)
    assert mixing.after_validation(2, {"domain": 4.0, "replay": 4.6}) == first  # at its ceiling: nothing moves


def test_bounded_scales_by_one_factor_within_the_bounds():
    got = bounded([0.5, 0.3, 0.2, 0.6], floor=[0.0, 0.25, 0.0, 0.0], ceiling=[1.0, 1.0, 1.0, 0.3])
    assert got.sum() == pytest.approx(1) and got[3] == pytest.approx(0.3) and got[1] == pytest.approx(0.25)
    assert got[0] / got[2] == pytest.approx(0.5 / 0.2)  # the unclipped keep their proportions
    tiny = bounded([1.0, 1e-9], floor=[0.0, MIN_WEIGHT], ceiling=[1.0, 1.0])
    assert tiny[1] == pytest.approx(MIN_WEIGHT)


def test_fixed_mixing_has_no_controller(loader):
    assert adaptive_mixing(DataSection(shards=["a", "b"]), loader, True, True) is None


@pytest.mark.parametrize("settings, key", [
    (dict(shards=["only"], val_sets={"only": "x"}, weights=None), "moves weight between sources"),
    (dict(val_sets={"domain": "d"}), "data.adaptive.watch"),
    (dict(adaptive=AdaptiveSettings(watch=["domain", "other"])), "data.adaptive.watch"),
    (dict(adaptive=AdaptiveSettings(floor=[0.5, 0.3], ceiling=[0.4, 1.0])), "must be <= data.adaptive.ceiling"),
    (dict(adaptive=AdaptiveSettings(floor=[0.7, 0.4])), "sums above 1"),
    (dict(adaptive=AdaptiveSettings(ceiling=[0.5, 0.4])), "sums below 1"),
    (dict(adaptive=AdaptiveSettings(floor=[0.5])), "data.adaptive.floor"),
    (dict(adaptive=AdaptiveSettings(step=0)), "data.adaptive.step"),
])
def test_bad_settings_are_refused_in_one_line(settings, key):
    section = data_section()
    for name, value in settings.items():
        setattr(section, name, value)
    with pytest.raises(ValueError, match=r"^data\.") as e:  # the key first
        section.check()
    assert key in str(e.value) and "\n" not in str(e.value)


def test_start_outside_the_bounds_and_no_validation_are_refused(loader):
    with pytest.raises(ValueError, match="outside data.adaptive.floor"):
        AdaptiveMixing(data_section(floor=[0.0, 0.3]), loader, True, True)
    with pytest.raises(ValueError, match="val_batches > 0"):
        AdaptiveMixing(data_section(), loader, validates=False, is_main=True)
