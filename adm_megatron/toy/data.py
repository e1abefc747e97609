"""A synthetic, class-conditional video-latent distribution whose structure is known.

Latents are ``[F, C, H, W] = [3, 4, 8, 8]`` (CogVideoX layout: frames, latent channels, height,
width). Each of ``K = 8`` classes is one moving pattern:

* even classes: a round Gaussian blob; odd classes: a stripe (a bar across the frame, vertical for
  classes 1 and 5, horizontal for 3 and 7) -- the class fixes the shape;
* the start position lies on a ring of radius 2 around the centre at angle ``2 pi k / 8`` and the
  pattern moves one pixel per frame along the ring's tangent (stripes: along their normal) -- the
  class fixes position and velocity;
* a class "colour": a fixed mix over the 4 latent channels (``COLOURS``), scaled so the
  latents have about unit variance overall (std 0.94), as a VAE's scaled latents do. (At half that
  scale most of the noise schedule hides the patterns: distillation losses, which see the data only
  through noise levels t >= their smallest t, then leave fine structure unconstrained.)

Random nuisance, drawn per sample: start jitter uniform in ``[-1, 1]`` px in each axis, speed
factor uniform in ``[0.7, 1.3]``, amplitude uniform in ``[0.7, 1.3]``, width (Gaussian sigma)
uniform in ``[0.9, 1.4]`` px, and iid pixel noise of std 0.1. Everything is a pure function of
the labels and a ``torch.Generator``, so a seeded draw is reproducible bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NUM_CLASSES = 8
FRAMES, CHANNELS, HEIGHT, WIDTH = 3, 4, 8, 8
LATENT_SHAPE = (FRAMES, CHANNELS, HEIGHT, WIDTH)

# the class colour: a mix over the 4 latent channels (each row has unit-ish norm, x SCALE)
COLOURS = torch.tensor([
    [1.0, 0.5, 0.0, 0.0],
    [0.0, 1.0, 0.5, 0.0],
    [0.0, 0.0, 1.0, 0.5],
    [0.5, 0.0, 0.0, 1.0],
    [1.0, 0.0, -0.5, 0.0],
    [0.0, 1.0, 0.0, -0.5],
    [-0.5, 0.0, 1.0, 0.0],
    [0.0, -0.5, 0.0, 1.0],
], dtype=torch.float64)
SCALE = 5.0
RING_RADIUS = 2.0
SPEED = 1.0  # px per frame
JITTER = 1.0  # start position, uniform in [-JITTER, JITTER] px
SPEED_RANGE = (0.7, 1.3)
AMPLITUDE_RANGE = (0.7, 1.3)
WIDTH_RANGE = (0.9, 1.4)
PIXEL_NOISE = 0.1


@dataclass(frozen=True)
class ClassPattern:
    shape: str  # 'blob' | 'vstripe' (varies along x) | 'hstripe' (varies along y)
    start: tuple[float, float]  # (y, x) at frame 0 before jitter
    velocity: tuple[float, float]  # (vy, vx) px per frame
    colour: tuple[float, ...]


def class_pattern(k: int) -> ClassPattern:
    """The fixed structure of class ``k`` (see the module docstring)."""
    if not 0 <= k < NUM_CLASSES:
        raise ValueError(f"class must be in [0, {NUM_CLASSES}), got {k}")
    angle = 2 * math.pi * k / NUM_CLASSES
    cy, cx = (HEIGHT - 1) / 2, (WIDTH - 1) / 2
    start = (cy + RING_RADIUS * math.sin(angle), cx + RING_RADIUS * math.cos(angle))
    tangent = (SPEED * math.cos(angle), -SPEED * math.sin(angle))
    if k % 2 == 0:
        shape, velocity = "blob", tangent
    elif k % 4 == 1:  # a vertical bar (profile along x) moves along x
        shape, velocity = "vstripe", (0.0, SPEED if k < 4 else -SPEED)
    else:  # a horizontal bar (profile along y) moves along y
        shape, velocity = "hstripe", (SPEED if k < 4 else -SPEED, 0.0)
    colour = tuple((SCALE * COLOURS[k] / COLOURS[k].norm()).tolist())
    return ClassPattern(shape, start, velocity, colour)


PATTERNS = tuple(class_pattern(k) for k in range(NUM_CLASSES))


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def sample_latents(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Latents ``[N, F, C, H, W]`` (float32) of the classes in ``labels`` ``[N]``.

    The nuisance variables are drawn from ``generator`` in a fixed order, so the result depends
    only on ``labels`` and the generator's state."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be in [0, {NUM_CLASSES})")
    n = labels.numel()
    jitter = _uniform(2 * n, -JITTER, JITTER, generator).view(n, 2)
    speed = _uniform(n, *SPEED_RANGE, generator)
    amplitude = _uniform(n, *AMPLITUDE_RANGE, generator)
    width = _uniform(n, *WIDTH_RANGE, generator)
    noise = torch.randn(n, *LATENT_SHAPE, generator=generator, dtype=torch.float64)

    start = torch.tensor([p.start for p in PATTERNS], dtype=torch.float64)[labels] + jitter
    velocity = torch.tensor([p.velocity for p in PATTERNS], dtype=torch.float64)[labels] * speed[:, None]
    colour = torch.tensor([p.colour for p in PATTERNS], dtype=torch.float64)[labels]
    kind = torch.tensor([("blob", "vstripe", "hstripe").index(p.shape) for p in PATTERNS])[labels]

    f = torch.arange(FRAMES, dtype=torch.float64).view(1, FRAMES, 1, 1)
    pos_y = (start[:, 0].view(n, 1, 1, 1) + velocity[:, 0].view(n, 1, 1, 1) * f)
    pos_x = (start[:, 1].view(n, 1, 1, 1) + velocity[:, 1].view(n, 1, 1, 1) * f)
    yy = torch.arange(HEIGHT, dtype=torch.float64).view(1, 1, HEIGHT, 1)
    xx = torch.arange(WIDTH, dtype=torch.float64).view(1, 1, 1, WIDTH)
    dy2, dx2 = (yy - pos_y) ** 2, (xx - pos_x) ** 2
    kind = kind.view(n, 1, 1, 1)
    dist2 = torch.where(kind == 0, dy2 + dx2, torch.where(kind == 1, dx2.expand_as(dy2 + dx2),
                                                          dy2.expand_as(dy2 + dx2)))
    profile = amplitude.view(n, 1, 1, 1) * torch.exp(-dist2 / (2 * width.view(n, 1, 1, 1) ** 2))
    x = profile[:, :, None] * colour.view(n, 1, CHANNELS, 1, 1) + PIXEL_NOISE * noise
    return x.to(torch.float32)


def balanced_labels(per_class: int) -> torch.Tensor:
    """``[K * per_class]``: ``per_class`` of each class, class-major (0, 0, ..., 1, 1, ...)."""
    return torch.arange(NUM_CLASSES).repeat_interleave(per_class)


def sample_dataset(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A balanced, seeded set of true samples: ``(latents [K * per_class, F, C, H, W], labels)``."""
    labels = balanced_labels(per_class)
    return sample_latents(labels, torch.Generator().manual_seed(seed)), labels


def class_embeddings(seq_len: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The text condition: one fixed random embedding ``[L, D]`` per class (unit-variance entries,
    like T5 outputs) and the negative / unconditional embedding (all zeros).

    Returns ``(embeddings [K, L, D], negative [L, D])``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_CLASSES, seq_len, dim, generator=g), torch.zeros(seq_len, dim)


def class_prompts() -> list[str]:
    return [f"class {k}" for k in range(NUM_CLASSES)]
