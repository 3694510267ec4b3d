"""Inference SAEs for SAELens: per-token encoders for Mutual and Feature Choice.

Allocation in training depends on the whole batch. Downstream tools encode one
token at a time, so each inference SAE is a JumpReLU on ``hidden_pre``: a
latent fires when its pre-activation is strictly above its threshold, exactly
like SAELens's ``JumpReLUSAE`` (``relu(h) * (h > threshold)``). Mutual Choice
has one global threshold (stored once per latent, all equal, so that folding
decoder norms stays exact); Feature Choice one per latent.

``inference_mode="batch"`` instead reproduces the training allocation over
the batch given (config field, switchable after loading:
``sae.cfg.inference_mode = "batch"``).

Thresholds come from training (an EMA) and can be recomputed exactly from
held-out activations with :func:`sae_lens_choice.calibrate_thresholds`;
:func:`sae_lens_choice.to_jumprelu` turns either SAE into SAELens's own
``JumpReLUSAE`` with identical outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

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
_METHODS = ("auto", "candidates", "flat")
_CAPACITIES = ("zipf", "uniform")

# Default of fields that every saved config must state (no sensible default).
_REQUIRED: Any = None


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

    def draw_capacities(self, hidden_pre: torch.Tensor) -> tuple[torch.Tensor, FeatureChoicePlan]:
        """This batch's integer capacities (rounded afresh, kept in ``last_capacities``) and plan."""
        n_tokens = hidden_pre.numel() // hidden_pre.shape[-1]
        c, plan = self.capacities_and_plan(n_tokens, hidden_pre.device)
        capacities = round_capacities(c, generator=self.generator)
        self.last_capacities = capacities
        return capacities, plan

    @override
    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        capacities, plan = self.draw_capacities(hidden_pre)
        return feature_choice(hidden_pre, capacities, plan=plan, validate=self.validate)


def choice_hidden_pre(sae: SAE[Any], sae_in: torch.Tensor) -> torch.Tensor:
    """Pre-activations exactly as SAELens's TopK computes them.

    ``sae_in @ W_enc + b_enc`` through ``hook_sae_acts_pre``, times the decoder
    row norms when ``rescale_acts_by_decoder_norm`` (so the allocation sees
    each latent's contribution as if its decoder row had unit norm).
    """
    b_enc: torch.Tensor = sae.b_enc  # type: ignore[assignment]  (subclass parameter)
    hidden_pre = sae.hook_sae_acts_pre(sae_in @ sae.W_enc + b_enc)
    if sae.cfg.rescale_acts_by_decoder_norm:
        hidden_pre = hidden_pre * sae.W_dec.norm(dim=-1)
    return hidden_pre


def jumprelu(hidden_pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """SAELens JumpReLU semantics: ``relu(h)`` where ``h > threshold``, else 0."""
    return hidden_pre.relu() * (hidden_pre > threshold).to(hidden_pre.dtype)


# ---------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class _ChoiceSAEConfig(SAEConfig):
    """Fields shared by the Mutual and Feature Choice inference configs.

    Every field is validated on construction (so also when SAELens loads a
    ``cfg.json``); an invalid or missing value raises ``ValueError`` naming
    the field.

    Args:
        k (float): Expected L0 per token the SAE was trained (and calibrated)
            for. Required: a config without it is rejected.
        rescale_acts_by_decoder_norm (bool): Multiply pre-activations by decoder
            row norms (as in TopK). Saved SAEs have the norms folded in, so
            this is then a no-op.
        inference_mode (str): ``"threshold"`` (per-token JumpReLU, default) or
            ``"batch"`` (the exact training allocation over the batch given).
    """

    k: float = _REQUIRED
    rescale_acts_by_decoder_norm: bool = False
    inference_mode: InferenceMode = "threshold"

    def _fail(self, field_name: str, message: str) -> NoReturn:
        raise ValueError(f"{self.architecture()} config: {field_name} {message}")

    def __post_init__(self):
        super().__post_init__()
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                self._fail(name, f"must be a positive integer, got {value!r}")
        if self.k is None:
            self._fail(
                "k",
                "is missing: the config must state k, the expected L0 per token the "
                "SAE was trained for",
            )
        if not _is_number(self.k) or not math.isfinite(self.k) or not self.k > 0:
            self._fail("k", f"must be a finite number > 0, got {self.k!r}")
        if self.k > self.d_sae:
            self._fail("k", f"= {self.k} is larger than d_sae = {self.d_sae}; use k <= d_sae")
        if not isinstance(self.rescale_acts_by_decoder_norm, bool):
            self._fail(
                "rescale_acts_by_decoder_norm",
                f"must be true or false, got {self.rescale_acts_by_decoder_norm!r}",
            )
        if not isinstance(self.apply_b_dec_to_input, bool):
            self._fail(
                "apply_b_dec_to_input", f"must be true or false, got {self.apply_b_dec_to_input!r}"
            )
        if self.inference_mode not in _MODES:
            self._fail("inference_mode", f"must be one of {_MODES}, got {self.inference_mode!r}")


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

    @override
    def __post_init__(self):
        super().__post_init__()
        if self.allocation_method not in _METHODS:
            self._fail(
                "allocation_method", f"must be one of {_METHODS}, got {self.allocation_method!r}"
            )


@dataclass
class FeatureChoiceSAEConfig(_ChoiceSAEConfig):
    """Inference config for a Feature Choice SAE (``architecture="feature_choice"``).

    The capacity fields matter for batch mode and for
    :func:`~sae_lens_choice.calibrate_thresholds` (target densities); their
    defaults are the training defaults.

    Args:
        capacity (str): ``"zipf"`` or ``"uniform"``, as in training.
        zipf_alpha (float): Zipf exponent of the capacities, > 0.
        zipf_beta (float): Zipf–Mandelbrot offset of the capacities, > -1.
    """

    capacity: Capacity = "zipf"
    zipf_alpha: float = 1.0
    zipf_beta: float = 0.0

    @override
    @classmethod
    def architecture(cls) -> str:
        return "feature_choice"

    @override
    def __post_init__(self):
        super().__post_init__()
        if self.capacity not in _CAPACITIES:
            self._fail("capacity", f"must be one of {_CAPACITIES}, got {self.capacity!r}")
        alpha, beta = self.zipf_alpha, self.zipf_beta
        if not _is_number(alpha) or not math.isfinite(alpha) or not alpha > 0:
            self._fail("zipf_alpha", f"must be a finite number > 0, got {alpha!r}")
        if not _is_number(beta) or not math.isfinite(beta) or not beta > -1:
            self._fail("zipf_beta", f"must be a finite number > -1, got {beta!r}")


# ---------------------------------------------------------------------------
# inference SAEs
# ---------------------------------------------------------------------------


class _ChoiceSAE(SAE[Any]):
    """JumpReLU encoder with choice thresholds, plus an exact batch mode."""

    cfg: _ChoiceSAEConfig
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
        """A fresh training allocation module for the current config (batch mode)."""
        raise NotImplementedError

    def _batch_key(self) -> tuple[Any, ...]:
        """Config values the batch allocation depends on."""
        raise NotImplementedError

    def _current_batch_activation(self) -> nn.Module:
        # The config may be edited after loading (k, capacity, ...): rebuild the
        # allocation when it changed, otherwise keep it (its plan cache is costly).
        key = self._batch_key()
        if getattr(self, "_batch_activation_key", None) != key:
            self.activation_fn = self.batch_activation()
            self._batch_activation_key = key
        return self.activation_fn

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        fn = self.batch_activation()
        self._batch_activation_key = self._batch_key()
        return fn

    def encode_hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``hidden_pre`` (..., d_sae), in threshold units."""
        return choice_hidden_pre(self, self.process_sae_in(x))

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations (..., d_sae).

        ``inference_mode == "threshold"`` (default): per token,
        ``relu(hidden_pre) * (hidden_pre > threshold)``, exactly the computation
        of SAELens's ``JumpReLUSAE.encode`` (strict ``>``; its base activation is
        ``relu``), with ``hidden_pre`` as SAELens's TopK computes it (times the
        decoder row norms when ``rescale_acts_by_decoder_norm``).
        :func:`sae_lens_choice.to_jumprelu` gives an identical ``JumpReLUSAE``.

        ``inference_mode == "batch"``: the training allocation over all tokens
        in ``x`` (leading dimensions flattened), so a token's code depends on
        the rest of the batch. Raises ``ValueError`` if ``hidden_pre`` holds
        NaN or inf.
        """
        hidden_pre = self.encode_hidden_pre(x)
        if self.cfg.inference_mode == "batch":
            acts = self._current_batch_activation()(hidden_pre)
        elif self.cfg.inference_mode == "threshold":
            acts = jumprelu(hidden_pre, self.threshold)
        else:
            raise ValueError(
                f"{self.cfg.architecture()}: cfg.inference_mode must be one of {_MODES}, "
                f"got {self.cfg.inference_mode!r}"
            )
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

    def expected_state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every tensor a saved state dict must hold."""
        d_in, d_sae = self.cfg.d_in, self.cfg.d_sae
        return {
            "W_enc": (d_in, d_sae),
            "b_enc": (d_sae,),
            "W_dec": (d_sae, d_in),
            "b_dec": (d_in,),
            "threshold": (d_sae,),
        }

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Check the loaded tensors against the config before assigning them.

        Raises ``ValueError`` naming the tensor when one is missing, unexpected,
        of the wrong shape, or (for ``threshold``) NaN. A Mutual Choice
        checkpoint may store its global threshold as a scalar; it is expanded.
        """
        super().process_state_dict_for_loading(state_dict)
        arch = self.cfg.architecture()
        expected = self.expected_state_shapes()
        missing = [name for name in expected if name not in state_dict]
        if missing:
            raise ValueError(
                f"{arch} SAE weights are missing tensor(s) {missing}; the file must hold "
                f"{sorted(expected)}"
            )
        unexpected = [name for name in state_dict if name not in expected]
        if unexpected:
            raise ValueError(
                f"{arch} SAE weights hold unexpected tensor(s) {unexpected}; expected "
                f"exactly {sorted(expected)} (was this saved from a different architecture?)"
            )
        threshold = state_dict["threshold"]
        if arch == "mutual_choice" and threshold.numel() == 1 and threshold.ndim <= 1:
            state_dict["threshold"] = threshold.reshape(()).expand(self.cfg.d_sae).clone()
        for name, shape in expected.items():
            actual = tuple(state_dict[name].shape)
            if actual != shape:
                raise ValueError(
                    f"{arch} SAE weights: tensor {name!r} has shape {actual}, but the config "
                    f"(d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}) needs {shape}"
                )
        if bool(torch.isnan(state_dict["threshold"]).any()):
            n_nan = int(torch.isnan(state_dict["threshold"]).sum())
            raise ValueError(
                f"{arch} SAE weights: tensor 'threshold' holds {n_nan} NaN value(s); "
                "recalibrate with sae_lens_choice.calibrate_thresholds"
            )

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Fold decoder norms into the encoder, moving thresholds with them."""
        norms = self.fold_and_get_W_dec_norm()
        if not self.cfg.rescale_acts_by_decoder_norm:
            # hidden_pre of latent j just grew by |W_dec_j|.
            self.threshold.mul_(norms.to(self.threshold.dtype))
        # With rescaling on, hidden_pre = raw * |W_dec| is unchanged by the fold
        # (raw grew by |W_dec|, the norms are now 1), so thresholds stay.

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if self.cfg.rescale_acts_by_decoder_norm:
            # W_enc grew by s, |W_dec| shrank by s: hidden_pre is unchanged
            # before the norm factor and shrinks by s after it.
            self.threshold.div_(scaling_factor)

    @override
    @torch.no_grad()
    def fold_activation_whitening(
        self,
        mean: torch.Tensor,
        whitening_matrix: torch.Tensor,
        unwhitening_matrix: torch.Tensor,
    ) -> None:
        if self.cfg.rescale_acts_by_decoder_norm:
            # Unwhitening changes decoder row norms, hence hidden_pre; folding the
            # norms first (thresholds unchanged, see fold_W_dec_norm) makes the
            # encoder independent of them, as SAELens's TopK does.
            self.fold_W_dec_norm()
            self.cfg.rescale_acts_by_decoder_norm = False
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)


class MutualChoiceSAE(_ChoiceSAE):
    """Mutual Choice inference SAE: one global threshold (T-th largest value).

    Threshold mode is a JumpReLU whose ``threshold`` (d_sae,) holds the same
    value for every latent; batch mode keeps the round(k * N) largest
    pre-activations of the batch.
    """

    cfg: MutualChoiceSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: MutualChoiceSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def batch_activation(self) -> nn.Module:
        return MutualChoice(self.cfg.k, self.cfg.allocation_method)

    @override
    def _batch_key(self) -> tuple[Any, ...]:
        return (self.cfg.k, self.cfg.allocation_method)


class FeatureChoiceSAE(_ChoiceSAE):
    """Feature Choice inference SAE: one threshold per latent.

    Batch mode gives latent j its m_j largest tokens of the batch, the integer
    capacities m_j rounded from the expected ones as in training (systematic
    rounding). Training draws the rounding offset at random each batch; here it
    comes from a generator seeded with ``batch_rounding_seed`` on every call,
    so encoding is a deterministic function of the batch (``use_error_term``
    and repeated runs agree). Set ``batch_rounding_seed = None`` to draw from
    torch's global RNG as training does.
    """

    cfg: FeatureChoiceSAEConfig  # type: ignore[assignment]
    batch_rounding_seed: int | None = 0

    def __init__(self, cfg: FeatureChoiceSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def batch_activation(self) -> nn.Module:
        return FeatureChoice(
            self.cfg.k, self.cfg.d_sae, self.cfg.capacity, self.cfg.zipf_alpha, self.cfg.zipf_beta
        )

    @override
    def _batch_key(self) -> tuple[Any, ...]:
        cfg = self.cfg
        return (cfg.k, cfg.d_sae, cfg.capacity, cfg.zipf_alpha, cfg.zipf_beta)

    @override
    def _current_batch_activation(self) -> nn.Module:
        fn = super()._current_batch_activation()
        assert isinstance(fn, FeatureChoice)
        seed = self.batch_rounding_seed
        fn.generator = None if seed is None else torch.Generator().manual_seed(seed)
        return fn
