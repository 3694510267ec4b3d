"""Feature Choice SAEs: latent j keeps its m_j largest tokens of the batch.

Capacities ``c_j`` (expected tokens per latent, summing to k * N) are uniform
or follow a Zipf–Mandelbrot law over the latent index (water-filled so none
exceeds N), and are rounded to integers ``m_j`` afresh for every batch without
bias, so a latent with ``c_j < 1`` still gets a token on a fraction ``c_j`` of
batches and cannot die. Saved for inference as SAELens's own ``jumprelu``
with one threshold per latent; the 0.1.0 inference architecture
(``"architecture": "feature_choice"``) stays loadable.
"""

# No `from __future__ import annotations` here: SAELens's CLI (simple_parsing)
# resolves config field annotations such as `Capacity` at run time, in
# the modules of the base classes, where these aliases are not defined.

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from typing_extensions import override

from sae_lens_choice.allocation import (
    ChoicePairs,
    FeatureChoicePlan,
    capacity_bounds,
    check_zipf_parameters,
    feature_choice_pairs,
    plan_feature_choice,
    round_capacities,
    rounding_offset,
    uniform_capacities,
    zipf_capacities,
)
from sae_lens_choice.choice_base import (
    ChoiceActivation,
    ChoiceSAE,
    ChoiceSAEConfig,
    ChoiceTrainingSAE,
    ChoiceTrainingSAEConfig,
    threshold_summary,
)
from sae_lens_choice.distributed import feature_choice_pairs_distributed, global_smallest_value
from sae_lens_choice.validation import check_choice

Capacity = Literal["zipf", "uniform"]
CAPACITIES: tuple[str, ...] = ("zipf", "uniform")
CapacityOrder = Literal["index", "density_rank"]
CAPACITY_ORDERS: tuple[str, ...] = ("index", "density_rank")

__all__ = [
    "FeatureChoice",
    "FeatureChoiceSAE",
    "FeatureChoiceSAEConfig",
    "FeatureChoiceTrainingSAE",
    "FeatureChoiceTrainingSAEConfig",
    "target_densities",
]


def expected_capacities(
    n_tokens: int,
    d_sae: int,
    k: float,
    capacity: str = "zipf",
    zipf_alpha: float = 1.0,
    zipf_beta: float = 0.0,
) -> torch.Tensor:
    """Real-valued expected tokens per latent for a batch of ``n_tokens`` (float64, CPU)."""
    if capacity == "uniform":
        return uniform_capacities(n_tokens, d_sae, k)
    return zipf_capacities(n_tokens, d_sae, k, zipf_alpha, zipf_beta)


def target_densities(
    d_sae: int, k: float, capacity: str = "zipf", zipf_alpha: float = 1.0, zipf_beta: float = 0.0
) -> torch.Tensor:
    """Each latent's target firing density ``c_j / N`` (float64, (d_sae,)).

    Water-filling clips ``c_j`` at ``N``, i.e. densities at 1, so the result
    does not depend on ``N`` beyond rounding; it is computed for a batch
    large enough that no capacity reaches ``N`` unless it must.
    """
    n = max(d_sae, 4096)
    return expected_capacities(n, d_sae, k, capacity, zipf_alpha, zipf_beta) / n


@dataclass(eq=False, repr=False)
class FeatureChoice(ChoiceActivation):
    """Latent j keeps its m_j largest tokens; m_j rounded afresh for every batch.

    Expected capacities depend on the number of tokens N, so they (and the
    grouping plan) are computed once per N and cached. ``generator`` draws the
    rounding offsets a call is not given (``None``: torch's global RNG).
    """

    k: float
    d_sae: int
    capacity: Capacity = "zipf"
    zipf_alpha: float = 1.0
    zipf_beta: float = 0.0
    validate: bool = True
    generator: torch.Generator | None = field(default=None, init=False)
    _cache: dict[tuple[int, str], tuple[torch.Tensor, FeatureChoicePlan]] = field(
        default_factory=dict, init=False
    )

    def expected_capacities(self, n_tokens: int) -> torch.Tensor:
        """Real-valued expected tokens per latent for ``n_tokens`` tokens (float64, CPU)."""
        return expected_capacities(
            n_tokens, self.d_sae, self.k, self.capacity, self.zipf_alpha, self.zipf_beta
        )

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

    def capacities(
        self,
        n_tokens: int,
        device: torch.device,
        offset: float | torch.Tensor | None = None,
        ranking: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, FeatureChoicePlan]:
        """A batch's integer capacities (F,) and the plan to select with them.

        Args:
            n_tokens: tokens in the batch (of all data-parallel ranks).
            device: where the capacities go.
            offset: the capacity-rounding offset in [0, 1) (a 0-d tensor on the
                device in training, see ``allocation.rounding_offset``); drawn
                from ``generator`` (or torch's global RNG) when ``None``.
            ranking: (F,) int64 latents from the densest down: the i-th of
                them gets the i-th largest capacity (``capacity_order=
                "density_rank"``). ``None``: latent j gets capacity j.
        """
        c, plan = self.capacities_and_plan(n_tokens, device)
        capacities = round_capacities(c, generator=self.generator, offset=offset)
        if ranking is not None:
            # c is non-increasing over its index (Zipf, uniform), so its plan has
            # no order of its own: the ranking becomes the plan's latent order
            assert plan.order is None
            plan = FeatureChoicePlan(plan.d_sae, plan.n_tokens, plan.groups, ranking)
            capacities = torch.empty_like(capacities).scatter_(0, ranking, capacities)
        return capacities, plan

    @override
    def pairs(
        self,
        hidden_pre: torch.Tensor,
        offset: float | torch.Tensor | None = None,
        ranking: torch.Tensor | None = None,
    ) -> ChoicePairs:
        """The kept (token, latent) pairs of this batch (no autograd); see :meth:`capacities`."""
        n_tokens = hidden_pre.numel() // hidden_pre.shape[-1]
        capacities, plan = self.capacities(n_tokens, hidden_pre.device, offset, ranking)
        return feature_choice_pairs(hidden_pre, capacities, plan=plan, validate=self.validate)


@dataclass
class FeatureChoiceFields:
    """The fields Feature Choice adds to both its configs (training, 0.1.0 inference).

    Args:
        capacity (str): ``"zipf"`` or ``"uniform"``.
        zipf_alpha (float): Zipf exponent of the capacities, > 0.
        zipf_beta (float): Zipf–Mandelbrot offset of the capacities, > -1.
    """

    capacity: Capacity = "zipf"
    zipf_alpha: float = 1.0
    zipf_beta: float = 0.0

    @classmethod
    def architecture(cls) -> str:
        """SAELens's architecture name."""
        return "feature_choice"

    def validate_choice_fields(self) -> None:
        """The base config's checks, then this architecture's."""
        super().validate_choice_fields()  # type: ignore[misc]
        check_choice(self.capacity, "capacity", CAPACITIES, owner="feature_choice config")
        check_zipf_parameters(self.zipf_alpha, self.zipf_beta, owner="feature_choice config")


@dataclass
class FeatureChoiceTrainingSAEConfig(FeatureChoiceFields, ChoiceTrainingSAEConfig):
    """Configuration for training a Feature Choice SAE (``architecture="feature_choice"``).

    Latent j keeps its m_j largest tokens of the batch, with sum m_j = k * N.
    Saved for inference as SAELens's ``jumprelu`` with one threshold per latent.

    Args:
        capacity (str): ``"uniform"`` (c_j = k * N / F; the default) or
            ``"zipf"`` (the paper's: c_j proportional to (j + 1 + zipf_beta) **
            -zipf_alpha, water-filled at N). Uniform is the default because it
            reconstructed better, with more CE loss recovered, in
            ``benchmarks/convergence.py``'s study on a real LM (results in
            ``docs/archive/2026-11-24/convergence.md``); saved 0.1.0 folders
            name their capacity.
        capacity_order (str): which latent gets which capacity. ``"index"``
            (the paper's rule): latent j gets the j-th largest, so the Zipf law
            is imposed on latent IDs. ``"density_rank"`` (beyond the paper): the
            latent of the i-th highest running density (``latent_density_ema``)
            gets the i-th largest, so the law is imposed on the sorted
            densities and a latent's capacity follows how often it fires.
        zipf_alpha (float): Zipf exponent of the capacities, > 0.
        zipf_beta (float): Zipf–Mandelbrot offset of the capacities, > -1.
    """

    capacity: Capacity = "uniform"
    aux_loss: Any = "none"
    capacity_order: CapacityOrder = "index"

    @override
    def validate_choice_fields(self) -> None:
        super().validate_choice_fields()
        check_choice(
            self.capacity_order, "capacity_order", CAPACITY_ORDERS, owner="feature_choice config"
        )
        if self.capacity_order != "index" and self.capacity == "uniform":
            # every latent has the same uniform capacity: there is nothing to order
            raise ValueError(
                f"feature_choice config: capacity_order={self.capacity_order!r} orders Zipf "
                "capacities, but capacity='uniform' gives every latent the same one; set "
                "capacity='zipf' (or leave capacity_order='index')"
            )


class FeatureChoiceTrainingSAE(ChoiceTrainingSAE):
    """Feature Choice training SAE: each latent takes its m_j best tokens.

    Computes ``hidden_pre`` as the transpose of an (F, N) product so the
    per-latent top-k runs over contiguous rows (see ``feature_choice``).
    Capacities are rounded with the offset of ``allocation.rounding_offset``
    at the SAE's own step counter, so a resumed run, and every data-parallel
    rank, draws exactly the capacities of the uninterrupted run. Tracks one
    threshold per latent; saved as SAELens's ``jumprelu`` with per-latent
    thresholds calibrated on the most recent training tokens.
    """

    cfg: FeatureChoiceTrainingSAEConfig  # type: ignore[assignment]
    activation_fn: FeatureChoice

    def __init__(self, cfg: FeatureChoiceTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        cfg = self.cfg
        # finiteness is tracked by the training step, not checked per batch
        return FeatureChoice(
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
    def select(self, scores: torch.Tensor, rank_sizes: list[int] | None = None) -> ChoicePairs:
        # the offset of this step, computed on the device from the checkpointed
        # step counter (no read-back): the same on every data-parallel rank
        offset = rounding_offset(self.training_steps)
        ranking = self.capacity_ranking()
        if rank_sizes is None:
            return self.activation_fn.pairs(scores, offset=offset, ranking=ranking)
        capacities, plan = self.activation_fn.capacities(
            sum(rank_sizes), scores.device, offset, ranking
        )
        return feature_choice_pairs_distributed(
            scores, capacities, plan=plan, rank_sizes=rank_sizes, validate=False
        )

    def capacity_ranking(self) -> torch.Tensor | None:
        """Latents from the densest down, when capacities follow the density rank.

        Ties (the equal initial densities) keep index order, so a fresh SAE
        starts with the paper's assignment.
        """
        if self.cfg.capacity_order == "index":
            return None
        return torch.argsort(self.latent_density_ema, descending=True, stable=True)

    @override
    def _update_thresholds(self, pairs: ChoicePairs) -> None:
        self._ema(self.threshold, global_smallest_value(pairs, self.cfg.d_sae))

    @override
    def _threshold_metrics(self) -> dict[str, torch.Tensor]:
        return threshold_summary(self.threshold)

    @override
    def calibration_target(self) -> Any:
        from sae_lens_choice.calibration import CalibrationTarget

        cfg = self.cfg
        densities = target_densities(cfg.d_sae, cfg.k, cfg.capacity, cfg.zipf_alpha, cfg.zipf_beta)
        ranking = self.capacity_ranking()
        if ranking is not None:
            densities = torch.empty_like(densities).scatter_(0, ranking.cpu(), densities)
        return CalibrationTarget(k=cfg.k, densities=densities)

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        ranking = self.capacity_ranking()
        if ranking is not None:
            # which latent holds which capacity is state, not config: the saved
            # metadata carries it so calibrate_thresholds can find each target
            self.cfg.metadata.capacity_ranking = ranking.tolist()

    def expected_capacities(self, n_tokens: int) -> torch.Tensor:
        """Expected tokens per latent for a batch of ``n_tokens`` (float64)."""
        return self.activation_fn.expected_capacities(n_tokens)


# ---------------------------------------------------------------------------
# the 0.1.0 inference architecture
# ---------------------------------------------------------------------------


@dataclass
class FeatureChoiceSAEConfig(FeatureChoiceFields, ChoiceSAEConfig):
    """0.1.0 inference config (``"architecture": "feature_choice"``), kept for loading.

    The capacity fields matter for batch mode and for
    :func:`~sae_lens_choice.calibrate_thresholds` (target densities).

    Args:
        capacity (str): ``"zipf"`` or ``"uniform"``, as in training.
        zipf_alpha (float): Zipf exponent of the capacities, > 0.
        zipf_beta (float): Zipf–Mandelbrot offset of the capacities, > -1.
    """


class FeatureChoiceSAE(ChoiceSAE):
    """0.1.0 Feature Choice inference SAE: one threshold per latent.

    Batch mode gives latent j its m_j largest tokens of the batch, the integer
    capacities rounded as in training; the rounding offset comes from a
    generator seeded with ``batch_rounding_seed`` on every call, so encoding
    is a deterministic function of the batch. ``batch_rounding_seed = None``
    draws from torch's global RNG. New SAEs are saved as SAELens's
    ``jumprelu``; this class loads folders saved by 0.1.0.
    """

    cfg: FeatureChoiceSAEConfig  # type: ignore[assignment]
    batch_rounding_seed: int | None = 0

    def __init__(self, cfg: FeatureChoiceSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)  # type: ignore[arg-type]  (TopKSAE's decoding, our config)

    @override
    def batch_activation(self) -> FeatureChoice:
        cfg = self.cfg
        return FeatureChoice(cfg.k, cfg.d_sae, cfg.capacity, cfg.zipf_alpha, cfg.zipf_beta)

    @override
    def _current_batch_activation(self) -> FeatureChoice:
        fn = super()._current_batch_activation()
        seed = self.batch_rounding_seed
        fn.generator = None if seed is None else torch.Generator().manual_seed(seed)
        return fn
