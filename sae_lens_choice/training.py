"""Training SAEs for SAELens: Mutual Choice and Feature Choice.

Both subclass SAELens's TopK training SAE, so the encoder follows TopK's
conventions (``b_enc`` init, ``rescale_acts_by_decoder_norm``,
``decoder_init_norm``, decode through ``act_times_W_dec``); only the activation
(the allocation over the whole batch) and the auxiliary loss differ.

State kept outside autocast, in the checkpoint:

- ``latent_density_ema`` (float32, F): EMA of each latent's firing density,
  initialised at the average density k / F.
- ``threshold`` (float64): the inference threshold(s), an EMA of the smallest
  kept value (global for Mutual Choice, per latent for Feature Choice).
- ``threshold_updates`` (int64, scalar for Mutual Choice, per latent for
  Feature Choice): how many batches fed each EMA; the first update sets it
  directly, so no warm-up from zero.
- ``zipf_fit`` (float64, 4): alpha, beta, log C, R^2 of the latest fit of the
  density curve, refreshed every ``zipf_refit_every`` steps (aux_zipf only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal, NoReturn

import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from typing_extensions import override

from sae_lens_choice.allocation import (
    MutualChoiceMethod,
    check_finite,
    feature_choice_with_stats,
    mutual_choice_with_stats,
)
from sae_lens_choice.inference import FeatureChoice, MutualChoice, choice_hidden_pre
from sae_lens_choice.losses import aux_candidate_mask, aux_reconstruction_loss
from sae_lens_choice.zipf import ZipfFit, fit_zipf, underused_mask

AuxLoss = Literal["none", "aux_k", "aux_zipf"]
Capacity = Literal["zipf", "uniform"]

_AUX_LOSSES = ("none", "aux_k", "aux_zipf")
_CAPACITIES = ("zipf", "uniform")
_METHODS = ("auto", "candidates", "flat")


# ---------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------


@dataclass
class _ChoiceTrainingSAEConfig(TopKTrainingSAEConfig):
    """Fields shared by the Mutual Choice and Feature Choice training configs.

    Args:
        k (float): Expected L0 per token. The batch keeps T = round(k * N)
            (token, latent) pairs; a token's own L0 varies around k.
        aux_loss (str): ``"none"``, ``"aux_k"`` (dead latents reconstruct the
            residual, as SAELens's TopK) or ``"aux_zipf"`` (dead plus
            under-used latents by the fitted Zipf curve).
        aux_loss_coefficient (float): Multiplies the auxiliary loss.
        zipf_underuse_ratio (float): gamma in [0, 1]: a latent is under-used
            when its density is below gamma times the fitted Zipf curve at its
            rank. 0 makes aux_zipf equal to aux_k.
        zipf_fit_rank_window (tuple[float, float]): ranks the Zipf curve is
            fitted on, as fractions of d_sae (head and tail excluded).
        zipf_refit_every (int): steps between refits of the Zipf curve.
        density_ema_decay (float): decay of the per-latent firing-density EMA
            (initialised at k / d_sae). Its memory is about 1 / (1 - decay)
            steps: 0.99 suits long runs; for runs of a few hundred steps use
            ~0.9, or the EMA is still near its start and flags few latents.
        threshold_ema_rate (float): weight of the new batch in the threshold EMA.
        check_finite_every (int): every this many steps (and on logging steps)
            the pre-activations are checked for NaN/inf, which reads one flag
            back from the device; 0 checks on logging steps only.
    """

    k: float = 32  # type: ignore[assignment]
    aux_loss: AuxLoss = "aux_zipf"
    aux_loss_coefficient: float = 1.0
    zipf_underuse_ratio: float = 0.5
    zipf_fit_rank_window: tuple[float, float] = (0.01, 0.9)
    zipf_refit_every: int = 10
    density_ema_decay: float = 0.99
    threshold_ema_rate: float = 0.01
    check_finite_every: int = 100

    def __post_init__(self):
        super().__post_init__()
        _validate_choice_config(self)

    @override
    def get_inference_sae_cfg_dict(self) -> dict[str, Any]:
        # The inference config has fields training does not (inference_mode):
        # those take their inference defaults.
        inference_cls = self.get_inference_config_class()
        result: dict[str, Any] = {}
        for f in fields(inference_cls):
            if hasattr(self, f.name):
                result[f.name] = getattr(self, f.name)
            elif f.default is not MISSING:
                result[f.name] = f.default
        result["architecture"] = inference_cls.architecture()
        result["metadata"] = self._metadata_with_training_info()
        return result


def _validate_choice_config(cfg: _ChoiceTrainingSAEConfig) -> None:
    arch = cfg.architecture()

    def fail(field: str, message: str) -> NoReturn:
        raise ValueError(f"{arch} config: {field} {message}")

    if isinstance(cfg.k, bool) or not isinstance(cfg.k, (int, float)):
        fail("k", f"must be a number, got {cfg.k!r}")
    if not cfg.k > 0:
        fail("k", f"must be > 0 (expected L0 per token), got {cfg.k}")
    if cfg.k > cfg.d_sae:
        fail("k", f"= {cfg.k} is larger than d_sae = {cfg.d_sae}; use k <= d_sae")
    if cfg.aux_loss not in _AUX_LOSSES:
        fail("aux_loss", f"must be one of {_AUX_LOSSES}, got {cfg.aux_loss!r}")
    if cfg.aux_loss != "none" and cfg.normalize_activations in (
        "constant_norm_rescale",
        "layer_norm",
    ):
        fail(
            "aux_loss",
            f"= {cfg.aux_loss!r} cannot be used with normalize_activations="
            f"{cfg.normalize_activations!r} (the residual would be in the wrong space); "
            "use aux_loss='none' or another normalization",
        )
    if not cfg.aux_loss_coefficient >= 0:
        fail("aux_loss_coefficient", f"must be >= 0, got {cfg.aux_loss_coefficient}")
    if not 0.0 <= cfg.zipf_underuse_ratio <= 1.0:
        fail("zipf_underuse_ratio", f"must be in [0, 1], got {cfg.zipf_underuse_ratio}")
    window = cfg.zipf_fit_rank_window
    window_error = f"must be two fractions of d_sae with 0 <= lo < hi <= 1, got {window!r}"
    try:
        # a JSON round trip turns the tuple into a list
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        fail("zipf_fit_rank_window", window_error)
    if not 0.0 <= lo < hi <= 1.0:
        fail("zipf_fit_rank_window", window_error)
    cfg.zipf_fit_rank_window = (lo, hi)
    if not (isinstance(cfg.zipf_refit_every, int) and cfg.zipf_refit_every >= 1):
        fail("zipf_refit_every", f"must be an integer >= 1, got {cfg.zipf_refit_every}")
    if not 0.0 <= cfg.density_ema_decay < 1.0:
        fail("density_ema_decay", f"must be in [0, 1), got {cfg.density_ema_decay}")
    if not 0.0 < cfg.threshold_ema_rate <= 1.0:
        fail("threshold_ema_rate", f"must be in (0, 1], got {cfg.threshold_ema_rate}")
    if not (isinstance(cfg.check_finite_every, int) and cfg.check_finite_every >= 0):
        fail("check_finite_every", f"must be an integer >= 0, got {cfg.check_finite_every}")
    if cfg.use_sparse_activations:
        fail("use_sparse_activations", "is not supported by choice SAEs; set it to False")


@dataclass
class MutualChoiceTrainingSAEConfig(_ChoiceTrainingSAEConfig):
    """Configuration for training a Mutual Choice SAE (``architecture="mutual_choice"``).

    The batch keeps its round(k * N) largest pre-activations, wherever they
    fall (the same set as SAELens's ``batchtopk``). Defaults to ``aux_zipf``.

    Args:
        allocation_method (str): ``"auto"``, ``"candidates"`` or ``"flat"``;
            see :func:`sae_lens_choice.allocation.mutual_choice`.
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
            raise ValueError(
                f"mutual_choice config: allocation_method must be one of {_METHODS}, "
                f"got {self.allocation_method!r}"
            )


@dataclass
class FeatureChoiceTrainingSAEConfig(_ChoiceTrainingSAEConfig):
    """Configuration for training a Feature Choice SAE (``architecture="feature_choice"``).

    Latent j keeps its m_j largest tokens of the batch, with sum m_j = k * N.

    Args:
        capacity (str): ``"zipf"`` (c_j proportional to (j + 1 + zipf_beta) **
            -zipf_alpha, water-filled at N) or ``"uniform"`` (c_j = k * N / F).
        zipf_alpha (float): Zipf exponent of the capacities, > 0.
        zipf_beta (float): Zipf–Mandelbrot offset of the capacities, > -1.
    """

    aux_loss: AuxLoss = "none"
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
            raise ValueError(
                f"feature_choice config: capacity must be one of {_CAPACITIES}, got {self.capacity!r}"
            )
        if not self.zipf_alpha > 0:
            raise ValueError(
                f"feature_choice config: zipf_alpha must be > 0, got {self.zipf_alpha}"
            )
        if not self.zipf_beta > -1:
            raise ValueError(f"feature_choice config: zipf_beta must be > -1, got {self.zipf_beta}")


# ---------------------------------------------------------------------------
# activations that also report the smallest kept values
# ---------------------------------------------------------------------------


class _TrainingMutualChoice(MutualChoice):
    """``MutualChoice`` that keeps the selection's statistics for the EMAs.

    ``last_stats`` = (smallest kept value, per-latent firing counts) of the
    latest batch. The selection knows them for free (from the T kept entries);
    recomputing them from the (N, F) output would cost passes over the whole
    matrix every step.
    """

    last_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    @override
    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        acts, smallest, counts = mutual_choice_with_stats(
            hidden_pre, self.k, method=self.method, validate=self.validate
        )
        self.last_stats = (smallest, counts)
        return acts


class _TrainingFeatureChoice(FeatureChoice):
    """``FeatureChoice`` that keeps the selection's statistics (see above)."""

    last_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    @override
    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        capacities, plan = self.draw_capacities(hidden_pre)
        acts, smallest, counts = feature_choice_with_stats(
            hidden_pre, capacities, plan=plan, validate=self.validate
        )
        self.last_stats = (smallest, counts)
        return acts


def _take_stats(activation: object) -> tuple[torch.Tensor, torch.Tensor] | None:
    # (smallest kept value(s), per-latent counts) of the latest batch, consumed once
    stats = getattr(activation, "last_stats", None)
    if stats is not None:
        activation.last_stats = None  # type: ignore[attr-defined]
    return stats


# ---------------------------------------------------------------------------
# training SAEs
# ---------------------------------------------------------------------------


class _ChoiceTrainingSAE(TopKTrainingSAE):
    """Shared machinery: density EMA, aux losses, thresholds, metrics."""

    cfg: _ChoiceTrainingSAEConfig  # type: ignore[assignment]
    latent_density_ema: torch.Tensor
    threshold: torch.Tensor
    threshold_updates: torch.Tensor
    zipf_fit: torch.Tensor

    def __init__(self, cfg: _ChoiceTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)  # type: ignore[arg-type]
        device = self.W_dec.device
        self.register_buffer(
            "latent_density_ema",
            torch.full((cfg.d_sae,), cfg.k / cfg.d_sae, dtype=torch.float32, device=device),
        )
        self.register_buffer(
            "zipf_fit", torch.full((4,), float("nan"), dtype=torch.float64, device=device)
        )
        self._register_threshold_buffers(device)

    def _register_threshold_buffers(self, device: torch.device) -> None:
        raise NotImplementedError

    # -- encoding -----------------------------------------------------------

    def compute_hidden_pre(self, sae_in: torch.Tensor) -> torch.Tensor:
        """Pre-activations exactly as SAELens's TopK computes them."""
        return choice_hidden_pre(self, sae_in)

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sae_in = self.process_sae_in(x)
        hidden_pre = self.compute_hidden_pre(sae_in)
        feature_acts = self.hook_sae_acts_post(self.activation_fn(hidden_pre))
        return feature_acts, hidden_pre

    # -- training step --------------------------------------------------------

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        step = step_input.n_training_steps
        every = self.cfg.check_finite_every
        check = step_input.is_logging_step or step == 0 or (every > 0 and step % every == 0)
        if check:
            check_finite(step_input.sae_in, "sae_in (the input activations)")
        output = super().training_forward_pass(step_input)
        if check:
            check_finite(output.hidden_pre, "hidden_pre")
        with torch.no_grad(), torch.autocast(output.feature_acts.device.type, enabled=False):
            # The activation's own statistics of this batch when it kept them
            # (cheap); otherwise they are recomputed from feature_acts.
            stats = _take_stats(self.activation_fn)
            smallest, counts = (None, None) if stats is None else stats
            self._update_density(output.feature_acts, counts)
            self._update_thresholds(output.feature_acts, smallest)
        if step_input.is_logging_step:
            output.metrics.update(self._metrics(output, step_input))
        return output

    @torch.no_grad()
    def _update_density(
        self, feature_acts: torch.Tensor, counts: torch.Tensor | None = None
    ) -> None:
        """Blend this batch's firing densities into the EMA.

        ``counts`` (F,): tokens each latent fired on, when the selection counted
        them; otherwise they are counted in ``feature_acts``.
        """
        acts = feature_acts.detach().reshape(-1, feature_acts.shape[-1])  # (N, F)
        fired = (acts > 0).sum(0) if counts is None else counts  # (F,)
        batch_density = fired.to(torch.float32) / acts.shape[0]  # (F,)
        decay = self.cfg.density_ema_decay
        self.latent_density_ema.mul_(decay).add_(batch_density, alpha=1 - decay)

    def _update_thresholds(
        self, feature_acts: torch.Tensor, smallest: torch.Tensor | None = None
    ) -> None:
        """Blend this batch's smallest kept value(s) into the threshold EMA.

        ``smallest``: as the selection found it (``inf`` where nothing was
        kept); otherwise it is read off ``feature_acts``.
        """
        raise NotImplementedError

    def _ema(
        self, old: torch.Tensor, new: torch.Tensor, count: torch.Tensor, has_new: torch.Tensor
    ) -> None:
        # First observation sets the value; later ones blend in at threshold_ema_rate.
        rate = self.cfg.threshold_ema_rate
        blended = torch.where(count == 0, new, (1 - rate) * old + rate * new)
        # Write through 1-D views: under torch.compile (aot_eager/inductor,
        # torch 2.13) an in-place write to a 0-d float64 graph input (the
        # Mutual Choice threshold) is silently dropped; a view's write is kept.
        old.view(-1).copy_(torch.where(has_new, blended, old).reshape(-1))
        count.view(-1).add_(has_new.to(count.dtype).reshape(-1))

    # -- auxiliary loss ----------------------------------------------------------

    def current_zipf_fit(self) -> ZipfFit:
        """Fit the Zipf–Mandelbrot curve to the density EMA over the configured window."""
        lo_frac, hi_frac = self.cfg.zipf_fit_rank_window
        d_sae = self.cfg.d_sae
        lo = max(1, int(lo_frac * d_sae) + 1)
        hi = max(lo, int(hi_frac * d_sae))
        return fit_zipf(self.latent_density_ema, (lo, hi))

    def _stored_fit(self) -> ZipfFit:
        alpha, beta, log_c, r2 = self.zipf_fit.unbind()
        return ZipfFit(
            alpha=alpha, beta=beta, log_C=log_c, r2=r2, n_points=r2.new_tensor(float("nan"))
        )

    def aux_candidates(
        self, dead_neuron_mask: torch.Tensor | None, n_training_steps: int
    ) -> torch.Tensor | None:
        """The latents that take part in the auxiliary loss this step."""
        if self.cfg.aux_loss != "aux_zipf" or self.cfg.zipf_underuse_ratio == 0:
            return dead_neuron_mask
        if n_training_steps % self.cfg.zipf_refit_every == 0:
            # refit on schedule; the stored fit is used between refits
            fit = self.current_zipf_fit()
            self.zipf_fit.copy_(torch.stack([fit.alpha, fit.beta, fit.log_C, fit.r2]))
        fit = self._stored_fit()
        # Before the first refit the stored fit is NaN: compare against NaN is
        # False, so only dead latents are candidates.
        return aux_candidate_mask(
            dead_neuron_mask, self.latent_density_ema, fit, self.cfg.zipf_underuse_ratio
        )

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        if self.cfg.aux_loss == "none":
            return {}
        with torch.no_grad():
            candidates = self.aux_candidates(
                step_input.dead_neuron_mask, step_input.n_training_steps
            )
        self._last_aux_candidates = candidates
        W_dec = self.W_dec
        if candidates is not None and hidden_pre.device.type == "cpu":
            # On CPU reading the candidates back costs nothing, so the loss runs
            # on the candidate latents alone: the same value and gradients as the
            # masked (N, F) computation, at N x n_candidates cost, and nothing at
            # all when there are no candidates. (On accelerators the read-back
            # would stall the stream; there the masked form below runs.)
            index = candidates.nonzero().squeeze(1)  # (n,)
            if index.numel() == 0:
                return {"auxiliary_reconstruction_loss": sae_out.new_zeros(())}
            hidden_pre = hidden_pre.index_select(-1, index)  # (..., n)
            W_dec = W_dec.index_select(0, index)  # (n, d_in)
            candidates = torch.ones_like(index, dtype=torch.bool)  # (n,)
        loss = aux_reconstruction_loss(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            hidden_pre=hidden_pre,
            candidate_mask=candidates,
            W_dec=W_dec,
            rescale_acts_by_decoder_norm=self.cfg.rescale_acts_by_decoder_norm,
            coefficient=self.cfg.aux_loss_coefficient,
        )
        return {"auxiliary_reconstruction_loss": loss}

    # -- metrics ------------------------------------------------------------------

    def _metrics(
        self, output: TrainStepOutput, step_input: TrainStepInput
    ) -> dict[str, torch.Tensor | float | int | Callable[[], torch.Tensor | float | int]]:
        acts = output.feature_acts.detach()
        l0 = (acts.reshape(-1, acts.shape[-1]) > 0).sum(-1).to(torch.float32)  # (N,)
        metrics: dict[str, Any] = {
            "l0_per_token_mean": l0.mean(),
            "l0_per_token_std": l0.std() if l0.numel() > 1 else l0.new_zeros(()),
            "l0_per_token_min": l0.min(),
            "l0_per_token_max": l0.max(),
            "frac_tokens_zero_l0": (l0 == 0).to(torch.float32).mean(),
            "latent_density_ema_dead": (self.latent_density_ema == 0).sum(),
        }
        if step_input.dead_neuron_mask is not None:
            metrics["dead_latents"] = step_input.dead_neuron_mask.sum()
        if self.cfg.aux_loss == "aux_zipf":
            fit = self._stored_fit()
            metrics["zipf_alpha"] = fit.alpha
            metrics["zipf_beta"] = fit.beta
            metrics["zipf_r2"] = fit.r2
            # A NaN fit (before the first refit) flags nothing.
            metrics["underused_latents"] = underused_mask(
                self.latent_density_ema, fit, self.cfg.zipf_underuse_ratio
            ).sum()
        metrics.update(self._threshold_metrics())
        return metrics

    def _threshold_metrics(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- saving -------------------------------------------------------------------

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        # TopK's version folds W_dec norms into W_enc/b_enc when
        # rescale_acts_by_decoder_norm; hidden_pre is unchanged by that fold, so
        # thresholds (in hidden_pre units) carry over as they are.
        super().process_state_dict_for_saving_inference(state_dict)
        for name in ("latent_density_ema", "zipf_fit", "threshold_updates"):
            state_dict.pop(name, None)
        threshold = state_dict.pop("threshold").to(self.dtype)
        state_dict["threshold"] = threshold.expand(self.cfg.d_sae).clone()

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if self.cfg.rescale_acts_by_decoder_norm:
            # hidden_pre = (x W_enc + b_enc) * |W_dec|: W_enc grew by s but
            # |W_dec| shrank by s, so thresholds in hidden_pre units shrink by s.
            self.threshold /= scaling_factor


class MutualChoiceTrainingSAE(_ChoiceTrainingSAE):
    """Mutual Choice training SAE: the batch's round(k * N) largest pre-activations.

    Saved for inference as :class:`sae_lens_choice.inference.MutualChoiceSAE`,
    a JumpReLU with one global threshold (the EMA of the smallest kept value).
    """

    cfg: MutualChoiceTrainingSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: MutualChoiceTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        # finiteness is checked on a schedule in training_forward_pass
        return _TrainingMutualChoice(self.cfg.k, self.cfg.allocation_method, validate=False)

    @override
    def _register_threshold_buffers(self, device: torch.device) -> None:
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64, device=device))

    @override
    @torch.no_grad()
    def _update_thresholds(
        self, feature_acts: torch.Tensor, smallest: torch.Tensor | None = None
    ) -> None:
        if smallest is None:
            acts = feature_acts.detach()
            smallest = torch.where(acts > 0, acts, acts.new_tensor(float("inf"))).amin()
        smallest = smallest.to(torch.float64)  # () , inf when nothing was kept
        self._ema(self.threshold, smallest, self.threshold_updates, torch.isfinite(smallest))

    @override
    def _threshold_metrics(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold}


class FeatureChoiceTrainingSAE(_ChoiceTrainingSAE):
    """Feature Choice training SAE: each latent takes its m_j best tokens.

    Computes ``hidden_pre`` as the transpose of an (F, N) product so the
    per-latent top-k runs over contiguous rows (see ``feature_choice``).
    Saved for inference as :class:`sae_lens_choice.inference.FeatureChoiceSAE`,
    a JumpReLU with one threshold per latent.
    """

    cfg: FeatureChoiceTrainingSAEConfig  # type: ignore[assignment]
    activation_fn: FeatureChoice

    def __init__(self, cfg: FeatureChoiceTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        cfg = self.cfg
        return _TrainingFeatureChoice(
            cfg.k, cfg.d_sae, cfg.capacity, cfg.zipf_alpha, cfg.zipf_beta, validate=False
        )

    @override
    def compute_hidden_pre(self, sae_in: torch.Tensor) -> torch.Tensor:
        # (F, d_in) @ (d_in, N) -> (F, N), returned as an (N, F) view: same values
        # as sae_in @ W_enc, but the per-latent top-k then needs no transpose copy.
        if sae_in.ndim != 2:
            return super().compute_hidden_pre(sae_in)
        hidden_pre_t = torch.addmm(self.b_enc[:, None], self.W_enc.t(), sae_in.t())  # (F, N)
        hidden_pre = self.hook_sae_acts_pre(hidden_pre_t.t())  # (N, F) view
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)  # keeps the (F, N) layout
        return hidden_pre

    @override
    def _register_threshold_buffers(self, device: torch.device) -> None:
        d_sae = self.cfg.d_sae
        self.register_buffer("threshold", torch.zeros(d_sae, dtype=torch.float64, device=device))
        self.register_buffer(
            "threshold_updates", torch.zeros(d_sae, dtype=torch.int64, device=device)
        )

    @override
    @torch.no_grad()
    def _update_thresholds(
        self, feature_acts: torch.Tensor, smallest: torch.Tensor | None = None
    ) -> None:
        if smallest is None:
            acts = feature_acts.detach().reshape(-1, feature_acts.shape[-1])  # (N, F)
            smallest = torch.where(acts > 0, acts, acts.new_tensor(float("inf"))).amin(0)
        smallest = smallest.to(torch.float64)  # (F,), inf where a latent kept nothing
        self._ema(self.threshold, smallest, self.threshold_updates, torch.isfinite(smallest))

    @override
    def _threshold_metrics(self) -> dict[str, torch.Tensor]:
        return {
            "threshold_mean": self.threshold.mean(),
            "threshold_min": self.threshold.min(),
            "threshold_max": self.threshold.max(),
        }

    def expected_capacities(self, n_tokens: int) -> torch.Tensor:
        """Expected tokens per latent for a batch of ``n_tokens`` (float64)."""
        return self.activation_fn.expected_capacities(n_tokens)
