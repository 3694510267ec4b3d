"""Tests for ``sae_lens_choice.allocation``.

Three layers, as in SAELens's ``tests/saes/test_batchtopk_sae.py``:

- tiny hand-worked examples with the arithmetic in comments;
- hypothesis property tests against brute-force references that fully sort
  the row / column / flattened matrix (no top-k anywhere in the references);
- equality with SAELens's own ``TopK`` and ``BatchTopK`` activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.topk_sae import TopK

from sae_lens_choice import allocation
from sae_lens_choice.allocation import (
    FeatureChoicePlan,
    batch_budget,
    capacity_bounds,
    check_finite,
    default_candidates_per_token,
    feature_choice,
    mutual_choice,
    plan_feature_choice,
    round_capacities,
    token_choice,
    uniform_capacities,
    zipf_capacities,
)

# Hypothesis examples are small tensors; a few dozen per property keeps the
# whole file at a few seconds on 2 CPU cores.
FAST = settings(max_examples=40, deadline=None)

METHODS = ["flat", "candidates", "auto"]


# ---------------------------------------------------------------------------
# helpers: inputs and brute-force references
# ---------------------------------------------------------------------------


def _distinct_values(
    shape: tuple[int, ...], seed: int, neg_frac: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Distinct half-integers, none zero, about ``neg_frac`` of them negative.

    A shuffled ``arange`` has no ties, so every rule has exactly one correct
    answer and the comparison with a reference can be exact. Half-integers
    stay exact in float32 and keep zero (relu's boundary) out of the data.
    """
    gen = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    perm = torch.randperm(numel, generator=gen).to(dtype)
    return ((perm - round(neg_frac * numel) + 0.5) * 0.5).reshape(shape)


def _tied_values(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Small integers in [-3, 3]: many ties, including at every threshold."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=gen).to(torch.float32)


def _ref_token_keep(x2: torch.Tensor, k: int) -> torch.Tensor:
    # x2: (N, F) -> bool (N, F): each row's k largest, by a full sort of the row
    order = torch.sort(x2, dim=-1, descending=True).indices  # (N, F)
    keep = torch.zeros_like(x2, dtype=torch.bool)
    keep.scatter_(-1, order[:, :k], True)
    return keep & (x2 > 0)


def _ref_mutual_keep(x2: torch.Tensor, budget: int) -> torch.Tensor:
    # x2: (N, F) -> bool (N, F): the budget largest of the whole matrix
    order = torch.sort(x2.reshape(-1), descending=True).indices  # (N*F,)
    keep = torch.zeros(x2.numel(), dtype=torch.bool)
    keep[order[:budget]] = True
    return keep.reshape(x2.shape) & (x2 > 0)


def _ref_feature_keep(x2: torch.Tensor, capacities: torch.Tensor) -> torch.Tensor:
    # x2: (N, F) -> bool (N, F): column j's capacities[j] largest, by a full sort
    n_tokens = x2.shape[0]
    order = torch.sort(x2.t(), dim=-1, descending=True).indices  # (F, N)
    in_capacity = torch.arange(n_tokens)[None, :] < capacities[:, None]  # (F, N) by rank
    keep_t = torch.zeros_like(in_capacity).scatter(-1, order, in_capacity)  # (F, N) by token
    return keep_t.t() & (x2 > 0)


def _assert_is_selection(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` must be relu(x) on some set and zero elsewhere; returns that set (N, F)."""
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert bool((out >= 0).all())
    kept = out > 0
    # kept entries carry the pre-activation unchanged; everything else is 0
    torch.testing.assert_close(out[kept], x[kept], rtol=0, atol=0)
    assert bool((out[~kept] == 0).all())
    return kept.reshape(-1, x.shape[-1])


def _assert_greedy(x2: torch.Tensor, kept: torch.Tensor, dim: int | None) -> None:
    """Every kept value >= every dropped positive value in the same scope.

    ``dim=None``: the whole matrix; ``dim=-1``: within each row (token);
    ``dim=0``: within each column (latent).
    """
    inf = torch.tensor(float("inf"), dtype=x2.dtype)
    dropped = (x2 > 0) & ~kept
    kept_vals = torch.where(kept, x2, inf)
    dropped_vals = torch.where(dropped, x2, -inf)
    if dim is None:
        assert kept_vals.min() >= dropped_vals.max()
    else:
        assert bool((kept_vals.amin(dim) >= dropped_vals.amax(dim)).all())


def _expected_budget(k: float, n_tokens: int) -> int:
    # Written independently of batch_budget: k * N rounded half up.
    return math.floor(k * n_tokens + 0.5)


@st.composite
def _shapes(draw: st.DrawFn, max_lead_dims: int = 3, max_d_sae: int = 12) -> tuple[int, ...]:
    """1-D to 4-D shapes: up to 3 leading (token) dims and a latent dim."""
    n_lead = draw(st.integers(0, max_lead_dims))
    lead = draw(st.lists(st.integers(1, 4), min_size=n_lead, max_size=n_lead))
    d_sae = draw(st.integers(1, max_d_sae))
    return (*lead, d_sae)


_seeds = st.integers(0, 2**31 - 1)
_neg_fracs = st.sampled_from([0.0, 0.3, 0.7, 1.0])


# ---------------------------------------------------------------------------
# hand-worked examples
# ---------------------------------------------------------------------------

# Two tokens, four latents; sorted, the entries are 3 > 2 > 1 > 0.5 > -0.5 > -1 > -2 > -3.
HAND = torch.tensor(
    [
        [3.0, -1.0, 2.0, 0.5],
        [-2.0, -3.0, 1.0, -0.5],
    ]
)
# Its three largest entries (3, 2, 1) in place, zeros elsewhere.
HAND_TOP3 = torch.tensor(
    [
        [3.0, 0.0, 2.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
    ]
)


def test_batch_budget_rounds_half_up() -> None:
    assert batch_budget(2.5, 3) == 8  # 7.5 -> 8
    assert batch_budget(2.0, 3) == 6
    assert batch_budget(0.1, 4) == 0  # 0.4 -> 0: a batch may get no pairs at all
    assert batch_budget(0.125, 4) == 1  # 0.5 -> 1
    assert batch_budget(1.7, 10) == 17


def test_token_choice_hand_worked() -> None:
    # k=2. Token 0: 3 (latent 0) and 2 (latent 2).
    # Token 1: 1 (latent 2) and -0.5 (latent 3); relu turns -0.5 into 0, so token 1
    # keeps only one positive latent: 3, 2 and 1 are kept, HAND's three largest.
    torch.testing.assert_close(token_choice(HAND, 2), HAND_TOP3)


@pytest.mark.parametrize("method", METHODS)
def test_mutual_choice_hand_worked(method: str) -> None:
    # k=2, N=2 -> T=4 pairs for the batch: 3, 2, 1, 0.5.
    # Token 0 takes three of them (3, 2, 0.5) and token 1 one (1): L0 3 and 1,
    # mean 2 = k. Token choice would have given token 0 only two. The four are
    # all of HAND's positive entries.
    out = mutual_choice(HAND, 2, method=method, candidates_per_token=2)  # type: ignore[arg-type]
    torch.testing.assert_close(out, HAND.relu())


def test_mutual_choice_fractional_k_hand_worked() -> None:
    # k=1.25, N=2 -> T = round(2.5) = 3 pairs (halves round up): 3, 2, 1.
    torch.testing.assert_close(mutual_choice(HAND, 1.25), HAND_TOP3)


def test_mutual_choice_budget_beyond_positives_keeps_only_positives() -> None:
    # k=4, N=2 -> T=8: every entry is within budget, but only the four positive
    # ones (3, 2, 0.5, 1) may be kept.
    out = mutual_choice(HAND, 4)
    torch.testing.assert_close(out, HAND.relu())


def test_mutual_choice_zero_budget_returns_zeros() -> None:
    # k=0.2, N=2 -> T = round(0.4) = 0.
    out = mutual_choice(HAND, 0.2)
    assert out.shape == HAND.shape
    assert bool((out == 0).all())


@pytest.mark.parametrize("use_plan", [False, True])
def test_feature_choice_hand_worked(use_plan: bool) -> None:
    # capacities (tokens per latent) = [2, 0, 2, 1]
    # latent 0: column (3, -2), top 2 -> both, but -2 is negative: keeps token 0 only
    # latent 1: capacity 0 -> nothing
    # latent 2: column (2, 1), top 2 -> both tokens
    # latent 3: column (0.5, -0.5), top 1 -> token 0
    capacities = torch.tensor([2, 0, 2, 1])
    plan = plan_feature_choice(capacities, n_tokens=2) if use_plan else None
    # So every positive entry of HAND is kept.
    torch.testing.assert_close(feature_choice(HAND, capacities, plan=plan), HAND.relu())


def test_uniform_capacities_hand_worked() -> None:
    # T = k * N = 2 * 6 = 12 pairs over F = 4 latents -> 3 each.
    c = uniform_capacities(n_tokens=6, d_sae=4, k=2)
    assert c.dtype == torch.float64
    torch.testing.assert_close(c, torch.full((4,), 3.0, dtype=torch.float64))
    # T = 1 * 4 = 4 over F = 16 latents -> 0.25 each: fewer pairs than latents.
    torch.testing.assert_close(
        uniform_capacities(n_tokens=4, d_sae=16, k=1), torch.full((16,), 0.25, dtype=torch.float64)
    )


def test_zipf_capacities_hand_worked_one_clipped() -> None:
    # N=10, F=3, k=2, alpha=1, beta=0 -> T=20, weights 1, 1/2, 1/3 (sum 11/6).
    # Unclipped latent 0 would get 20 * 6/11 = 10.9 > N = 10: clip it to 10.
    # The remaining 10 go to weights 1/2, 1/3 (sum 5/6): 10 * 3/5 = 6 and 10 * 2/5 = 4.
    c = zipf_capacities(n_tokens=10, d_sae=3, k=2, alpha=1.0, beta=0.0)
    torch.testing.assert_close(c, torch.tensor([10.0, 6.0, 4.0], dtype=torch.float64))


def test_zipf_capacities_hand_worked_cascade() -> None:
    # N=4, F=4, k=3, alpha=2 -> T=12, weights 1, 1/4, 1/9, 1/16.
    # Latent 0: 12 * 1 / (1 + 1/4 + 1/9 + 1/16) = 8.4 > 4 -> clip to 4, 8 left.
    # Latent 1: 8 * (1/4) / (1/4 + 1/9 + 1/16) = 4.7 > 4 -> clip to 4, 4 left.
    # Latents 2, 3 share 4 in ratio 1/9 : 1/16 = 16 : 9 -> 2.56 and 1.44.
    c = zipf_capacities(n_tokens=4, d_sae=4, k=3, alpha=2.0, beta=0.0)
    torch.testing.assert_close(c, torch.tensor([4.0, 4.0, 2.56, 1.44], dtype=torch.float64))


def test_zipf_capacities_hand_worked_beta() -> None:
    # N=100, F=2, k=1, alpha=1, beta=1 -> T=100, weights 1/2, 1/3: 60 and 40.
    c = zipf_capacities(n_tokens=100, d_sae=2, k=1, alpha=1.0, beta=1.0)
    torch.testing.assert_close(c, torch.tensor([60.0, 40.0], dtype=torch.float64))


def test_zipf_capacities_all_at_n_when_k_equals_d_sae() -> None:
    # k = F means T = F * N: every latent takes every token.
    c = zipf_capacities(n_tokens=5, d_sae=3, k=3, alpha=1.5)
    torch.testing.assert_close(c, torch.full((3,), 5.0, dtype=torch.float64))


def test_round_capacities_hand_worked() -> None:
    # c = [0.5, 1.5, 1.0], cumulative C = [0.5, 2.0, 3.0], m_j = floor(C_j + u) - floor(C_{j-1} + u).
    # u < 0.5:  floor(C + u) = [0, 2, 3] -> m = [0, 2, 1]
    # u >= 0.5: floor(C + u) = [1, 2, 3] -> m = [1, 1, 1]
    c = torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    seen = {tuple(round_capacities(c, gen).tolist()) for _ in range(64)}
    assert seen == {(0, 2, 1), (1, 1, 1)}


def test_round_capacities_integral_input_is_unchanged() -> None:
    c = torch.tensor([3.0, 0.0, 7.0, 1.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        m = round_capacities(c, gen)
        assert m.dtype == torch.long
        assert m.tolist() == [3, 0, 7, 1]


def test_capacity_bounds_hand_worked() -> None:
    # ceil(c) capped at N=4: [4, 4, ceil(2.56)=3, ceil(1.44)=2, 0]
    c = torch.tensor([4.0, 4.0, 2.56, 1.44, 0.0], dtype=torch.float64)
    assert capacity_bounds(c, 4).tolist() == [4, 4, 3, 2, 0]
    # and never above N even if c is (by floating error) a hair above it
    assert capacity_bounds(torch.tensor([4.0000001]), 4).tolist() == [4]


def test_plan_feature_choice_hand_worked_sorted() -> None:
    # bounds [10, 6, 4, 3, 1, 0], growth 2: a group continues while bound * 2 > group k.
    #   start 0, k=10: 6*2=12 > 10 joins, 4*2=8 does not -> (0, 2, 10)
    #   start 2, k=4:  3*2=6 > 4 joins,   1*2=2 does not -> (2, 4, 4)
    #   start 4, k=1:  0*2=0 does not                    -> (4, 5, 1)
    #   start 5, k=0: the rest get no tokens             -> stop
    plan = plan_feature_choice(torch.tensor([10, 6, 4, 3, 1, 0]), n_tokens=10, growth=2.0)
    assert plan.order is None
    assert plan.groups == ((0, 2, 10), (2, 4, 4), (4, 5, 1))
    assert (plan.d_sae, plan.n_tokens) == (6, 10)


def test_plan_feature_choice_hand_worked_unsorted() -> None:
    # bounds [1, 10, 0, 4] are not non-increasing: sorted (stable, descending) the
    # order is latents [1, 3, 0, 2] with bounds [10, 4, 1, 0].
    #   k=10: 4*2=8 does not join -> (0, 1, 10); k=4: 1*2=2 does not -> (1, 2, 4);
    #   k=1: 0 does not -> (2, 3, 1); then bound 0 stops.
    plan = plan_feature_choice(torch.tensor([1, 10, 0, 4]), n_tokens=10)
    assert plan.order is not None
    assert plan.order.tolist() == [1, 3, 0, 2]
    assert plan.groups == ((0, 1, 10), (1, 2, 4), (2, 3, 1))


# ---------------------------------------------------------------------------
# property tests: token choice
# ---------------------------------------------------------------------------


@FAST
@given(shape=_shapes(), seed=_seeds, neg_frac=_neg_fracs, data=st.data())
def test_token_choice_matches_full_sort(
    shape: tuple[int, ...], seed: int, neg_frac: float, data: st.DataObject
) -> None:
    k = data.draw(st.integers(1, shape[-1]), label="k")
    x = _distinct_values(shape, seed, neg_frac)
    out = token_choice(x, k)
    kept = _assert_is_selection(out, x)
    x2 = x.reshape(-1, shape[-1])
    assert torch.equal(kept, _ref_token_keep(x2, k))
    assert torch.equal(kept.sum(-1), (x2 > 0).sum(-1).clamp(max=k))
    _assert_greedy(x2, kept, dim=-1)


@FAST
@given(shape=_shapes(), seed=_seeds, data=st.data())
def test_token_choice_budget_with_ties(
    shape: tuple[int, ...], seed: int, data: st.DataObject
) -> None:
    k = data.draw(st.integers(1, shape[-1]), label="k")
    x = _tied_values(shape, seed)
    kept = _assert_is_selection(token_choice(x, k), x)
    x2 = x.reshape(-1, shape[-1])
    assert torch.equal(kept.sum(-1), (x2 > 0).sum(-1).clamp(max=k))
    _assert_greedy(x2, kept, dim=-1)


def test_token_choice_accepts_integral_float_k() -> None:
    torch.testing.assert_close(token_choice(HAND, 2.0), token_choice(HAND, 2))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# property tests: mutual choice
# ---------------------------------------------------------------------------


@FAST
@given(shape=_shapes(), seed=_seeds, neg_frac=_neg_fracs, data=st.data())
@pytest.mark.parametrize("method", METHODS)
def test_mutual_choice_matches_full_sort(
    method: str, shape: tuple[int, ...], seed: int, neg_frac: float, data: st.DataObject
) -> None:
    d_sae = shape[-1]
    # Float k anywhere in (0, F], including budgets that round to 0.
    k = data.draw(st.floats(0.01, float(d_sae), allow_nan=False), label="k")
    candidates = data.draw(st.one_of(st.none(), st.integers(1, d_sae)), label="candidates")
    x = _distinct_values(shape, seed, neg_frac)
    out = mutual_choice(x, k, method=method, candidates_per_token=candidates)  # type: ignore[arg-type]
    kept = _assert_is_selection(out, x)
    x2 = x.reshape(-1, d_sae)
    budget = _expected_budget(k, x2.shape[0])
    assert torch.equal(kept, _ref_mutual_keep(x2, budget))
    assert int(kept.sum()) == min(budget, int((x2 > 0).sum()))
    _assert_greedy(x2, kept, dim=None)


@FAST
@given(shape=_shapes(), seed=_seeds, data=st.data())
@pytest.mark.parametrize("method", METHODS)
def test_mutual_choice_budget_with_ties(
    method: str, shape: tuple[int, ...], seed: int, data: st.DataObject
) -> None:
    d_sae = shape[-1]
    k = data.draw(st.floats(0.01, float(d_sae), allow_nan=False), label="k")
    candidates = data.draw(st.one_of(st.none(), st.integers(1, d_sae)), label="candidates")
    x = _tied_values(shape, seed)
    out = mutual_choice(x, k, method=method, candidates_per_token=candidates)  # type: ignore[arg-type]
    kept = _assert_is_selection(out, x)
    x2 = x.reshape(-1, d_sae)
    budget = _expected_budget(k, x2.shape[0])
    assert int(kept.sum()) == min(budget, int((x2 > 0).sum()))
    _assert_greedy(x2, kept, dim=None)


# The candidate shortcut's exact fallbacks: a flat top-k over the whole matrix and,
# where the module has it, a top-k over a pool widened by the saturated tokens' rows.
_FALLBACKS = ("_flat_top", "_widen_candidates")


class _FallbackSpy:
    """Counts calls to the exact fallbacks of ``mutual_choice`` and forwards them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = {name: 0 for name in _FALLBACKS if hasattr(allocation, name)}
        for name in self.calls:
            monkeypatch.setattr(allocation, name, self._wrap(name, getattr(allocation, name)))

    def _wrap(self, name: str, inner: Callable) -> Callable:
        def spy(*args: object, **kwargs: object) -> object:
            self.calls[name] += 1
            return inner(*args, **kwargs)

        return spy

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def test_mutual_choice_candidates_falls_back_when_a_token_saturates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 8 tokens, 32 latents, k=2 -> T=16; each token offers c=3 candidates.
    # Token 0's values are huge, so all 3 of its candidates are chosen (saturated)
    # while it deserves all 16 pairs: the shortcut alone would give it 3, so an
    # exact fallback must take over.
    x = _distinct_values((8, 32), seed=0, neg_frac=0.5)
    x[0] += 1000.0
    spy = _FallbackSpy(monkeypatch)
    out = mutual_choice(x, 2, method="candidates", candidates_per_token=3)
    assert spy.total >= 1
    kept = _assert_is_selection(out, x)
    assert torch.equal(kept, _ref_mutual_keep(x, 16))
    assert int(kept[0].sum()) == 16


@pytest.mark.parametrize("n_busy", [1, 3, 16])
def test_mutual_choice_candidates_exact_with_few_or_many_saturated_tokens(
    monkeypatch: pytest.MonkeyPatch, n_busy: int
) -> None:
    # 64 tokens, 96 latents, k=3 -> T=192, c=12 (the default). `n_busy` tokens are
    # shifted far above the rest, so all their 12 candidates are among the top 192
    # (16 * 12 = 192 exactly): they saturate. A few of them (a pool widened by
    # their rows suffices) or a quarter of the batch (a flat top-k is cheaper).
    x = _distinct_values((64, 96), seed=10 + n_busy, neg_frac=0.5)
    x[:n_busy] += 10_000.0
    spy = _FallbackSpy(monkeypatch)
    out = mutual_choice(x, 3, method="candidates")
    assert spy.total >= 1
    kept = _assert_is_selection(out, x)
    assert torch.equal(kept, _ref_mutual_keep(x, 192))
    # the busy tokens take every pair they can: all 96 latents each, up to T
    assert int(kept[:n_busy].sum()) == min(192, 96 * n_busy)


def test_mutual_choice_candidates_shortcut_is_used_when_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Guards against the property tests passing only because every case fell back:
    # on a balanced batch the candidate shortcut answers on its own.
    x = _distinct_values((64, 128), seed=1, neg_frac=0.5)
    spy = _FallbackSpy(monkeypatch)
    out = mutual_choice(x, 4, method="candidates")
    assert spy.total == 0
    assert torch.equal(_assert_is_selection(out, x), _ref_mutual_keep(x, 256))


def test_mutual_choice_auto_is_candidates_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _distinct_values((64, 128), seed=2, neg_frac=0.5)
    spy = _FallbackSpy(monkeypatch)
    mutual_choice(x, 4, method="auto")
    assert spy.total == 0
    # while "flat" always takes the flat top-k
    mutual_choice(x, 4, method="flat")
    assert spy.calls["_flat_top"] == 1


@pytest.mark.parametrize("c", [1, 2])
def test_mutual_choice_tiny_candidate_counts_stay_exact(c: int) -> None:
    # With one or two candidates per token almost every token saturates.
    x = _distinct_values((16, 24), seed=3, neg_frac=0.2)
    out = mutual_choice(x, 3, method="candidates", candidates_per_token=c)
    assert torch.equal(_assert_is_selection(out, x), _ref_mutual_keep(x, 48))


def test_default_candidates_per_token() -> None:
    # max(4 * ceil(k), ceil(k) + 8), capped at F
    assert default_candidates_per_token(1, 1000) == 9  # max(4, 9)
    assert default_candidates_per_token(2.5, 1000) == 12  # ceil 3: max(12, 11)
    assert default_candidates_per_token(32, 1000) == 128
    assert default_candidates_per_token(32, 100) == 100


# ---------------------------------------------------------------------------
# property tests: feature choice
# ---------------------------------------------------------------------------


def _random_capacities(n_tokens: int, d_sae: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n_tokens + 1, (d_sae,), generator=gen)


@FAST
@given(
    shape=_shapes(),
    seed=_seeds,
    neg_frac=_neg_fracs,
    plan_kind=st.sampled_from(["none", "exact", "loose"]),
    growth=st.sampled_from([1.5, 2.0, 4.0]),
)
def test_feature_choice_matches_full_sort(
    shape: tuple[int, ...], seed: int, neg_frac: float, plan_kind: str, growth: float
) -> None:
    x = _distinct_values(shape, seed, neg_frac)
    x2 = x.reshape(-1, shape[-1])
    n_tokens, d_sae = x2.shape
    gen = torch.Generator().manual_seed(seed + 1)
    capacities = _random_capacities(n_tokens, d_sae, gen)
    plan = None
    if plan_kind == "exact":
        plan = plan_feature_choice(capacities, n_tokens, growth=growth)
    elif plan_kind == "loose":
        # Bounds above the capacities and in no particular order (order is not None
        # unless the draw happens to be sorted).
        slack = torch.randint(0, n_tokens + 1, (d_sae,), generator=gen)
        plan = plan_feature_choice((capacities + slack).clamp(max=n_tokens), n_tokens, growth)
    out = feature_choice(x, capacities, plan=plan)
    kept = _assert_is_selection(out, x)
    assert torch.equal(kept, _ref_feature_keep(x2, capacities))
    assert torch.equal(kept.sum(0), torch.minimum(capacities, (x2 > 0).sum(0)))
    _assert_greedy(x2, kept, dim=0)


@FAST
@given(shape=_shapes(), seed=_seeds, use_plan=st.booleans())
def test_feature_choice_budget_with_ties(shape: tuple[int, ...], seed: int, use_plan: bool) -> None:
    x = _tied_values(shape, seed)
    x2 = x.reshape(-1, shape[-1])
    n_tokens, d_sae = x2.shape
    capacities = _random_capacities(n_tokens, d_sae, torch.Generator().manual_seed(seed))
    plan = plan_feature_choice(capacities, n_tokens) if use_plan else None
    kept = _assert_is_selection(feature_choice(x, capacities, plan=plan), x)
    assert torch.equal(kept.sum(0), torch.minimum(capacities, (x2 > 0).sum(0)))
    _assert_greedy(x2, kept, dim=0)


def test_feature_choice_unsorted_plan_matches_full_sort() -> None:
    # Bounds deliberately out of order, spread over several groups.
    x = _distinct_values((40, 9), seed=4, neg_frac=0.3)
    bounds = torch.tensor([3, 40, 0, 17, 1, 40, 8, 2, 25])
    plan = plan_feature_choice(bounds, n_tokens=40)
    assert plan.order is not None
    assert len(plan.groups) > 2
    capacities = torch.tensor([3, 31, 0, 9, 1, 40, 8, 0, 25])  # each <= its bound
    out = feature_choice(x, capacities, plan=plan)
    assert torch.equal(_assert_is_selection(out, x), _ref_feature_keep(x, capacities))


def test_feature_choice_zipf_plan_is_sorted_with_several_groups() -> None:
    n_tokens, d_sae = 64, 48
    c = zipf_capacities(n_tokens, d_sae, k=4, alpha=1.2, beta=0.5)
    plan = plan_feature_choice(capacity_bounds(c, n_tokens), n_tokens)
    # Zipf capacities are non-increasing in the latent index: slices, no gather.
    assert plan.order is None
    assert len(plan.groups) > 2
    x = _distinct_values((n_tokens, d_sae), seed=5, neg_frac=0.4)
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        capacities = round_capacities(c, gen)
        out = feature_choice(x, capacities, plan=plan)
        assert torch.equal(_assert_is_selection(out, x), _ref_feature_keep(x, capacities))


@FAST
@given(
    n_tokens=st.integers(1, 12),
    d_sae=st.integers(1, 12),
    seed=_seeds,
    use_plan=st.booleans(),
)
def test_feature_choice_transposed_view(
    n_tokens: int, d_sae: int, seed: int, use_plan: bool
) -> None:
    # The training SAE computes hidden_pre as the transpose of a contiguous (F, N)
    # tensor so the per-latent top-k reads contiguous rows without a copy.
    xt = _distinct_values((d_sae, n_tokens), seed, 0.3)  # (F, N), contiguous
    x = xt.t()  # (N, F) view
    capacities = _random_capacities(n_tokens, d_sae, torch.Generator().manual_seed(seed))
    plan = plan_feature_choice(capacities, n_tokens) if use_plan else None
    out = feature_choice(x, capacities, plan=plan)
    assert torch.equal(_assert_is_selection(out, x), _ref_feature_keep(x.contiguous(), capacities))
    # Same answer as from a contiguous (N, F) copy of the same values.
    torch.testing.assert_close(out, feature_choice(x.contiguous(), capacities, plan=plan))


def test_feature_choice_transposed_view_output_is_a_view() -> None:
    # On the fast path the (F, N) result is returned transposed, not copied back.
    n_tokens, d_sae = 16, 8
    xt = _distinct_values((d_sae, n_tokens), seed=6, neg_frac=0.3)
    out = feature_choice(xt.t(), torch.full((d_sae,), 3))
    assert out.shape == (n_tokens, d_sae)
    assert out.t().is_contiguous()


def test_feature_choice_without_plan_uses_largest_capacity() -> None:
    # All-zero capacities: no group at all, nothing kept.
    x = _distinct_values((5, 4), seed=7, neg_frac=0.0)
    out = feature_choice(x, torch.zeros(4, dtype=torch.long))
    assert bool((out == 0).all())


# ---------------------------------------------------------------------------
# capacities
# ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n_tokens=st.integers(1, 512),
    d_sae=st.integers(1, 512),
    k_frac=st.floats(0.0, 1.0),
    alpha=st.floats(0.1, 3.0),
    beta=st.floats(-0.9, 50.0),
)
def test_zipf_capacities_total_and_cap(
    n_tokens: int, d_sae: int, k_frac: float, alpha: float, beta: float
) -> None:
    # k from tiny (k * N well below F) up to F (every latent at N)
    k = max(k_frac * d_sae, 1e-3)
    c = zipf_capacities(n_tokens, d_sae, k, alpha=alpha, beta=beta)
    assert c.shape == (d_sae,)
    assert c.dtype == torch.float64
    assert math.isclose(float(c.sum()), k * n_tokens, rel_tol=1e-9)
    assert bool((c > 0).all())
    assert bool((c <= n_tokens).all())
    assert bool((c[1:] <= c[:-1] * (1 + 1e-12)).all())  # non-increasing


@settings(max_examples=60, deadline=None)
@given(
    n_tokens=st.integers(1, 256),
    d_sae=st.integers(1, 256),
    data=st.data(),
    capacity=st.sampled_from(["uniform", "zipf"]),
    seed=_seeds,
)
def test_rounded_capacities_sum_exactly_to_integral_total(
    n_tokens: int, d_sae: int, data: st.DataObject, capacity: str, seed: int
) -> None:
    # Choose T first so that k * N is integral, including T < F.
    total = data.draw(st.integers(1, n_tokens * d_sae), label="T")
    k = total / n_tokens
    if capacity == "uniform":
        c = uniform_capacities(n_tokens, d_sae, k)
    else:
        c = zipf_capacities(n_tokens, d_sae, k, alpha=data.draw(st.floats(0.3, 2.5)))
    gen = torch.Generator().manual_seed(seed)
    lower, upper = torch.floor(c).long(), torch.ceil(c).long()
    for _ in range(10):
        m = round_capacities(c, gen)
        assert m.dtype == torch.long
        assert int(m.sum()) == total
        assert bool((m >= lower).all())
        assert bool((m <= upper).all())
        assert bool((m <= n_tokens).all())
        assert bool((m <= capacity_bounds(c, n_tokens)).all())


def test_zipf_capacities_water_filling_clips_head_at_n() -> None:
    # Steep law, budget large enough that several head latents want more than N.
    n_tokens, d_sae, k = 100, 50, 10.0
    c = zipf_capacities(n_tokens, d_sae, k, alpha=2.0)
    clipped = c == n_tokens
    n_clipped = int(clipped.sum())
    assert n_clipped >= 2
    assert bool(clipped[:n_clipped].all())  # the clipped latents are a prefix
    assert math.isclose(float(c.sum()), k * n_tokens, rel_tol=1e-12)
    # Past the prefix the law's ratios are kept: c_j / c_{j+1} = ((j + 2) / (j + 1)) ** 2.
    j = torch.arange(n_clipped, d_sae - 1, dtype=torch.float64)
    torch.testing.assert_close(c[n_clipped:-1] / c[n_clipped + 1 :], ((j + 2) / (j + 1)) ** 2)


@pytest.mark.parametrize("capacity", ["uniform", "zipf"])
def test_round_capacities_is_unbiased(capacity: str) -> None:
    # N=10, F=24, k=1.3 -> T = 13 < F: most latents have c_j < 1.
    n_tokens, d_sae, k = 10, 24, 1.3
    if capacity == "uniform":
        c = uniform_capacities(n_tokens, d_sae, k)
    else:
        c = zipf_capacities(n_tokens, d_sae, k, alpha=1.1, beta=0.5)
    gen = torch.Generator().manual_seed(1234)
    draws = 4000
    m = torch.stack([round_capacities(c, gen) for _ in range(draws)]).to(torch.float64)
    frac = c - torch.floor(c)
    # Each m_j is floor(c_j) + Bernoulli(frac(c_j)); the mean of `draws` of them has
    # standard error sqrt(frac * (1 - frac) / draws).
    std_err = torch.sqrt(frac * (1 - frac) / draws)
    assert bool(((m.mean(0) - c).abs() <= 3 * std_err + 1e-12).all())
    assert bool((m.sum(1) == 13).all())


def test_round_capacities_small_capacity_latents_still_fire() -> None:
    # T = 2 * 4 = 8 pairs over F = 64 latents: c_j = 0.125, yet no latent should
    # go without tokens across batches (the point of unbiased rounding).
    c = uniform_capacities(n_tokens=4, d_sae=64, k=2)
    gen = torch.Generator().manual_seed(5)
    m = torch.stack([round_capacities(c, gen) for _ in range(200)])
    assert bool((m.sum(1) == 8).all())
    assert bool((m.max(0).values >= 1).all())
    # and the same for the far tail of a Zipf law
    cz = zipf_capacities(n_tokens=4, d_sae=64, k=2, alpha=1.0)
    assert float(cz[-1]) < 0.1
    mz = torch.stack([round_capacities(cz, gen) for _ in range(400)])
    assert int(mz[:, -1].sum()) >= 1


def test_round_capacities_without_generator_uses_global_rng() -> None:
    c = torch.full((10,), 0.5, dtype=torch.float64)
    torch.manual_seed(0)
    a = round_capacities(c)
    torch.manual_seed(0)
    b = round_capacities(c)
    assert torch.equal(a, b)
    assert int(a.sum()) == 5


# ---------------------------------------------------------------------------
# equality with SAELens
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 48), (2, 8, 48), (3, 2, 4, 20)])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_token_choice_equals_sae_lens_topk(shape: tuple[int, ...], k: int) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(k))
    torch.testing.assert_close(token_choice(x, k), TopK(k)(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(16, 48), (2, 8, 48), (4, 2, 2, 20)])
@pytest.mark.parametrize("k", [0.5, 2, 3.25, 11.0])
def test_mutual_choice_equals_sae_lens_batchtopk(
    method: str, shape: tuple[int, ...], k: float
) -> None:
    # N = 16 in every shape, so k * N is an integer (8, 32, 52, 176): BatchTopK
    # floors k * N and mutual_choice rounds it half up, which agree there.
    x = torch.randn(shape, generator=torch.Generator().manual_seed(int(4 * k)))
    expected = BatchTopK(k)(x)
    out = mutual_choice(x, k, method=method)  # type: ignore[arg-type]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------


def _rule_cases() -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor], Callable]]:
    caps = torch.tensor([0, 6, 3, 1, 2, 5, 4, 1, 0, 2])
    unsorted_plan = plan_feature_choice(torch.tensor([1, 6, 4, 1, 3, 6, 5, 2, 0, 2]), 6)
    return [
        ("token", lambda x: token_choice(x, 3), lambda x2: _ref_token_keep(x2, 3)),
        (
            "mutual-flat",
            lambda x: mutual_choice(x, 2.5, method="flat"),
            lambda x2: _ref_mutual_keep(x2, 15),
        ),
        (
            "mutual-candidates",
            lambda x: mutual_choice(x, 2.5, method="candidates", candidates_per_token=4),
            lambda x2: _ref_mutual_keep(x2, 15),
        ),
        ("feature", lambda x: feature_choice(x, caps), lambda x2: _ref_feature_keep(x2, caps)),
        (
            "feature-plan",
            lambda x: feature_choice(x, caps, plan=unsorted_plan),
            lambda x2: _ref_feature_keep(x2, caps),
        ),
    ]


@pytest.mark.parametrize("case", _rule_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_reaches_exactly_the_kept_positive_entries(
    case: tuple[str, Callable[[torch.Tensor], torch.Tensor], Callable], seed: int
) -> None:
    _, rule, ref_keep = case
    x = _distinct_values((6, 10), seed, neg_frac=0.4, dtype=torch.float64).requires_grad_()
    weights = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    (rule(x) * weights).sum().backward()
    mask = ref_keep(x.detach()) & (x.detach() > 0)  # selected & positive
    assert x.grad is not None
    torch.testing.assert_close(x.grad, weights * mask, rtol=0, atol=0)


@pytest.mark.parametrize("use_plan", [False, True])
def test_feature_choice_gradient_through_transposed_view(use_plan: bool) -> None:
    caps = torch.tensor([0, 6, 3, 1, 2, 5, 4, 1, 0, 2])
    plan = plan_feature_choice(caps, 6) if use_plan else None
    xt = _distinct_values((10, 6), seed=9, neg_frac=0.4, dtype=torch.float64).requires_grad_()
    weights = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (feature_choice(xt.t(), caps, plan=plan) * weights).sum().backward()
    x = xt.detach().t()
    mask = _ref_feature_keep(x.contiguous(), caps) & (x > 0)
    assert xt.grad is not None
    torch.testing.assert_close(xt.grad, (weights * mask).t(), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -1, float("nan"), float("inf")])
def test_bad_k_below_range_raises(k: float) -> None:
    with pytest.raises(ValueError, match=r"k must be a finite number > 0"):
        mutual_choice(HAND, k)
    with pytest.raises(ValueError, match=r"k must be a finite number > 0"):
        uniform_capacities(4, 4, k)
    with pytest.raises(ValueError, match=r"k must be a finite number > 0"):
        zipf_capacities(4, 4, k)


def test_bad_k_above_d_sae_raises() -> None:
    with pytest.raises(ValueError, match=r"k = 5 is larger than the number of latents d_sae = 4"):
        token_choice(HAND, 5)
    with pytest.raises(ValueError, match=r"k = 4.5 is larger than the number of latents"):
        mutual_choice(HAND, 4.5)
    with pytest.raises(ValueError, match=r"k = 5 is larger than the number of latents"):
        uniform_capacities(8, 4, 5)
    with pytest.raises(ValueError, match=r"k = 5 is larger than the number of latents"):
        zipf_capacities(8, 4, 5)


def test_token_choice_rejects_zero_and_fractional_k() -> None:
    with pytest.raises(ValueError, match=r"k must be a finite number > 0"):
        token_choice(HAND, 0)
    with pytest.raises(ValueError, match=r"k must be an integer for token choice"):
        token_choice(HAND, 1.5)  # type: ignore[arg-type]


def test_non_number_k_raises() -> None:
    with pytest.raises(ValueError, match=r"k must be a finite number > 0"):
        mutual_choice(HAND, True)
    with pytest.raises(ValueError, match=r"k must be a finite number > 0"):
        mutual_choice(HAND, "2")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("capacities", "match"),
    [
        (torch.tensor([1, 1, 1]), r"capacities must have shape \(d_sae,\) = \(4,\)"),
        (torch.tensor([[1, 1, 1, 1]]), r"capacities must have shape"),
        (torch.tensor([1, -1, 1, 1]), r"capacities must be >= 0"),
        (torch.tensor([1, 3, 1, 1]), r"capacities must be <= the number of tokens N=2"),
        (torch.tensor([1.0, 1.0, 1.0, 1.0]), r"capacities must be integers"),
        ([1, 1, 1, 1], r"capacities must be an integer tensor"),
    ],
)
def test_bad_capacities_raise(capacities: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        feature_choice(HAND, capacities)


def _all_rules() -> list[Callable[[torch.Tensor], torch.Tensor]]:
    return [
        lambda x: token_choice(x, 1),
        lambda x: mutual_choice(x, 1),
        lambda x: mutual_choice(x, 1, method="flat"),
        lambda x: feature_choice(x, torch.ones(x.shape[-1], dtype=torch.long)),
    ]


@pytest.mark.parametrize("rule", _all_rules(), ids=["token", "mutual", "mutual-flat", "feature"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_hidden_pre_raises(
    rule: Callable[[torch.Tensor], torch.Tensor], bad: float
) -> None:
    x = HAND.clone()
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"hidden_pre contains 1 non-finite value"):
        rule(x)


def test_check_finite_names_its_argument() -> None:
    check_finite(HAND)  # finite: no error
    with pytest.raises(ValueError, match=r"sae_in contains 2 non-finite"):
        check_finite(torch.tensor([float("nan"), 1.0, float("inf")]), "sae_in")


@pytest.mark.parametrize("rule", _all_rules(), ids=["token", "mutual", "mutual-flat", "feature"])
@pytest.mark.parametrize("shape", [(0, 4), (2, 0, 4)])
def test_empty_batch_raises(rule: Callable[[torch.Tensor], torch.Tensor], shape: tuple) -> None:
    with pytest.raises(ValueError, match=r"hidden_pre is empty"):
        rule(torch.empty(shape))


def test_bad_hidden_pre_types_raise() -> None:
    with pytest.raises(ValueError, match=r"hidden_pre must have a latent dimension"):
        mutual_choice(torch.tensor(1.0), 1)
    with pytest.raises(ValueError, match=r"hidden_pre must be a floating tensor"):
        mutual_choice(torch.ones(2, 4, dtype=torch.long), 1)
    with pytest.raises(TypeError, match=r"hidden_pre must be a torch.Tensor"):
        mutual_choice([[1.0, 2.0]], 1)  # type: ignore[arg-type]


def test_unknown_method_raises() -> None:
    with pytest.raises(ValueError, match=r"method must be 'auto', 'candidates' or 'flat'"):
        mutual_choice(HAND, 1, method="sorted")  # type: ignore[arg-type]


def test_bad_candidates_per_token_raises() -> None:
    with pytest.raises(ValueError, match=r"candidates_per_token must be >= 1"):
        mutual_choice(HAND, 1, method="candidates", candidates_per_token=0)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_zipf_alpha_raises(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"zipf_alpha must be a finite number > 0"):
        zipf_capacities(8, 4, 1, alpha=alpha)


@pytest.mark.parametrize("beta", [-1.0, -5.0, float("nan"), float("inf")])
def test_bad_zipf_beta_raises(beta: float) -> None:
    with pytest.raises(ValueError, match=r"zipf_beta must be a finite number > -1"):
        zipf_capacities(8, 4, 1, beta=beta)


@pytest.mark.parametrize(
    ("n_tokens", "d_sae", "match"),
    [(0, 4, r"n_tokens must be an integer > 0"), (4, 0, r"d_sae must be an integer > 0")],
)
def test_bad_capacity_sizes_raise(n_tokens: int, d_sae: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        uniform_capacities(n_tokens, d_sae, 1)
    with pytest.raises(ValueError, match=match):
        zipf_capacities(n_tokens, d_sae, 1)


def test_bad_plans_raise() -> None:
    with pytest.raises(ValueError, match=r"capacity_bounds must lie in \[0, n_tokens=2\]"):
        plan_feature_choice(torch.tensor([3, 1]), n_tokens=2)
    with pytest.raises(ValueError, match=r"capacity_bounds must lie in"):
        plan_feature_choice(torch.tensor([-1, 1]), n_tokens=2)
    with pytest.raises(ValueError, match=r"capacity_bounds must be 1-D"):
        plan_feature_choice(torch.ones(2, 2, dtype=torch.long), n_tokens=2)
    plan = plan_feature_choice(torch.tensor([2, 2, 2, 2]), n_tokens=3)
    with pytest.raises(ValueError, match=r"plan was made for \(n_tokens=3, d_sae=4\)"):
        feature_choice(HAND, torch.tensor([1, 1, 1, 1]), plan=plan)
    wrong_width = FeatureChoicePlan(d_sae=5, n_tokens=2, groups=((0, 5, 1),))
    with pytest.raises(ValueError, match=r"plan was made for"):
        feature_choice(HAND, torch.tensor([1, 1, 1, 1]), plan=wrong_width)


@pytest.mark.parametrize("order", ["sorted", "unsorted"])
def test_capacities_above_the_plan_bounds_raise(order: str) -> None:
    # The plan's top-k per group caps what a latent can keep, so a capacity above
    # its bound would otherwise be cut down silently.
    bounds = torch.tensor([2, 1, 1, 0]) if order == "sorted" else torch.tensor([1, 2, 0, 1])
    plan = plan_feature_choice(bounds, n_tokens=2)
    assert (plan.order is None) == (order == "sorted")
    feature_choice(HAND, bounds, plan=plan)  # at the bounds: fine
    over = bounds.clone()
    over[2] += 1  # latent 2: bound 1 -> capacity 2 (sorted), bound 0 -> 1 (unsorted)
    with pytest.raises(ValueError, match=r"capacities exceed the plan's bounds: latent 2"):
        feature_choice(HAND, over, plan=plan)
    # validate=False skips the check (and the read-back it costs)
    feature_choice(HAND, over, plan=plan, validate=False)


def test_round_capacities_rejects_non_vector() -> None:
    with pytest.raises(ValueError, match=r"capacities must be 1-D"):
        round_capacities(torch.ones(2, 2))
