"""Whether a discriminator is learning, from statistics a user can watch during a run.

Batch means of D(real) and D(fake) can move together while D separates every pair (ADM's real /
fake samples share x_t, so what differs within a pair is all D can use), and a hinge loss near its
chance value says little on a small batch. What shows learning is paired:

* ``paired_margin`` = mean_i,h [D_h(x_real_i) - D_h(x_fake_i)] (0 at chance);
* ``paired_accuracy`` = the fraction of pairs (i, h) with D_h(x_real_i) > D_h(x_fake_i) (ties
  count one half; 0.5 at chance; NaN when a logit is: NaN compares false both ways, which
  would read as a lost pair); for unpaired real / fake batches (DMD2) it estimates
  P(D(real) > D(fake)) over random pairs, the same quantity;
* ``loss_vs_chance`` = loss / the loss of a discriminator that outputs 0 everywhere (1 at chance);
* the first two per head (``paired_margin/hK``, ``paired_accuracy/hK``).

The trainer averages them, as every logged figure, over the micro-batches and the data-parallel
ranks (``train/phases.py``'s ``mean_metrics``), so they describe the global batch whatever the
layout (every rank gets the same figures).
"""

from __future__ import annotations

from typing import Callable

import torch

PREFIX = "discriminator/"


@torch.no_grad()
def discriminator_health(logits_real: torch.Tensor, logits_fake: torch.Tensor, loss: torch.Tensor,
                         loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """The statistics above from ``[B, heads]`` logits, keyed ``discriminator/...``.

    ``loss_fn(logits_real, logits_fake)`` is the discriminator's loss (its chance value is taken
    at zero logits); ``loss`` its value on these logits.
    """
    real = logits_real.detach().float().reshape(logits_real.shape[0], -1)
    fake = logits_fake.detach().float().reshape(logits_fake.shape[0], -1)
    n = min(real.shape[0], fake.shape[0])
    diff = real[:n] - fake[:n]
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()
    wins[diff.isnan()] = float("nan")  # a NaN logit wins nothing and loses nothing: the accuracy is NaN, not 0
    chance = loss_fn(torch.zeros_like(real), torch.zeros_like(fake)).detach().float()
    margin, accuracy = diff.mean(0), wins.mean(0)  # per head
    out = {
        PREFIX + "paired_margin": margin.mean().item(),
        PREFIX + "paired_accuracy": accuracy.mean().item(),
        PREFIX + "loss_vs_chance": (loss.detach().float() / chance).item(),
    }
    for h in range(real.shape[1]):
        out[f"{PREFIX}paired_margin/h{h}"] = margin[h].item()
        out[f"{PREFIX}paired_accuracy/h{h}"] = accuracy[h].item()
    return out
