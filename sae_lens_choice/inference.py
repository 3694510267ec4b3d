"""Inference SAEs for SAELens: per-token encoders for Mutual and Feature Choice.

Allocation in training depends on the whole batch. Downstream tools encode one
token at a time, so each inference SAE is a JumpReLU on ``hidden_pre``: a
latent fires when its pre-activation is strictly above its threshold, exactly
like SAELens's ``JumpReLUSAE`` (``relu(h) * (h > threshold)``). Mutual Choice
has one global threshold (stored once per latent, all equal, so that folding
decoder norms stays exact); Feature Choice one per latent.

``inference_mode="batch"`` instead reproduces the training allocation over
the batch given (config field, switchable after loading).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from sae_lens.saes.sae import SAE, SAEConfig
from sae_lens.saes.topk_sae import act_times_W_dec
from torch import nn
from typing_extensions import override

from sae_lens_choice.allocation import (
    FeatureChoicePlan,
    MutualChoiceMethod,
    capacity_bounds,
    feature_choice,
    mutual_choice,
    plan_feature_choice,
    round_capacities,
    uniform_capacities,
    zipf_capacities,
)

InferenceMode = Literal["threshold", "batch"]
Capacity = Literal["zipf", "uniform"]

_MODES = ("threshold", "batch")


# ---------------------------------------------------------------------------
# activations shared by training and batch-mode inference
# ---------------------------------------------------------------------------


class MutualChoice(nn.Module):
    """Keep the round(k * N) largest pre-activations of the batch."""

    def __init__(self, k: float, method: MutualChoiceMethod = "auto", validate: bool = True):
        super().__init__()
        self.k = k
        self.method: MutualChoiceMethod = method
        self.validate = validate

    @override
    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return mutual_choice(hidden_pre, self.k, method=self.method, validate=self.validate)


class FeatureChoice(nn.Module):
    """Latent j keeps its m_j largest tokens; m_j rounded afresh for every batch.

    Expected capacities depend on the number of tokens N, so they (and the
    grouping plan) are computed once per N and cached.
    """

    def __init__(
        self,
        k: float,
        d_sae: int,
        capacity: Capacity = "zipf",
        zipf_alpha: float = 1.0,
        zipf_beta: float = 0.0,
        validate: bool = True,
    ):
        super().__init__()
        self.k = k
        self.d_sae = d_sae
        self.capacity: Capacity = capacity
        self.zipf_alpha = zipf_alpha
        self.zipf_beta = zipf_beta
        self.validate = validate
        self.generator: torch.Generator | None = None
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, FeatureChoicePlan]] = {}
        self.last_capacities: torch.Tensor | None = None

    def expected_capacities(self, n_tokens: int) -> torch.Tensor:
        """Real-valued expected tokens per latent for ``n_tokens`` tokens (float64, CPU)."""
        if self.capacity == "uniform":
            return uniform_capacities(n_tokens, self.d_sae, self.k)
        return zipf_capacities(n_tokens, self.d_sae, self.k, self.zipf_alpha, self.zipf_beta)

    def capacities_and_plan(
        self, n_tokens: int, device: torch.device
    ) -> tuple[torch.Tensor, FeatureChoicePlan]:
        """Expected capacities on ``device`` and the grouping plan, cached per N."""
        key = (n_tokens, str(device))
        if key not in self._cache:
            c = self.expected_capacities(n_tokens)
            plan = plan_feature_choice(capacity_bounds(c, n_tokens), n_tokens)
            if plan.order is not None:
                plan = FeatureChoicePlan(
                    plan.d_sae, plan.n_tokens, plan.groups, plan.order.to(device)
                )
            self._cache[key] = (c.to(device), plan)
        return self._cache[key]

    @override
    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        n_tokens = hidden_pre.numel() // hidden_pre.shape[-1]
        c, plan = self.capacities_and_plan(n_tokens, hidden_pre.device)
        capacities = round_capacities(c, generator=self.generator)
        self.last_capacities = capacities
        return feature_choice(hidden_pre, capacities, plan=plan, validate=self.validate)


def choice_hidden_pre(sae: SAE[Any], sae_in: torch.Tensor) -> torch.Tensor:
    """Pre-activations exactly as SAELens's TopK computes them.

    ``sae_in @ W_enc + b_enc`` through ``hook_sae_acts_pre``, times the decoder
    row norms when ``rescale_acts_by_decoder_norm`` (so the allocation sees
    each latent's contribution as if its decoder row had unit norm).
    """
    hidden_pre = sae.hook_sae_acts_pre(sae_in @ sae.W_enc + sae.b_enc)
    if sae.cfg.rescale_acts_by_decoder_norm:
        hidden_pre = hidden_pre * sae.W_dec.norm(dim=-1)
    return hidden_pre


def jumprelu(hidden_pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """SAELens JumpReLU semantics: ``relu(h)`` where ``h > threshold``, else 0."""
    return hidden_pre.relu() * (hidden_pre > threshold).to(hidden_pre.dtype)


# ---------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------


@dataclass
class _ChoiceSAEConfig(SAEConfig):
    """Fields shared by the Mutual and Feature Choice inference configs.

    Args:
        k (float): Expected L0 per token the SAE was trained (and calibrated) for.
        rescale_acts_by_decoder_norm (bool): Multiply pre-activations by decoder
            row norms (as in TopK). Saved SAEs have the norms folded in, so
            this is then a no-op.
        inference_mode (str): ``"threshold"`` (per-token JumpReLU, default) or
            ``"batch"`` (the exact training allocation over the batch given).
    """

    k: float = 32
    rescale_acts_by_decoder_norm: bool = False
    inference_mode: InferenceMode = "threshold"

    def __post_init__(self):
        super().__post_init__()
        arch = self.architecture()
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or not self.k > 0:
            raise ValueError(f"{arch} config: k must be a number > 0, got {self.k!r}")
        if self.k > self.d_sae:
            raise ValueError(f"{arch} config: k = {self.k} is larger than d_sae = {self.d_sae}")
        if self.inference_mode not in _MODES:
            raise ValueError(
                f"{arch} config: inference_mode must be one of {_MODES}, got {self.inference_mode!r}"
            )


@dataclass
class MutualChoiceSAEConfig(_ChoiceSAEConfig):
    """Inference config for a Mutual Choice SAE (``architecture="mutual_choice"``).

    Args:
        allocation_method (str): batch-mode method, see
            :func:`sae_lens_choice.allocation.mutual_choice`.
    """

    allocation_method: MutualChoiceMethod = "auto"

    @override
    @classmethod
    def architecture(cls) -> str:
        return "mutual_choice"


@dataclass
class FeatureChoiceSAEConfig(_ChoiceSAEConfig):
    """Inference config for a Feature Choice SAE (``architecture="feature_choice"``).

    Args:
        capacity (str): ``"zipf"`` or ``"uniform"``, as in training (batch mode).
        zipf_alpha (float): Zipf exponent of the capacities.
        zipf_beta (float): Zipf–Mandelbrot offset of the capacities.
    """

    capacity: Capacity = "zipf"
    zipf_alpha: float = 1.0
    zipf_beta: float = 0.0

    @override
    @classmethod
    def architecture(cls) -> str:
        return "feature_choice"


# ---------------------------------------------------------------------------
# inference SAEs
# ---------------------------------------------------------------------------


class _ChoiceSAE(SAE[Any]):
    """JumpReLU encoder with choice thresholds, plus an exact batch mode."""

    b_enc: nn.Parameter
    threshold: torch.Tensor

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))
        self.register_buffer(
            "threshold", torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device)
        )

    def batch_activation(self) -> nn.Module:
        """The training allocation, used when ``inference_mode == "batch"``."""
        raise NotImplementedError

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.batch_activation()

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations: JumpReLU on thresholds, or the batch allocation."""
        sae_in = self.process_sae_in(x)
        hidden_pre = choice_hidden_pre(self, sae_in)
        if self.cfg.inference_mode == "batch":
            acts = self.activation_fn(hidden_pre)
        else:
            acts = jumprelu(hidden_pre, self.threshold)
        return self.hook_sae_acts_post(acts)

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Reconstruct the input, as SAELens's TopK SAE decodes."""
        sae_out_pre = (
            act_times_W_dec(feature_acts, self.W_dec, self.cfg.rescale_acts_by_decoder_norm)
            + self.b_dec
        )
        sae_out_pre = self.hook_sae_recons(sae_out_pre)
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)
        return self.reshape_fn_out(sae_out_pre, self.d_head)

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Fold decoder norms into the encoder, moving thresholds with them."""
        norms = self.fold_and_get_W_dec_norm()
        if not self.cfg.rescale_acts_by_decoder_norm:
            # hidden_pre of latent j just grew by |W_dec_j|.
            self.threshold.mul_(norms.to(self.threshold.dtype))

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if self.cfg.rescale_acts_by_decoder_norm:
            # W_enc grew by s, |W_dec| shrank by s: hidden_pre is unchanged
            # before the norm factor and shrinks by s after it.
            self.threshold.div_(scaling_factor)


class MutualChoiceSAE(_ChoiceSAE):
    """Mutual Choice inference SAE: one global threshold (T-th largest value)."""

    cfg: MutualChoiceSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: MutualChoiceSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def batch_activation(self) -> nn.Module:
        return MutualChoice(self.cfg.k, self.cfg.allocation_method)


class FeatureChoiceSAE(_ChoiceSAE):
    """Feature Choice inference SAE: one threshold per latent."""

    cfg: FeatureChoiceSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: FeatureChoiceSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def batch_activation(self) -> nn.Module:
        return FeatureChoice(
            self.cfg.k, self.cfg.d_sae, self.cfg.capacity, self.cfg.zipf_alpha, self.cfg.zipf_beta
        )
