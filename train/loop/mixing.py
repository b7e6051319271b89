"""data.mixing=adaptive: replay that follows forgetting (docs/continued-pretraining.md).

Each training source is watched through one validation set (data.adaptive.watch, or data.val_sets in data.shards
order). The first validation (at step 0 of a fresh run, before any update) gives each its reference loss. At every
later validation, and only there, the rule is:
- a source whose loss rose more than max_drift above its reference is being forgotten: its weight x (1 + step);
- a source back at or under its reference whose weight is above its starting one gives it back: / (1 + step),
  not below the start (between the two: held, so the weights do not flap on noise);
- the sources that did not move share what is left in their current proportions (a replay set raised from 0.2
  to 0.3 leaves 0.7 to the others), and every weight is then scaled by one common factor and clipped into
  [floor, ceiling] so that they sum to 1 (the factor found by bisection; no change when all are inside).
Multiplicative steps move a small replay weight (5%) as readily, in relative terms, as a large one, and a step
applies only at a validation, so the loss that triggered it has been measured on the held-out set, not guessed
from a noisy training loss. The loader starts a new mixture segment at the next sample (TokenLoader.set_weights):
each source continues its own stream where it stopped. The reference losses are checkpointed (TrainState), the
weights in force with the loader's position: a resume goes on with both (and redoes the validation of the step
it resumes at, which the checkpoint was saved before).
"""

import logging

import numpy as np

from ..config import DataSection

log = logging.getLogger("train")

MIN_WEIGHT = 1 / 1024  # the loader's mixture gives a source a whole number of slots in 4096: keep a few


def bounded(weights, floor, ceiling) -> np.ndarray:
    """weights scaled by the one factor t for which sum(clip(t * w, floor, ceiling)) = 1 (bisection; it exists
    when sum(floor) <= 1 <= sum(ceiling))."""
    w, lo, hi = (np.asarray(x, dtype=np.float64) for x in (weights, floor, ceiling))
    low, high = 0.0, float(np.max(hi / w)) + 1.0  # at 0 the sum is sum(lo) <= 1, at `high` it is sum(hi) >= 1
    for _ in range(100):
        mid = (low + high) / 2
        if np.clip(mid * w, lo, hi).sum() < 1:
            low = mid
        else:
            high = mid
    out = np.clip(high * w, lo, hi)
    return out / out.sum()


def share_the_rest(weights: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """The moved sources keep their new weights, the others are scaled to fill the rest; when the moved ones leave
    nothing (or none stayed), all are scaled alike."""
    rest = 1 - weights[moved].sum()
    if rest <= 0 or moved.all():
        return weights / weights.sum()
    out = weights.copy()
    out[~moved] *= rest / weights[~moved].sum()
    return out


class AdaptiveMixing:
    """The controller, a loop hook (train/loop/hooks.py): on_start validates once at step 0 for the references,
    after_validation applies the rule and returns the weights for the validation record (mixture/<set>)."""

    def __init__(self, data_cfg: DataSection, loader, validates: bool, is_main: bool):
        cfg, n = data_cfg.adaptive, len(loader.sources)
        if not validates:
            raise ValueError("data.mixing=adaptive follows the validation losses: set val_batches > 0 and "
                             "val_interval > 0 (every how many steps the weights may change)")
        self.loader, self.is_main, self.max_drift, self.factor = loader, is_main, cfg.max_drift, 1 + cfg.step
        self.watch = list(cfg.watch or data_cfg.val_sets)
        self.start = loader.mixture.weights.copy()  # the config's weights (or by size)
        self.floor = np.maximum(np.asarray(cfg.floor or [0.0] * n), MIN_WEIGHT)
        self.ceiling = np.asarray(cfg.ceiling or [1.0] * n, dtype=np.float64)
        outside = [f"{name} {w:.4g}" for name, w, lo, hi in zip(self.watch, self.start, self.floor, self.ceiling)
                   if not lo - 1e-12 <= w <= hi + 1e-12]
        if outside:
            raise ValueError(f"data.weights (normalised) put {', '.join(outside)} outside data.adaptive.floor="
                             f"{cfg.floor or 'none'} / ceiling={cfg.ceiling or 'none'}; start inside the bounds")
        self.reference: dict[str, float] | None = None  # each watched set's loss at the first validation

    def state_dict(self) -> dict:
        return {"reference": self.reference}

    def load_state_dict(self, state: dict) -> None:
        self.reference = state.get("reference")

    def on_start(self, trainer) -> None:
        """A fresh run validates before its first step: the references are the model as it starts. A run resumed at
        a validation step validates again: the loop saves before it validates, so the checkpoint holds the weights
        from before that validation's change, which the run without the stop made next."""
        step = trainer.state.counters.step
        if (self.reference is None and step == 0) or (step and trainer.cadence.validation_due(step)):
            trainer.validate()

    def after_validation(self, step: int, losses: dict[str, float]) -> dict:
        """Apply the rule (every rank the same: the losses are all-reduced); the weights in force after it."""
        if self.reference is None:
            self.reference = {name: losses[name] for name in self.watch}
            if self.is_main:
                log.info("data.mixing=adaptive: reference validation losses at step %d: %s", step,
                         ", ".join(f"{name} {loss:.4f}" for name, loss in self.reference.items()))
        else:
            self._adjust(step, losses)
        return {f"mixture/{name}": float(w) for name, w in zip(self.watch, self.loader.mixture.weights)}

    def _adjust(self, step: int, losses: dict[str, float]) -> None:
        weights, reasons = self.propose(losses)
        if not reasons or np.allclose(weights, self.loader.mixture.weights, rtol=0, atol=1e-9):
            return
        change = self.loader.set_weights(weights)
        if self.is_main:
            log.warning("step %d: data.mixing=adaptive: %s; %s", step, "; ".join(reasons), change)

    def propose(self, losses: dict[str, float]) -> tuple[np.ndarray, list[str]]:
        """The rule (module docstring): new weights, and why, one phrase per source that moved."""
        weights, reasons = self.loader.mixture.weights.copy(), []
        moved = np.zeros(len(weights), dtype=bool)
        for s, name in enumerate(self.watch):
            drift = losses[name] / self.reference[name] - 1
            how = f"val/{name}/loss {losses[name]:.4f} is {drift:+.2%} from its reference {self.reference[name]:.4f}"
            if drift > self.max_drift:
                weights[s] *= self.factor
                moved[s] = True
                reasons.append(f"{how} (over max_drift {self.max_drift:.2%}): raise {name}")
            elif drift <= 0 and weights[s] > self.start[s] * (1 + 1e-9):
                weights[s] = max(self.start[s], weights[s] / self.factor)
                moved[s] = True
                reasons.append(f"{how}: give {name} back toward its start {self.start[s]:.4g}")
        return bounded(share_the_rest(weights, moved), self.floor, self.ceiling), reasons


def adaptive_mixing(data_cfg: DataSection, loader, validates: bool, is_main: bool) -> AdaptiveMixing | None:
    """The controller for data.mixing=adaptive, None for fixed (the loader's weights never change)."""
    if data_cfg.mixing != "adaptive":
        return None
    return AdaptiveMixing(data_cfg, loader, validates, is_main)
