"""What the toy study measures: a fixed feature space, Fréchet distance, a class-accuracy
classifier trained on true data, and within-class diversity.

* Features (:class:`FeatureMap`): a fixed random 3D conv (4 -> 16 channels, 3x3x3, seeded) and
  ReLU, average-pooled to ``(frames, 2, 2)``, a fixed random projection to 64 dimensions, then
  standardised with the mean / std of a fixed set of true samples. Nothing is trained, so the
  space is the same for every run and every method.
* Fréchet distance (:func:`frechet_distance`): ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``
  computed in float64 with the symmetric form ``tr((S1^(1/2) S2 S1^(1/2))^(1/2))``.
* Classifier (:func:`train_classifier`): a small CNN trained on fresh true samples, seeded.
* Diversity (:func:`diversity`): mean pairwise Euclidean distance between flattened latents of one
  class, averaged over the classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adm_megatron.toy.data import CHANNELS, FRAMES, HEIGHT, NUM_CLASSES, WIDTH, sample_dataset

FEATURE_DIM = 64
FEATURE_SEED = 20240
STANDARDISE_SEED = 777  # the true samples that fix the feature standardisation
STANDARDISE_PER_CLASS = 512


class FeatureMap:
    """``features(x [N, F, C, H, W]) -> [N, 64]``: fixed random conv features, standardised."""

    def __init__(self, seed: int = FEATURE_SEED):
        g = torch.Generator().manual_seed(seed)
        self.conv_w = torch.randn(16, CHANNELS, 3, 3, 3, generator=g, dtype=torch.float64) / (CHANNELS * 27) ** 0.5
        self.conv_b = 0.1 * torch.randn(16, generator=g, dtype=torch.float64)
        pooled = 16 * FRAMES * 2 * 2
        self.proj = torch.randn(pooled, FEATURE_DIM, generator=g, dtype=torch.float64) / pooled**0.5
        x, _ = sample_dataset(STANDARDISE_PER_CLASS, STANDARDISE_SEED)
        raw = self._raw(x)
        self.mean, self.std = raw.mean(0), raw.std(0).clamp_min(1e-6)

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64).permute(0, 2, 1, 3, 4)  # [N, C, F, H, W]
        h = F.relu(F.conv3d(x, self.conv_w, self.conv_b, padding=1))
        h = F.adaptive_avg_pool3d(h, (FRAMES, 2, 2)).flatten(1)
        return h @ self.proj

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = [self._raw(chunk) for chunk in x.split(1024)]
        return (torch.cat(out) - self.mean) / self.std


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FD between the Gaussians fitted to feature sets ``a [N, D]`` and ``b [M, D]`` (float64)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return float(value.clamp_min(0))


def per_class_frechet(a: torch.Tensor, la: torch.Tensor, b: torch.Tensor, lb: torch.Tensor) -> float:
    """FD computed within each class, averaged over the classes."""
    return sum(frechet_distance(a[la == k], b[lb == k]) for k in range(NUM_CLASSES)) / NUM_CLASSES


def diversity(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise Euclidean distance of flattened latents within a class, averaged over classes."""
    total = 0.0
    for k in range(NUM_CLASSES):
        z = x[labels == k].flatten(1).to(torch.float64)
        d = torch.cdist(z, z)
        n = z.shape[0]
        total += float(d.sum() / (n * (n - 1)))
    return total / NUM_CLASSES


class ToyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(FRAMES * CHANNELS, 32, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], FRAMES * CHANNELS, HEIGHT, WIDTH))


def train_classifier(steps: int = 300, batch: int = 256, seed: int = 99) -> ToyClassifier:
    """A classifier of the true data, trained on fresh samples (a few seconds on one core)."""
    from adm_megatron.toy.data import sample_latents

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyClassifier()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
        x = sample_latents(labels, g)
        loss = F.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: ToyClassifier, x: torch.Tensor, labels: torch.Tensor) -> float:
    pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(1024)])
    return float((pred == labels).float().mean())
