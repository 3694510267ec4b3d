"""What Mutual Choice and Feature Choice SAEs share.

Both subclass SAELens's TopK training SAE (as SAELens's ``batchtopk`` does),
so the encoder follows TopK's conventions (``b_enc`` init,
``rescale_acts_by_decoder_norm``, ``decoder_init_norm``, decoding through
``act_times_W_dec``); they differ from TopK, and from each other, only in
which (token, latent) pairs a batch keeps (:meth:`ChoiceTrainingSAE.select`)
and in how an inference threshold is defined. Everything else lives here:

- the config fields both take, validated in one place;
- the training step: pre-activations, the selection, decoding, the MSE and
  auxiliary (``aux_k`` / ``aux_zipf``) losses, and the statistics the
  selection yields for free (per-latent firing counts, smallest kept values);
- state kept outside autocast, in checkpoints, at its own dtype whatever the
  SAE's dtype: the firing-density EMA (float32), the threshold EMA (float64),
  the Zipf fit (float64), step and update counters (int64), a flag recording
  the first step whose loss was not finite;
- saving: SAELens's own ``jumprelu`` architecture, as ``batchtopk`` saves, with
  thresholds calibrated exactly on the most recent training tokens under the
  final weights (:meth:`ChoiceTrainingSAE.inference_thresholds`); a SAE with
  non-finite weights is never saved;
- the inference SAE of version 0.1.0 (:class:`ChoiceSAE`), kept so folders
  saved by 0.1.0 (``"architecture": "mutual_choice"`` / ``"feature_choice"``)
  load and encode exactly as before.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal, cast

import torch
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
from sae_lens.saes.sae import SAE, SAEConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import (
    TopKSAE,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    act_times_W_dec,
)
from sae_lens.util import str_to_dtype
from torch import nn
from typing_extensions import override

from sae_lens_choice import distributed, sparse
from sae_lens_choice.allocation import ChoicePairs, pairs_to_dense
from sae_lens_choice.losses import (
    aux_candidate_mask,
    aux_reconstruction_loss,
    aux_topk,
    default_k_aux,
)
from sae_lens_choice.validation import check_bool, check_choice, check_number, fail
from sae_lens_choice.zipf import (
    DEFAULT_RANK_WINDOW,
    ZipfFit,
    fit_rank_window,
    fit_zipf,
    underused_mask,
)

AuxLoss = Literal["none", "aux_k", "aux_zipf"]
AUX_LOSSES: tuple[str, ...] = ("none", "aux_k", "aux_zipf")
AuxLossUnits = Literal["normalised", "input"]
AUX_LOSS_UNITS: tuple[str, ...] = ("normalised", "input")
StepImplementation = Literal["auto", "sparse", "dense"]
STEP_IMPLEMENTATIONS: tuple[str, ...] = ("auto", "sparse", "dense")
AllocationScore = Literal["hidden_pre", "hidden_pre_over_input_norm"]
ALLOCATION_SCORES: tuple[str, ...] = ("hidden_pre", "hidden_pre_over_input_norm")
InferenceMode = Literal["threshold", "batch"]
INFERENCE_MODES: tuple[str, ...] = ("threshold", "batch")
NORMALIZATIONS: tuple[str, ...] = (
    "none",
    "expected_average_only_in",
    "constant_norm_rescale",
    "layer_norm",
    "covariance_whitening",
)


# ---------------------------------------------------------------------------
# pre-activations, the JumpReLU both inference forms share, the batch activation
# ---------------------------------------------------------------------------


def choice_hidden_pre(sae: SAE[Any], sae_in: torch.Tensor) -> torch.Tensor:
    """Pre-activations exactly as SAELens's TopK computes them.

    ``sae_in @ W_enc + b_enc`` through ``hook_sae_acts_pre``, times the decoder
    row norms when ``rescale_acts_by_decoder_norm`` (so the allocation sees
    each latent's contribution as if its decoder row had unit norm). These are
    the units every threshold of this package is in.
    """
    b_enc: torch.Tensor = sae.b_enc  # type: ignore[assignment]  (subclass parameter)
    hidden_pre = sae.hook_sae_acts_pre(sae_in @ sae.W_enc + b_enc)
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        hidden_pre = hidden_pre * sae.W_dec.norm(dim=-1)
    return hidden_pre


def threshold_summary(threshold: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logging metrics of a per-latent threshold EMA."""
    return {
        "threshold_mean": threshold.mean(),
        "threshold_min": threshold.min(),
        "threshold_max": threshold.max(),
    }


def jumprelu(hidden_pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """SAELens JumpReLU semantics: ``relu(h)`` where ``h > threshold``, else 0."""
    return hidden_pre.relu() * (hidden_pre > threshold).to(hidden_pre.dtype)


class ChoiceActivation(nn.Module):
    """An allocation rule as an activation: ``relu(hidden_pre)`` on the pairs it keeps, 0 elsewhere.

    Subclasses give :meth:`pairs`. They are ``@dataclass(eq=False, repr=False)``
    over their settings, so each setting is named once (the generated
    ``__init__`` takes them in field order) while the module keeps
    ``nn.Module``'s identity hashing and repr; the dataclass ``__init__`` does
    not call ``nn.Module.__init__``, so :meth:`__post_init__` does.
    """

    def __post_init__(self) -> None:
        super().__init__()

    def pairs(self, hidden_pre: torch.Tensor) -> ChoicePairs:
        """The kept (token, latent) pairs (no autograd)."""
        raise NotImplementedError

    @override
    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return pairs_to_dense(self.pairs(hidden_pre), hidden_pre)


# ---------------------------------------------------------------------------
# validation of the fields every config (training and 0.1.0 inference) has
# ---------------------------------------------------------------------------


def _owner(cfg: SAEConfig) -> str:
    return f"{cfg.architecture()} config"


def validate_sae_fields(cfg: SAEConfig) -> None:
    """Check SAELens's own ``SAEConfig`` fields and ``k``, naming the field.

    Run before SAELens's own ``__post_init__``, so ``d_sae=0`` is blamed on
    ``d_sae`` rather than on whatever first divides by it.
    """
    owner = _owner(cfg)
    check_number(cfg.d_in, "d_in", owner=owner, integer=True, gt=0)
    check_number(cfg.d_sae, "d_sae", owner=owner, integer=True, gt=0)
    try:
        str_to_dtype(cfg.dtype)
    except (ValueError, TypeError, KeyError):
        fail("dtype", f"must be a torch dtype name such as 'float32', got {cfg.dtype!r}", owner)
    try:
        torch.device(cfg.device)
    except (RuntimeError, TypeError):
        fail("device", f"must be a torch device such as 'cpu' or 'cuda', got {cfg.device!r}", owner)
    check_bool(cfg.apply_b_dec_to_input, "apply_b_dec_to_input", owner=owner)
    check_choice(cfg.normalize_activations, "normalize_activations", NORMALIZATIONS, owner=owner)
    check_choice(cfg.reshape_activations, "reshape_activations", ("none", "hook_z"), owner=owner)
    k = getattr(cfg, "k", None)
    if k is None:
        fail("k", "is missing: the config must state k, the expected L0 per token", owner)
    check_number(k, "k", owner=owner, gt=0, hint="k is the expected L0 per token")
    if k > cfg.d_sae:
        fail("k", f"= {k} is larger than d_sae = {cfg.d_sae}; use k <= d_sae", owner)
    check_bool(cfg.rescale_acts_by_decoder_norm, "rescale_acts_by_decoder_norm", owner=owner)  # type: ignore[attr-defined]


#: SAELens architecture names this package registers (its training and 0.1.0 inference SAEs).
CHOICE_ARCHITECTURES = ("mutual_choice", "feature_choice")


def check_own_choice_fields(
    cfg_class: type, config_dict: dict[str, Any], lookup: Callable[[str], tuple[type, type]]
) -> None:
    """Refuse a config dict naming one Choice architecture but holding the other's fields.

    Unknown fields are dropped, as SAELens's ``from_dict`` drops them; a field
    that belongs to the other Choice architecture instead means the
    ``architecture`` name was edited, and loading would give the other rule
    (or a shape error naming nothing). ``lookup`` is SAELens's
    ``get_sae_training_class``: training checkpoints are built through their
    config class's ``from_dict``. (SAELens builds inference configs through
    ``SAEConfig.from_dict`` itself, so 0.1.0 inference folders are not checked.)
    """
    name = config_dict.get("architecture")
    own = {f.name for f in fields(cfg_class)}
    for other in CHOICE_ARCHITECTURES:
        if other == name:
            continue
        try:
            other_class = lookup(other)[1]
        except (KeyError, ValueError):  # not registered: nothing to compare with
            continue
        foreign = sorted(({f.name for f in fields(other_class)} - own) & config_dict.keys())
        if foreign:
            raise ValueError(
                f"this cfg.json says architecture {name!r} but holds {other!r}'s field(s) "
                f'{foreign}: it was saved as {other!r}; set "architecture": "{other}" '
                "back in its cfg.json"
            )


# ---------------------------------------------------------------------------
# training config
# ---------------------------------------------------------------------------


@dataclass
class ChoiceTrainingSAEConfig(TopKTrainingSAEConfig):
    """Fields shared by the Mutual Choice and Feature Choice training configs.

    Every field is validated on construction (so also when SAELens builds the
    config from its CLI or a ``cfg.json``); a bad value raises ``ValueError``
    naming the field.

    Args:
        k (float): Expected L0 per token. The batch keeps T = round(k * N)
            (token, latent) pairs; a token's own L0 varies around k.
        allocation_score (str): what the allocation ranks (token, latent) pairs
            by. ``"hidden_pre"`` (the paper's rule: the pre-activation).
            ``"hidden_pre_over_input_norm"`` (beyond the paper): the
            pre-activation divided by the token's ``||x - b_dec||``, so a
            token's norm does not decide how many latents it gets; the kept
            values are still the pre-activations. Saved SAEs encode with a plain
            JumpReLU on the pre-activation whichever score trained them, with
            thresholds calibrated to the same L0 and densities.
        aux_loss (str): ``"none"``, ``"aux_k"`` (dead latents reconstruct the
            residual, as SAELens's TopK; Mutual Choice's default, which
            reconstructed better than ``aux_zipf`` in ``benchmarks/convergence.py``'s
            study, ``docs/archive/2026-11-24/convergence.md``) or ``"aux_zipf"`` (the paper's: dead
            plus under-used latents by the fitted Zipf curve). With a per-token
            ``normalize_activations`` (``"layer_norm"``,
            ``"constant_norm_rescale"``) the aux losses work on the normalised
            pre-activations, in the units ``aux_loss_units`` says.
        aux_loss_units (str): the units of the aux loss under a per-token
            ``normalize_activations``. ``"input"`` (default; beyond the paper):
            each token's residual and aux reconstruction are scaled back by its
            normalisation factor (its layer-norm std, or ``1 / x_norm_coeff``),
            the units SAELens measures the MSE in. ``"normalised"`` (Gao et
            al.'s choice): the residual and the aux reconstruction in the
            normalised space, where the aux loss weighs about E[std^2] times
            less against the MSE than without normalisation; in
            ``benchmarks/convergence.py``'s study (``docs/convergence.md``)
            that left Mutual Choice with layer norm 10-13 dead latents per run
            on SmolLM2, against 0-3 with ``"input"``. No effect without a
            per-token normalisation. A saved config without this field (written
            before it existed) loads as ``"normalised"``, the units it trained in.
        aux_loss_coefficient (float): Multiplies the auxiliary loss.
        zipf_underuse_ratio (float): gamma in [0, 1]: a latent is under-used
            when its density is below gamma times the fitted Zipf curve at its
            rank. 0 makes aux_zipf equal to aux_k.
        zipf_fit_rank_window (tuple[float, float]): ranks the Zipf curve is
            fitted on, as fractions of d_sae (see ``zipf.fit_rank_window``).
        zipf_refit_every (int): steps between refits of the Zipf curve.
        density_ema_decay (float): decay of the per-latent firing-density EMA
            (initialised at k / d_sae). Its memory is about 1 / (1 - decay)
            steps: 0.99 suits long runs; for runs of a few hundred steps use
            ~0.9, or the EMA is still near its start and flags few latents.
        threshold_ema_rate (float): weight of the new batch in the threshold
            EMA, a running estimate logged during training and used for saving
            only when ``threshold_calibration_tokens`` is 0.
        threshold_calibration_tokens (int): how many of the most recent
            training tokens the SAE keeps (a ring buffer of inputs, in the
            checkpoint) to calibrate its saved thresholds exactly under the
            final weights. Costs ``tokens * d_in`` values of memory and one
            encoder pass over them when saving. 0 saves the EMA instead.
        step_implementation (str): ``"sparse"``: after the selection, decode and
            differentiate from the kept (token, latent) pairs alone
            (:mod:`sae_lens_choice.sparse`), freeing the (N, F) pre-activations;
            ``"dense"``: through (N, F) tensors, as SAELens's TopK;
            ``"auto"`` (default): sparse where it was measured faster
            (:func:`sparse_step_pays`: on CPU from 256 latents; dense on
            GPUs). Both give the same outputs and gradients. SAELens's ``use_sparse_activations=True`` means
            ``"sparse"``.
        check_finite_every (int): every this many steps (and on logging steps)
            the step reads back whether any loss so far was NaN or inf, and
            stops training naming the first such step; 0 checks on logging
            steps and before saving only. Nothing else is read back.
    """

    k: float = 32  # type: ignore[assignment]
    allocation_score: AllocationScore = "hidden_pre"
    aux_loss: AuxLoss = "aux_k"
    aux_loss_units: AuxLossUnits = "input"
    aux_loss_coefficient: float = 1.0
    zipf_underuse_ratio: float = 0.5
    zipf_fit_rank_window: tuple[float, float] = DEFAULT_RANK_WINDOW
    zipf_refit_every: int = 10
    density_ema_decay: float = 0.99
    threshold_ema_rate: float = 0.01
    threshold_calibration_tokens: int = 32_768
    step_implementation: StepImplementation = "auto"
    check_finite_every: int = 100

    def __post_init__(self):
        validate_sae_fields(self)
        super().__post_init__()
        self.validate_choice_fields()

    @override
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> Any:
        check_own_choice_fields(cls, config_dict, get_sae_training_class)
        if "aux_loss_units" not in config_dict:
            # written before the field existed, when the aux loss was always in
            # the normalised space: resuming must not change its units
            config_dict = {**config_dict, "aux_loss_units": "normalised"}
        return super().from_dict(config_dict)

    def validate_choice_fields(self) -> None:
        """Check this package's fields (subclasses add theirs)."""
        owner = _owner(self)
        check_bool(self.use_sparse_activations, "use_sparse_activations", owner=owner)
        check_choice(
            self.step_implementation, "step_implementation", STEP_IMPLEMENTATIONS, owner=owner
        )
        if self.use_sparse_activations:
            if self.step_implementation == "dense":
                fail(
                    "use_sparse_activations",
                    "= True asks for the sparse step but step_implementation is 'dense'; "
                    "drop one of them",
                    owner,
                )
            self.step_implementation = "sparse"
        if self.decoder_init_norm is not None:
            check_number(self.decoder_init_norm, "decoder_init_norm", owner=owner, gt=0)
        check_choice(self.allocation_score, "allocation_score", ALLOCATION_SCORES, owner=owner)
        check_choice(self.aux_loss, "aux_loss", AUX_LOSSES, owner=owner)
        check_choice(self.aux_loss_units, "aux_loss_units", AUX_LOSS_UNITS, owner=owner)
        check_number(self.aux_loss_coefficient, "aux_loss_coefficient", owner=owner, ge=0)
        check_number(self.zipf_underuse_ratio, "zipf_underuse_ratio", owner=owner, ge=0, le=1)
        window = self.zipf_fit_rank_window
        try:
            # a JSON round trip turns the tuple into a list
            lo, hi = (check_number(v, "zipf_fit_rank_window", owner=owner) for v in window)
            fit_rank_window(self.d_sae, (lo, hi))
        except (TypeError, ValueError):
            fail(
                "zipf_fit_rank_window",
                f"must be two fractions of d_sae with 0 <= lo < hi <= 1, got {window!r}",
                owner,
            )
        self.zipf_fit_rank_window = (float(lo), float(hi))
        check_number(self.zipf_refit_every, "zipf_refit_every", owner=owner, integer=True, ge=1)
        check_number(self.density_ema_decay, "density_ema_decay", owner=owner, ge=0, lt=1)
        check_number(self.threshold_ema_rate, "threshold_ema_rate", owner=owner, gt=0, le=1)
        check_number(
            self.threshold_calibration_tokens,
            "threshold_calibration_tokens",
            owner=owner,
            integer=True,
            ge=0,
        )
        check_number(self.check_finite_every, "check_finite_every", owner=owner, integer=True, ge=0)

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        # Saved as SAELens's own JumpReLU, as batchtopk is: loads without this
        # package. Our fields go into metadata["training_architecture_details"].
        return JumpReLUSAEConfig


def sparse_step_pays(d_in: int, d_sae: int, device_type: str = "cpu") -> bool:
    """Whether the sparse training step is the faster one at this size (``"auto"``).

    CPU: measured by ``python -m benchmarks.step_time --crossover`` (2-core
    CPU, float32, N = 2048, k = 32, d_in 16-768, d_sae 64-16384; the figures
    are in ``docs/step_time_crossover.json``): sparse / dense step time is
    1.3-1.6 at d_sae = 64, about 1 at 128, 0.73-1.04 at 256 and 0.24-0.30 at
    16384, whatever d_in. Below 256 latents the sparse step's fixed costs
    (sorting the pairs, the layout) outweigh the dense decode; ``d_in`` does
    not move the crossover, so the rule ignores it.

    Other devices: dense. On an H200 (``docs/step_time_cuda.json``, ``python
    -m benchmarks.step_time --device cuda``) the dense step took 1.1-1.6x
    SAELens TopK's time for Mutual Choice and 0.8-1.3x for Feature Choice,
    the sparse one 0.9-59x and 0.4-3.5x: its per-latent segment sums
    (``F.embedding_bag``) are slow when a few latents hold many of the pairs,
    as Mutual Choice's do. ``step_implementation="sparse"`` still takes it
    there (it needs 0.2-0.4x TopK's memory).
    """
    del d_in  # measured not to move the crossover
    return device_type == "cpu" and d_sae >= 256


# ---------------------------------------------------------------------------
# training SAE
# ---------------------------------------------------------------------------

#: Buffers whose dtype is fixed whatever the SAE's dtype: moving the SAE to
#: bfloat16 must not round a float64 threshold or freeze an int64 counter.
_STATE_DTYPES: dict[str, torch.dtype] = {
    "latent_density_ema": torch.float32,
    "threshold": torch.float64,
    "threshold_updates": torch.int64,
    "zipf_fit": torch.float64,
    "training_steps": torch.int64,
    "nonfinite_step": torch.int64,
    "calibration_tokens_seen": torch.int64,
}
#: Suffix of the byte-packed copies of those buffers in checkpoint files.
#: SAELens's disk loader casts every stored tensor to the config's dtype; byte
#: values 0..255 survive any such cast exactly, so the state does too.
_PACKED = ".bytes"


def _pack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def _unpack(packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    raw = packed.to(torch.float32).round().to(torch.uint8).contiguous()
    return raw.view(like.dtype).reshape(like.shape).clone()


class ChoiceTrainingSAE(TopKTrainingSAE):
    """Shared machinery of the Mutual and Feature Choice training SAEs.

    Subclasses define the selection (:meth:`select`), the threshold buffers'
    shape and EMA update, the calibration target and the threshold metrics.
    """

    cfg: ChoiceTrainingSAEConfig  # type: ignore[assignment]
    latent_density_ema: torch.Tensor
    threshold: torch.Tensor
    threshold_updates: torch.Tensor
    zipf_fit: torch.Tensor
    training_steps: torch.Tensor
    nonfinite_step: torch.Tensor
    calibration_acts: torch.Tensor
    calibration_tokens_seen: torch.Tensor

    def __init__(self, cfg: ChoiceTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)  # type: ignore[arg-type]
        for name, value in self._initial_state(self.W_dec.device).items():
            self.register_buffer(name, value)
        # Our step = SAELens's n_training_steps + this offset, fixed at the first
        # step after construction or loading. SAELens restores n_training_steps
        # one short on resume (its checkpoint is written before the counter
        # moves); the checkpointed training_steps is exact.
        self._step_offset: int | None = None
        self.register_load_state_dict_post_hook(_reset_step_offset)
        self._rank_sizes: list[int] | None = None
        # set by calibrate_thresholds, cleared by the next training step
        self._thresholds_calibrated = False

    def per_latent_thresholds(self) -> bool:
        """Whether ``threshold`` holds one value per latent, else one global value.

        Per latent for Feature Choice; Mutual Choice overrides this (one global
        value unless it has a ``latent_floor``).
        """
        return True

    def _initial_state(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Fresh values of every buffer this class adds."""
        cfg = self.cfg
        d_sae = cfg.d_sae
        shape: tuple[int, ...] = (d_sae,) if self.per_latent_thresholds() else ()
        values = {
            "latent_density_ema": torch.full((d_sae,), cfg.k / d_sae),
            "threshold": torch.zeros(shape),
            "threshold_updates": torch.zeros(shape),
            "zipf_fit": torch.full((4,), float("nan")),
            "training_steps": torch.zeros(()),
            "nonfinite_step": torch.full((), -1),
            "calibration_tokens_seen": torch.zeros(()),
        }
        state = {
            name: value.to(device=device, dtype=_STATE_DTYPES[name])
            for name, value in values.items()
        }
        state["calibration_acts"] = torch.zeros(
            cfg.threshold_calibration_tokens, cfg.d_in, dtype=self.dtype, device=device
        )
        return state

    # -- dtype-stable state ----------------------------------------------------

    @override
    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> ChoiceTrainingSAE:
        # nn.Module.to(dtype) casts every floating buffer; ours keep their dtype
        # and follow only the device.
        held = {name: self._buffers.pop(name) for name in _STATE_DTYPES if name in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            device = self.W_dec.device
            for name, buffer in held.items():
                self._buffers[name] = None if buffer is None else buffer.to(device)
        return self

    @override
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving(state_dict)
        for name in _STATE_DTYPES:
            if name in state_dict:
                state_dict[name + _PACKED] = _pack(state_dict.pop(name))

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Restore our buffers at their own dtype; fill what older checkpoints lack.

        Checkpoints of this version store them byte-packed (see ``_PACKED``);
        checkpoints of 0.1.0 store them plainly (possibly cast by SAELens's
        loader) and lack the buffers added since, which start fresh.
        """
        super().process_state_dict_for_loading(state_dict)
        device = state_dict["W_dec"].device if "W_dec" in state_dict else "cpu"
        fresh = self._initial_state(device)
        missing = []
        for name, like in fresh.items():
            if name + _PACKED in state_dict:
                state_dict[name] = _unpack(state_dict.pop(name + _PACKED), like)
            elif name in state_dict:
                state_dict[name] = state_dict[name].to(like.dtype).reshape(like.shape)
            else:
                missing.append(name)
                state_dict[name] = like
        if missing:
            warnings.warn(
                f"{self.cfg.architecture()} checkpoint lacks {missing} (saved by an older "
                "version); they start fresh",
                UserWarning,
                stacklevel=2,
            )

    # -- encoding ----------------------------------------------------------------

    def compute_hidden_pre(self, sae_in: torch.Tensor) -> torch.Tensor:
        """Pre-activations exactly as SAELens's TopK computes them."""
        return choice_hidden_pre(self, sae_in)

    def select(self, scores: torch.Tensor, rank_sizes: list[int] | None = None) -> ChoicePairs:
        """The (token, latent) pairs the allocation keeps for these scores (no autograd).

        ``rank_sizes``: the tokens of every data-parallel rank when the batch is
        split across ranks (``sae_lens_choice.distributed``): the selection is
        then the exact one over the whole batch, and this rank gets its pairs.
        """
        raise NotImplementedError

    def rank_sizes(self, n_tokens: int) -> list[int] | None:
        """Tokens per data-parallel rank, or ``None`` outside ``torch.distributed``.

        Gathered once (one tiny all-gather), then assumed: SAELens's trainer
        gives every rank batches of a fixed size.
        """
        if not distributed.is_distributed():
            return None
        if self._rank_sizes is None:
            self._rank_sizes = distributed.gather_sizes(n_tokens)
        if self._rank_sizes[distributed.dist.get_rank()] != n_tokens:
            raise ValueError(
                f"{self.cfg.architecture()}: this rank's batch changed size to {n_tokens} "
                f"tokens after {self._rank_sizes}; data-parallel training needs batches "
                "of a fixed size on every rank"
            )
        return self._rank_sizes

    @torch.no_grad()
    def choose(
        self, sae_in: torch.Tensor, hidden_pre: torch.Tensor, rank_sizes: list[int] | None = None
    ) -> ChoicePairs:
        """The pairs this batch keeps, ranked by ``cfg.allocation_score``.

        Returns the pairs with their ``hidden_pre`` values (0 for padding).
        """
        if self.cfg.allocation_score == "hidden_pre":
            return self.select(hidden_pre, rank_sizes)
        d_sae = hidden_pre.shape[-1]
        flat = hidden_pre.detach().reshape(-1, d_sae)  # (N, F)
        # ||x - b_dec|| of each token in the SAE's input space (after any normalisation)
        norms = sae_in.detach().reshape(flat.shape[0], -1).norm(dim=-1, keepdim=True)  # (N, 1)
        pairs = self.select(flat / norms.clamp(min=1e-6), rank_sizes)
        values = flat[pairs.token_idx, pairs.latent_idx]  # (P,)
        return pairs._replace(values=torch.where(pairs.kept(), values, values.new_zeros(())))

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-mode encoding: the training allocation over the tokens of ``x``."""
        sae_in = self.process_sae_in(x)
        hidden_pre = self.compute_hidden_pre(sae_in)
        feature_acts = pairs_to_dense(self.choose(sae_in, hidden_pre), hidden_pre)
        return self.hook_sae_acts_post(feature_acts), hidden_pre

    # -- the training step ---------------------------------------------------------

    def _step(self, n_training_steps: int) -> int:
        if self._step_offset is None:
            # one read-back, at the first step after construction or loading
            self._step_offset = int(self.training_steps) - n_training_steps
        return n_training_steps + self._step_offset

    def use_sparse_step(self) -> bool:
        """Whether the training step decodes from the kept pairs (see ``step_implementation``).

        The dense step runs whenever a hook is registered on ``hook_sae_acts_pre``
        or ``hook_sae_acts_post``: they see the (N, F) tensors, which the sparse
        step never builds.
        """
        choice = self.cfg.step_implementation
        if choice == "auto":
            pays = sparse_step_pays(self.cfg.d_in, self.cfg.d_sae, self.W_enc.device.type)
            choice = "sparse" if pays else "dense"
        if choice == "dense":
            return False
        hooked = (self.hook_sae_acts_pre, self.hook_sae_acts_post)
        return not any(h._forward_hooks or h._backward_hooks for h in hooked)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One training step: the selection, the reconstruction, the MSE and aux losses.

        The sparse step (:meth:`use_sparse_step`) computes the (N, F)
        pre-activations without autograd, selects, frees them, and decodes and
        differentiates from the kept pairs only (:mod:`sae_lens_choice.sparse`):
        its ``feature_acts`` is a sparse COO tensor (SAELens's trainer takes one)
        and its ``hidden_pre`` holds the kept pre-activations, one per pair.
        Outputs and gradients equal the dense step's.
        """
        self._thresholds_calibrated = False
        step = self._step(step_input.n_training_steps)
        every = self.cfg.check_finite_every
        if step_input.is_logging_step or (every > 0 and step % every == 0):
            self.raise_if_nonfinite()

        sae_in = self.process_sae_in(step_input.sae_in)  # (N, d_in), normalised, minus b_dec
        n_tokens = sae_in.numel() // sae_in.shape[-1]
        # data-parallel: the exact selection over all ranks' tokens
        rank_sizes = self.rank_sizes(n_tokens)
        with torch.no_grad():
            candidates = self.aux_candidates(step_input.dead_neuron_mask, step)
        forward = self._sparse_forward if self.use_sparse_step() else self._dense_forward
        pairs, feature_acts, hidden_pre, sae_out_pre, aux_recons = forward(
            sae_in, rank_sizes, candidates
        )
        sae_out_pre = self.hook_sae_recons(sae_out_pre)
        aux_scale = self._aux_input_scale()  # read before the output map deletes it
        sae_out = self.reshape_fn_out(
            self.run_time_activation_norm_fn_out(sae_out_pre), self.d_head
        )

        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        losses = {"mse_loss": mse_loss}
        if aux_recons is not None:
            assert candidates is not None
            # sae_out_pre is what the SAE predicts for the normalised input, before
            # b_dec is removed: the aux loss lives in that (normalised) space
            normalised_in = sae_in + self.b_dec * self.cfg.apply_b_dec_to_input
            residual = normalised_in - sae_out_pre
            if aux_scale is not None:  # aux_loss_units="input"
                aux_recons, residual = aux_recons * aux_scale, residual * aux_scale
            losses["auxiliary_reconstruction_loss"] = aux_reconstruction_loss(
                self.reshape_fn_out(aux_recons, self.d_head),
                self.reshape_fn_out(residual, self.d_head),
                candidates,
                default_k_aux(self.cfg.d_in),
                coefficient=self.cfg.aux_loss_coefficient,
            )
        loss = sum(losses.values(), torch.zeros((), device=mse_loss.device, dtype=mse_loss.dtype))

        with torch.no_grad(), torch.autocast(sae_in.device.type, enabled=False):
            n_batch = n_tokens if rank_sizes is None else sum(rank_sizes)
            self._update_state(step_input.sae_in, pairs, n_batch, loss.detach())
        output = TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=loss,
            losses=losses,
        )
        if step_input.is_logging_step:
            output.metrics.update(self._metrics(pairs, n_tokens, step_input))
        return output

    def _aux_input_scale(self) -> torch.Tensor | None:
        """Per-token factor from the normalised space to the input's units, or None.

        Only with ``aux_loss_units="input"`` and a per-token normalisation: the
        layer-norm std (SAELens's ``ln_std``) or ``1 / x_norm_coeff``, both set
        by ``process_sae_in`` and deleted by ``run_time_activation_norm_fn_out``.
        (The layer norm's ``eps`` is left out, as SAELens's output map leaves it.)
        """
        if self.cfg.aux_loss_units != "input":
            return None
        norm = self.cfg.normalize_activations
        if norm == "layer_norm":
            return cast(torch.Tensor, self.ln_std)
        if norm == "constant_norm_rescale":
            return 1 / cast(torch.Tensor, self.x_norm_coeff)
        return None

    def _dense_forward(
        self, sae_in: torch.Tensor, rank_sizes: list[int] | None, candidates: torch.Tensor | None
    ) -> tuple[ChoicePairs, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pairs, feature_acts, hidden_pre, sae_out_pre, aux_recons) through (N, F) tensors."""
        hidden_pre = self.compute_hidden_pre(sae_in)  # (N, F)
        pairs = self.choose(sae_in, hidden_pre, rank_sizes)
        feature_acts = self.hook_sae_acts_post(pairs_to_dense(pairs, hidden_pre))  # (N, F)
        sae_out_pre = (
            act_times_W_dec(feature_acts, self.W_dec, self.cfg.rescale_acts_by_decoder_norm)
            + self.b_dec
        )
        aux_recons = None
        if candidates is not None:
            aux_recons = self._dense_aux_reconstruction(hidden_pre, candidates)
        return pairs, feature_acts, hidden_pre, sae_out_pre, aux_recons

    def _dense_aux_reconstruction(
        self, hidden_pre: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        # The candidates' top d_in // 2 per token, decoded without bias.
        k_aux = default_k_aux(self.cfg.d_in)
        W_dec = self.W_dec
        mask = candidates.to(torch.bool)
        if hidden_pre.device.type == "cpu":
            # On CPU reading the candidates back costs nothing, so the loss runs on
            # the candidate latents alone: the same value and gradients as the
            # masked (N, F) computation, at N x n_candidates cost. (On
            # accelerators the read-back would stall the stream.)
            index = mask.nonzero().squeeze(1)  # (n,)
            hidden_pre = hidden_pre.index_select(-1, index)  # (..., n)
            W_dec = W_dec.index_select(0, index)  # (n, d_in)
            mask = torch.ones_like(index, dtype=torch.bool)
        values, indices = aux_topk(hidden_pre, mask, k_aux)
        aux_acts = torch.zeros_like(hidden_pre).scatter(-1, indices, values)
        return act_times_W_dec(aux_acts, W_dec, self.cfg.rescale_acts_by_decoder_norm)

    def _sparse_forward(
        self, sae_in: torch.Tensor, rank_sizes: list[int] | None, candidates: torch.Tensor | None
    ) -> tuple[ChoicePairs, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The same as :meth:`_dense_forward`, from the kept pairs alone."""
        rescale = self.cfg.rescale_acts_by_decoder_norm
        b_enc: torch.Tensor = self.b_enc
        aux_pairs = aux_kept = index = None
        with torch.no_grad():
            hidden_pre = self.compute_hidden_pre(sae_in)  # (N, F), no graph
            pairs = self.choose(sae_in, hidden_pre, rank_sizes)
            if candidates is not None:
                if hidden_pre.device.type == "cpu":
                    index = candidates.to(torch.bool).nonzero().squeeze(1)  # read-back: free on CPU
                else:
                    aux_pairs, aux_kept = sparse.aux_topk_pairs(
                        hidden_pre, candidates, default_k_aux(self.cfg.d_in), compact=False
                    )
            del hidden_pre  # the step holds nothing (N, F) from here on
        sae_out_pre, acts = sparse.sparse_encode_decode(
            sae_in, self.W_enc, b_enc, self.W_dec, self.b_dec, pairs,
            rescale_acts_by_decoder_norm=rescale,
        )  # fmt: skip
        n_tokens = sae_in.numel() // sae_in.shape[-1]
        feature_acts = self.hook_sae_acts_post(
            sparse.sparse_feature_acts(pairs, acts, (n_tokens, self.cfg.d_sae))
        )
        aux_recons = None
        if index is not None:
            # few candidates: their (N, n_c) pre-activations recomputed densely
            aux_recons = sparse.aux_candidate_reconstruction(
                sae_in, self.W_enc, b_enc, self.W_dec, index, default_k_aux(self.cfg.d_in),
                rescale_acts_by_decoder_norm=rescale,
            )  # fmt: skip
        elif aux_pairs is not None:
            aux_recons = sparse.sparse_encode_decode(
                sae_in, self.W_enc, b_enc, self.W_dec, None, aux_pairs,
                rescale_acts_by_decoder_norm=rescale, kept=aux_kept,
            )[0]  # fmt: skip
        return pairs, feature_acts, acts.detach(), sae_out_pre, aux_recons

    @torch.no_grad()
    def _update_state(
        self, sae_in: torch.Tensor, pairs: ChoicePairs, n_tokens: int, loss: torch.Tensor
    ) -> None:
        """Fold this batch into the EMAs, the calibration buffer and the counters.

        ``n_tokens``: of the whole batch (all data-parallel ranks); the counts and
        smallest values are reduced over ranks, so every rank holds the same state.
        """
        decay = self.cfg.density_ema_decay
        counts = distributed.all_reduce_latent_counts(pairs, self.cfg.d_sae)  # (F,)
        density = counts.to(torch.float32) / n_tokens
        self.latent_density_ema.mul_(decay).add_(density, alpha=1 - decay)
        self._update_thresholds(pairs)
        self._record_calibration_tokens(sae_in)
        # The first step whose loss is not finite, kept on the device and read
        # only on the check schedule and before saving.
        # (over all data-parallel ranks, so every rank records the same step)
        bad = distributed.any_across_ranks(~torch.isfinite(loss))
        first_bad = (self.nonfinite_step < 0) & bad
        self.nonfinite_step.copy_(torch.where(first_bad, self.training_steps, self.nonfinite_step))
        self.training_steps.add_(1)

    def _update_thresholds(self, pairs: ChoicePairs) -> None:
        """Blend this batch's smallest kept value(s) into the threshold EMA."""
        raise NotImplementedError

    def _ema(self, old: torch.Tensor, new: torch.Tensor) -> None:
        # new: the batch's smallest kept value(s), inf where nothing was kept.
        # The first observation sets the value; later ones blend in.
        new = new.to(torch.float64)
        has_new = torch.isfinite(new)
        rate = self.cfg.threshold_ema_rate
        count = self.threshold_updates
        blended = torch.where(count == 0, new, (1 - rate) * old + rate * new)
        # Write through 1-D views: under torch.compile (aot_eager/inductor,
        # torch 2.13) an in-place write to a 0-d float64 graph input (the
        # Mutual Choice threshold) is silently dropped; a view's write is kept.
        old.view(-1).copy_(torch.where(has_new, blended, old).reshape(-1))
        count.view(-1).add_(has_new.to(count.dtype).reshape(-1))

    def _record_calibration_tokens(self, sae_in: torch.Tensor) -> None:
        # A ring buffer of the latest inputs, written at device positions so
        # nothing is read back.
        capacity = self.calibration_acts.shape[0]
        if capacity == 0:
            return
        x = sae_in.detach().reshape(-1, self.cfg.d_in)  # (N, d_in)
        n = x.shape[0]
        start = self.calibration_tokens_seen + max(n - capacity, 0)
        x = x[-capacity:]
        positions = (start + torch.arange(x.shape[0], device=x.device)) % capacity
        self.calibration_acts.index_copy_(0, positions, x.to(self.calibration_acts.dtype))
        self.calibration_tokens_seen.add_(n)

    # -- finiteness ------------------------------------------------------------------

    def raise_if_nonfinite(self, action: str = "training stopped") -> None:
        """Raise ``RuntimeError`` if a loss or a weight went NaN or inf (reads back).

        Names the first training step whose loss was not finite, which is
        where to look (an input batch with NaN, or a learning rate too high).
        """
        bad_step = int(self.nonfinite_step)
        if bad_step >= 0:
            raise RuntimeError(
                f"{self.cfg.architecture()}: {action}: the loss was NaN or inf at training "
                f"step {bad_step} (counting from 0) and the weights are no longer trustworthy; "
                "check that input batch for NaN/inf and the learning rate"
            )
        for name, param in self.named_parameters():
            n_bad = int((~torch.isfinite(param)).sum())
            if n_bad:
                raise RuntimeError(
                    f"{self.cfg.architecture()}: {action}: parameter {name} holds {n_bad} "
                    "NaN/inf value(s)"
                )

    @override
    def save_model(self, path: Any) -> Any:
        """SAELens's checkpoint save, refused for a SAE that went non-finite."""
        self.raise_if_nonfinite("refusing to save")
        return super().save_model(path)

    @override
    def save_inference_model(self, path: Any) -> Any:
        """Save as SAELens's ``jumprelu``; refused for a SAE that went non-finite."""
        self.raise_if_nonfinite("refusing to save")
        return super().save_inference_model(path)

    # -- auxiliary loss -------------------------------------------------------------

    def current_zipf_fit(self) -> ZipfFit:
        """Fit the Zipf–Mandelbrot curve to the density EMA over the configured window."""
        window = fit_rank_window(self.cfg.d_sae, self.cfg.zipf_fit_rank_window)
        return fit_zipf(self.latent_density_ema, window)

    def stored_zipf_fit(self) -> ZipfFit:
        """The latest fit (NaN before the first refit)."""
        alpha, beta, log_c, r2 = self.zipf_fit.unbind()
        return ZipfFit(
            alpha=alpha, beta=beta, log_C=log_c, r2=r2, n_points=r2.new_tensor(float("nan"))
        )

    def aux_candidates(
        self, dead_neuron_mask: torch.Tensor | None, step: int
    ) -> torch.Tensor | None:
        """The latents that take part in the auxiliary loss this step (None: no aux loss)."""
        if self.cfg.aux_loss == "none":
            return None
        if self.cfg.aux_loss != "aux_zipf" or self.cfg.zipf_underuse_ratio == 0:
            return dead_neuron_mask
        if step % self.cfg.zipf_refit_every == 0:
            # refit on schedule; the stored fit is used between refits
            fit = self.current_zipf_fit()
            self.zipf_fit.copy_(torch.stack([fit.alpha, fit.beta, fit.log_C, fit.r2]))
        # Before the first refit the stored fit is NaN: a comparison with NaN is
        # False, so only dead latents are candidates.
        return aux_candidate_mask(
            dead_neuron_mask,
            self.latent_density_ema,
            self.stored_zipf_fit(),
            self.cfg.zipf_underuse_ratio,
        )

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``aux_k`` / ``aux_zipf`` as SAELens's ``TrainingSAE`` API computes it.

        The candidates' top ``d_in // 2`` pre-activations per token reconstruct
        ``sae_in - sae_out``. (The training step computes the same loss itself,
        in the normalised space when ``normalize_activations`` normalises each
        token, and from the kept pairs in the sparse step.)
        """
        with torch.no_grad():
            step = self._step(step_input.n_training_steps)
            candidates = self.aux_candidates(step_input.dead_neuron_mask, step)
        if candidates is None:
            return {}
        recons = self.reshape_fn_out(
            self._dense_aux_reconstruction(hidden_pre, candidates), self.d_head
        )
        loss = aux_reconstruction_loss(
            recons,
            step_input.sae_in - sae_out,
            candidates,
            default_k_aux(self.cfg.d_in),
            coefficient=self.cfg.aux_loss_coefficient,
        )
        return {"auxiliary_reconstruction_loss": loss}

    # -- metrics ---------------------------------------------------------------------

    def _metrics(
        self, pairs: ChoicePairs, n_tokens: int, step_input: TrainStepInput
    ) -> dict[str, Any]:
        l0 = pairs.token_counts(n_tokens).to(torch.float32)  # (N,)
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
            fit = self.stored_zipf_fit()
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

    # -- saving as SAELens's JumpReLU -------------------------------------------------

    def calibration_target(self) -> Any:
        """What the saved thresholds must hit (see ``calibration.CalibrationTarget``)."""
        raise NotImplementedError

    def calibration_inputs(self) -> torch.Tensor:
        """The most recent training inputs kept for calibration, (M, d_in), oldest first.

        Reads the fill count back from the device. In the SAE's current input
        units: the activation-scaling and whitening folds at the end of
        training convert them along with the weights.
        """
        capacity = self.calibration_acts.shape[0]
        seen = int(self.calibration_tokens_seen)
        if seen <= capacity:
            return self.calibration_acts[:seen]
        start = seen % capacity
        return torch.cat([self.calibration_acts[start:], self.calibration_acts[:start]])

    def inference_thresholds(self, show_progress: bool = False) -> torch.Tensor:
        """(d_sae,) float64 thresholds for the saved JumpReLU, in ``hidden_pre`` units.

        Calibrated exactly (``calibration.compute_thresholds``) on the kept
        recent training tokens under the current weights, so they carry no lag
        from earlier weights. If :func:`~sae_lens_choice.calibrate_thresholds`
        ran on this SAE since its last training step, its thresholds are kept
        as they are. The threshold EMA, with a warning, when no tokens were
        kept (``threshold_calibration_tokens=0``, or a SAE saved before any
        training step).
        """
        from sae_lens_choice.calibration import compute_thresholds

        if self._thresholds_calibrated:
            # calibrate_thresholds ran since the last training step: keep its result
            return self.threshold.detach().to(torch.float64).expand(self.cfg.d_sae).clone()
        inputs = self.calibration_inputs()
        if inputs.shape[0] == 0:
            warnings.warn(
                f"{self.cfg.architecture()}: no calibration tokens kept "
                "(threshold_calibration_tokens=0 or no training step yet); saving the "
                "threshold EMA, which lags moving weights. Recalibrate the saved SAE with "
                "sae_lens_choice.calibrate_thresholds on held-out activations.",
                UserWarning,
                stacklevel=3,
            )
            return self.threshold.detach().to(torch.float64).expand(self.cfg.d_sae).clone()
        if self.hook_z_reshaping_mode and self.d_head is not None:
            inputs = inputs.reshape(inputs.shape[0], -1, self.d_head)
        was_training = self.training
        self.eval()
        try:
            return compute_thresholds(
                self,
                inputs.split(4096),
                target=self.calibration_target(),
                max_tokens=inputs.shape[0],
                show_progress=show_progress,
            )
        finally:
            self.train(was_training)

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Turn a training state dict into SAELens ``jumprelu`` weights.

        TopK's version folds the decoder norms into ``W_enc``/``b_enc`` when
        ``rescale_acts_by_decoder_norm``; ``hidden_pre`` is unchanged by that
        fold, so thresholds (in ``hidden_pre`` units) carry over as they are.
        """
        self.raise_if_nonfinite("refusing to save")
        thresholds = self.inference_thresholds(show_progress=True)
        super().process_state_dict_for_saving_inference(state_dict)
        for name in list(state_dict):
            if name not in ("W_enc", "b_enc", "W_dec", "b_dec"):
                del state_dict[name]
        state_dict["threshold"] = thresholds.to(device=self.W_dec.device, dtype=self.dtype)

    # -- folds done by SAELens at the end of training ------------------------------------

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        # The kept inputs were scaled like every training batch; the folded SAE
        # takes raw activations.
        self.calibration_acts.div_(scaling_factor)
        if self.cfg.rescale_acts_by_decoder_norm:
            # hidden_pre = (x W_enc + b_enc) * |W_dec|: W_enc grew by s but
            # |W_dec| shrank by s, so thresholds in hidden_pre units shrink by s.
            self.threshold /= scaling_factor

    @override
    @torch.no_grad()
    def fold_activation_whitening(
        self,
        mean: torch.Tensor,
        whitening_matrix: torch.Tensor,
        unwhitening_matrix: torch.Tensor,
    ) -> None:
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)
        # kept inputs z = (x - mean) @ M back to raw x = z @ M^-1 + mean
        acts = self.calibration_acts
        raw = acts.to(unwhitening_matrix.dtype) @ unwhitening_matrix.to(acts.device) + mean.to(
            acts.device, unwhitening_matrix.dtype
        )
        acts.copy_(raw.to(acts.dtype))


def _reset_step_offset(module: nn.Module, _incompatible_keys: Any) -> None:
    # after load_state_dict, re-read the checkpointed step at the next step
    module._step_offset = None  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# the 0.1.0 inference architecture (loading old folders)
# ---------------------------------------------------------------------------


@dataclass
class ChoiceSAEConfig(SAEConfig):
    """Fields shared by the 0.1.0 inference configs (``mutual_choice``/``feature_choice``).

    New SAEs are saved as SAELens's ``jumprelu``; these configs load folders
    saved by 0.1.0. Every field is validated on construction; an invalid or
    missing value raises ``ValueError`` naming the field.

    Args:
        k (float): Expected L0 per token the SAE was trained (and calibrated)
            for. Required: a config without it is rejected.
        rescale_acts_by_decoder_norm (bool): Multiply pre-activations by decoder
            row norms (as in TopK). Saved SAEs have the norms folded in, so
            this is then a no-op.
        inference_mode (str): ``"threshold"`` (per-token JumpReLU, default) or
            ``"batch"`` (the exact training allocation over the batch given).
    """

    k: float = None  # type: ignore[assignment]  (required: no sensible default)
    rescale_acts_by_decoder_norm: bool = False
    inference_mode: InferenceMode = "threshold"

    def __post_init__(self):
        validate_sae_fields(self)
        super().__post_init__()
        self.validate_choice_fields()

    def validate_choice_fields(self) -> None:
        """Check this package's fields (the architecture's field mixin adds its own)."""
        check_choice(self.inference_mode, "inference_mode", INFERENCE_MODES, owner=_owner(self))


class ChoiceSAE(TopKSAE):
    """0.1.0's inference SAE: a JumpReLU with choice thresholds, plus an exact batch mode.

    A TopK inference SAE but for the activation: TopK's decoding, its
    ``b_enc`` and its whitening fold (which folds the decoder norms first,
    through our :meth:`fold_W_dec_norm`, so thresholds follow).
    """

    cfg: ChoiceSAEConfig  # type: ignore[assignment]
    b_enc: nn.Parameter
    threshold: torch.Tensor

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.register_buffer(
            "threshold", torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device)
        )

    def batch_activation(self) -> ChoiceActivation:
        """A fresh training allocation module for the current config (batch mode)."""
        raise NotImplementedError

    def _batch_key(self) -> tuple[Any, ...]:
        """Config values the batch allocation depends on."""
        return tuple(
            getattr(self.cfg, f.name)
            for f in fields(self.cfg)
            if f.name not in ("metadata", "inference_mode")
        )

    def _current_batch_activation(self) -> Any:
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
        ``relu(hidden_pre) * (hidden_pre > threshold)``, exactly SAELens's
        ``JumpReLUSAE.encode``. ``inference_mode == "batch"``: the training
        allocation over all tokens in ``x`` (leading dimensions flattened), so a
        token's code depends on the rest of the batch; raises ``ValueError`` if
        ``hidden_pre`` holds NaN or inf.
        """
        hidden_pre = self.encode_hidden_pre(x)
        check_choice(
            self.cfg.inference_mode, "cfg.inference_mode", INFERENCE_MODES, owner=_owner(self.cfg)
        )
        if self.cfg.inference_mode == "batch":
            acts = self._current_batch_activation()(hidden_pre)
        else:
            acts = jumprelu(hidden_pre, self.threshold)
        return self.hook_sae_acts_post(acts)

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
        if "latent_density_ema" in state_dict or "latent_density_ema" + _PACKED in state_dict:
            raise ValueError(
                f"this {arch} folder is a training checkpoint (a training SAE's save_model), "
                "not a saved SAE: load it with sae_lens.TrainingSAE.load_from_disk to resume "
                "training, or load the folder save_inference_model wrote (the runner's "
                "output_path), which is SAELens's own jumprelu"
            )
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
        if threshold.numel() == 1 and threshold.ndim <= 1:
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


__all__ = [
    "AUX_LOSSES",
    "AuxLoss",
    "ChoiceSAE",
    "ChoiceSAEConfig",
    "ChoiceTrainingSAE",
    "ChoiceTrainingSAEConfig",
    "choice_hidden_pre",
    "jumprelu",
    "validate_sae_fields",
]
