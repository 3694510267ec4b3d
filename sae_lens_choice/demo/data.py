"""The demo's data: SAELens's synthetic model, split three ways with fixed seeds.

Every batch has its own seed, from disjoint ranges per split and per run
seed, so every model sees the same training batches in the same order
whatever else draws random numbers, and the calibration and evaluation
splits are held out from training and from each other.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator

import torch
from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig, ZipfianFiringProbabilityConfig
from sae_lens.util import temporary_seed

from sae_lens_choice.demo.config import DemoConfig

__all__ = ["CALIBRATION", "EVAL", "TRAIN", "SyntheticData", "TrainProvider", "batch_seed"]

#: The three splits (batch i of split s is drawn with seed ``batch_seed(run_seed, s, i)``).
TRAIN, CALIBRATION, EVAL = 0, 1, 2


def batch_seed(run_seed: int, split: int, index: int) -> int:
    """A 32-bit seed for batch ``index`` of ``split`` in run ``run_seed``.

    torch's CPU generator keeps only the low 32 bits of a seed, so seeds are
    hashed into that range: offsets such as ``split << 40`` would all draw the
    same numbers (and did, in 0.1.0's demo: its held-out splits repeated the
    training batches).
    """
    digest = hashlib.blake2b(f"{run_seed}/{split}/{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class SyntheticData:
    """SAELens's synthetic model, with seeded, reproducible train/calibration/eval splits."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.model_cfg = SyntheticModelConfig(
            num_features=cfg.n_features,
            hidden_dim=cfg.d_in,
            firing_probability=ZipfianFiringProbabilityConfig(
                exponent=cfg.firing_zipf_exponent,
                max_prob=cfg.firing_max_prob,
                min_prob=cfg.firing_min_prob,
            ),
            std_firing_magnitudes=cfg.firing_magnitude_std,
            mean_firing_magnitudes=1.0,
            seed=cfg.seed,
        )
        self.model = SyntheticModel(self.model_cfg, device=cfg.device)
        self.model.feature_dict.eval()
        #: Seconds spent generating batches (kept out of training throughput).
        self.generation_seconds = 0.0

    @property
    def feature_vectors(self) -> torch.Tensor:
        """(n_features, d_in) the true features (the known dictionary)."""
        return self.model.feature_dict.feature_vectors.detach()

    @property
    def firing_probabilities(self) -> torch.Tensor:
        """(n_features,) each true feature's firing probability."""
        return self.model.activation_generator.firing_probabilities.detach()

    @torch.no_grad()
    def batch(self, split: int, index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden activations (size, d_in), true feature activations (size, n_features))."""
        start = time.perf_counter()
        with temporary_seed(batch_seed(self.cfg.seed, split, index)):
            features = self.model.activation_generator.sample(size)
            hidden = self.model.feature_dict(features)
        self.generation_seconds += time.perf_counter() - start
        return hidden, features

    @torch.no_grad()
    def split(self, split: int, n_samples: int) -> tuple[list[torch.Tensor], float]:
        """A held-out split as a list of batches, and its mean true L0."""
        batches, true_l0, n = [], 0.0, 0
        size = self.cfg.batch_size
        for index in range(math.ceil(n_samples / size)):
            b = min(size, n_samples - n)
            hidden, features = self.batch(split, index, b)
            batches.append(hidden)
            true_l0 += float((features > 0).sum())
            n += b
        return batches, true_l0 / max(n, 1)

    def train_provider(self) -> TrainProvider:
        """A fresh iterator over the training batches, from the first."""
        return TrainProvider(self)


class TrainProvider(Iterator[torch.Tensor]):
    """SAELens ``DataProvider``: training batch i is the same for every model."""

    def __init__(self, data: SyntheticData):
        self.data = data
        self.index = 0
        self.generation_seconds = 0.0

    def __iter__(self) -> TrainProvider:
        return self

    def __next__(self) -> torch.Tensor:
        before = self.data.generation_seconds
        hidden, _ = self.data.batch(TRAIN, self.index, self.data.cfg.batch_size)
        self.generation_seconds += self.data.generation_seconds - before
        self.index += 1
        return hidden
