"""Notices a discriminator that has stopped learning while the run is still going.

One update's paired accuracy is a noisy figure (a batch of 8 pairs per head), so a single low value
says nothing; the monitor averages it over the last ``window`` updates and, once that average is at
most ``threshold`` (chance is 0.5), the trainer logs one warning for the run.
"""

from __future__ import annotations

import math
from collections import deque


class DiscriminatorMonitor:
    def __init__(self, window: int, threshold: float):
        self.window = window
        self.threshold = threshold
        self.recent: deque[float] = deque(maxlen=max(window, 1))
        self.warned = False

    @property
    def mean(self) -> float:
        return sum(self.recent) / len(self.recent)

    def update(self, accuracy: float) -> bool:
        """Record one update's paired accuracy; True the first time D is found at chance. A NaN
        accuracy (the logits were non-finite: ``train.nan_policy=skip`` skipped that update) is no
        measurement and is not recorded."""
        if self.window == 0 or self.warned or not math.isfinite(accuracy):
            return False
        self.recent.append(accuracy)
        if len(self.recent) == self.window and self.mean <= self.threshold:
            self.warned = True
            return True
        return False

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "warned": self.warned}

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(float(a) for a in state["recent"])
        self.warned = bool(state["warned"])

    def message(self, iteration: int) -> str:
        return (f"iteration {iteration}: the discriminator looks dead: its paired accuracy averaged "
                f"{self.mean:.3f} over its last {self.window} updates (chance 0.5, threshold "
                f"logging.dead_discriminator_accuracy={self.threshold}); the generator gets little "
                "signal -- consider a larger discriminator lr or distill.delta_t")
