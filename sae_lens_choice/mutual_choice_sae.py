"""Mutual Choice SAEs: the batch keeps its round(k * N) largest pre-activations.

The selected set equals SAELens's ``batchtopk`` (Bussmann et al. 2024 is
concurrent work with the paper), so this module has the shape of SAELens's
``batchtopk_sae.py``: the activation, the training config, the training SAE
with a global threshold tracked during training, and export as SAELens's own
``jumprelu`` architecture. What this package adds is ``aux_zipf`` (the
paper's auxiliary loss; the default is SAELens's ``aux_k``, which the
convergence study measured better), exact thresholds on saving,
diagnostics, and a faster exact selection on CPU. The 0.1.0 inference architecture
(``"architecture": "mutual_choice"``) stays loadable.
"""

# No `from __future__ import annotations` here: SAELens's CLI (simple_parsing)
# resolves config field annotations such as `Capacity` at run time, in
# the modules of the base classes, where these aliases are not defined.

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from typing_extensions import override

from sae_lens_choice.allocation import (
    ChoicePairs,
    MutualChoiceMethod,
    floor_count,
    mutual_choice_pairs,
)
from sae_lens_choice.choice_base import (
    ChoiceActivation,
    ChoiceSAE,
    ChoiceSAEConfig,
    ChoiceTrainingSAE,
    ChoiceTrainingSAEConfig,
    threshold_summary,
)
from sae_lens_choice.distributed import global_smallest_value, mutual_choice_pairs_distributed
from sae_lens_choice.validation import check_choice, check_number

METHODS: tuple[str, ...] = ("auto", "candidates", "flat")

__all__ = [
    "MutualChoice",
    "MutualChoiceSAE",
    "MutualChoiceSAEConfig",
    "MutualChoiceTrainingSAE",
    "MutualChoiceTrainingSAEConfig",
]


@dataclass(eq=False, repr=False)
class MutualChoice(ChoiceActivation):
    """Keep the round(k * N) largest pre-activations of the batch.

    With ``latent_floor`` > 0, each latent first keeps its
    :func:`~sae_lens_choice.allocation.floor_count` largest ones.
    """

    k: float
    method: MutualChoiceMethod = "auto"
    validate: bool = True
    latent_floor: float = 0.0

    @override
    def pairs(self, hidden_pre: torch.Tensor) -> ChoicePairs:
        d_sae = hidden_pre.shape[-1]
        floor = floor_count(self.latent_floor, self.k, hidden_pre.numel() // d_sae, d_sae)
        return mutual_choice_pairs(
            hidden_pre, self.k, method=self.method, floor=floor, validate=self.validate
        )


@dataclass
class MutualChoiceFields:
    """The fields Mutual Choice adds to both its configs (training, 0.1.0 inference).

    Args:
        allocation_method (str): ``"auto"``, ``"candidates"`` or ``"flat"``;
            see :func:`sae_lens_choice.allocation.mutual_choice`.
    """

    allocation_method: MutualChoiceMethod = "auto"

    @classmethod
    def architecture(cls) -> str:
        """SAELens's architecture name."""
        return "mutual_choice"

    def validate_choice_fields(self) -> None:
        """The base config's checks, then this architecture's."""
        super().validate_choice_fields()  # type: ignore[misc]
        check_choice(
            self.allocation_method, "allocation_method", METHODS, owner="mutual_choice config"
        )


@dataclass
class MutualChoiceTrainingSAEConfig(MutualChoiceFields, ChoiceTrainingSAEConfig):
    """Configuration for training a Mutual Choice SAE (``architecture="mutual_choice"``).

    The batch keeps its round(k * N) largest pre-activations, wherever they
    fall (the same set as SAELens's ``batchtopk``). Defaults to ``aux_k``.
    Saved for inference as SAELens's ``jumprelu`` with one global threshold.

    Args:
        allocation_method (str): ``"auto"``, ``"candidates"`` or ``"flat"``;
            see :func:`sae_lens_choice.allocation.mutual_choice`.
        latent_floor (float): a Feature Choice floor under Mutual Choice, as a
            fraction of the uniform share k * N / d_sae: in every batch of N
            tokens each latent first keeps its ``floor(latent_floor * k * N /
            d_sae)`` largest pre-activations, and the rest of the round(k * N)
            go to the batch's largest remaining ones. 0 (the default) is plain
            Mutual Choice; 1 is close to uniform Feature Choice. With a floor
            the SAE is saved with one threshold per latent, calibrated to the
            latent's training firing density (the density EMA, scaled to sum
            to k), which the saved metadata keeps as ``latent_densities``.
            Not supported in data-parallel training.
    """

    latent_floor: float = 0.0

    @override
    def validate_choice_fields(self) -> None:
        super().validate_choice_fields()
        check_number(
            self.latent_floor,
            "latent_floor",
            owner="mutual_choice config",
            ge=0,
            le=1,
            hint="a fraction of the uniform share k * N / d_sae; 0 turns the floor off",
        )


class MutualChoiceTrainingSAE(ChoiceTrainingSAE):
    """Mutual Choice training SAE: the batch's round(k * N) largest pre-activations.

    Tracks one global threshold (an EMA of the smallest kept value, for
    logging); saved as SAELens's ``jumprelu`` with the exact global threshold
    of the most recent training tokens (see ``ChoiceTrainingSAE``). With a
    ``latent_floor``, one threshold per latent instead, calibrated to each
    latent's training density.
    """

    cfg: MutualChoiceTrainingSAEConfig  # type: ignore[assignment]
    activation_fn: MutualChoice

    def __init__(self, cfg: MutualChoiceTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def per_latent_thresholds(self) -> bool:
        return self.cfg.latent_floor > 0

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        # finiteness is tracked by the training step, not checked per batch
        cfg = self.cfg
        return MutualChoice(cfg.k, cfg.allocation_method, False, cfg.latent_floor)

    @override
    def select(self, scores: torch.Tensor, rank_sizes: list[int] | None = None) -> ChoicePairs:
        if rank_sizes is None:
            return self.activation_fn.pairs(scores)
        if self.cfg.latent_floor > 0:
            raise ValueError(
                "mutual_choice: latent_floor > 0 is not supported in data-parallel "
                "training yet; train on one process or set latent_floor=0"
            )
        method = self.cfg.allocation_method
        return mutual_choice_pairs_distributed(
            scores,
            self.cfg.k,
            rank_sizes=rank_sizes,
            method="full" if method == "flat" else method,
            validate=False,
        )

    @override
    def _update_thresholds(self, pairs: ChoicePairs) -> None:
        d_sae = self.cfg.d_sae if self.per_latent_thresholds() else None
        self._ema(self.threshold, global_smallest_value(pairs, d_sae))

    @override
    def _threshold_metrics(self) -> dict[str, torch.Tensor]:
        if self.per_latent_thresholds():
            return threshold_summary(self.threshold)
        return {"threshold": self.threshold}

    @override
    def calibration_target(self) -> Any:
        from sae_lens_choice.calibration import CalibrationTarget

        if not self.per_latent_thresholds():
            return CalibrationTarget(k=self.cfg.k)
        return CalibrationTarget(k=self.cfg.k, densities=self.training_densities())

    def training_densities(self) -> torch.Tensor:
        """(d_sae,) float64: each latent's firing density in training, summing to k.

        The density EMA, rescaled so the saved SAE's mean L0 is k: the targets
        of the per-latent thresholds a ``latent_floor`` SAE is saved with.
        """
        ema = self.latent_density_ema.detach().to(device="cpu", dtype=torch.float64)
        total = ema.sum()
        if not bool(total > 0):
            return torch.full_like(ema, self.cfg.k / self.cfg.d_sae)
        return ema * (self.cfg.k / total)

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        if self.per_latent_thresholds():
            # the targets are training state, not config: the saved metadata
            # carries them so calibrate_thresholds can recalibrate the saved SAE
            self.cfg.metadata.latent_densities = self.training_densities().tolist()


# ---------------------------------------------------------------------------
# the 0.1.0 inference architecture
# ---------------------------------------------------------------------------


@dataclass
class MutualChoiceSAEConfig(MutualChoiceFields, ChoiceSAEConfig):
    """0.1.0 inference config (``"architecture": "mutual_choice"``), kept for loading.

    Args:
        allocation_method (str): batch-mode method, see
            :func:`sae_lens_choice.allocation.mutual_choice`.
    """


class MutualChoiceSAE(ChoiceSAE):
    """0.1.0 Mutual Choice inference SAE: one global threshold (T-th largest value).

    Threshold mode is a JumpReLU whose ``threshold`` (d_sae,) holds the same
    value for every latent; batch mode keeps the round(k * N) largest
    pre-activations of the batch. New SAEs are saved as SAELens's
    ``jumprelu``; this class loads folders saved by 0.1.0.
    """

    cfg: MutualChoiceSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: MutualChoiceSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)  # type: ignore[arg-type]  (TopKSAE's decoding, our config)

    @override
    def batch_activation(self) -> MutualChoice:
        return MutualChoice(self.cfg.k, self.cfg.allocation_method)
