"""Tests for ``sae_lens_choice.distributed``: exact selection across real processes.

Every multi-rank check runs in real processes (``multiprocessing`` spawn) that
join a gloo process group on 127.0.0.1 with a free TCP port. Process start-up
dominates the cost, so one group per world size (2 and 3 ranks) runs every
selection case and sends its pairs back; the parent compares them with a
brute-force reference on the concatenated batch: a full stable sort of the
flattened matrix (Mutual Choice) or of each column (Feature Choice) by value
descending, so ties go to the smaller global position — the tie rule the
module promises. With tie-free inputs the reference must also equal
``allocation.mutual_choice_pairs`` / ``feature_choice_pairs`` as sets.

Each group also checks, at its end, that a rank that raises makes the others
fail with an error, never hang: on a subgroup created with
``new_group(timeout=3 s)``, the last rank fails validation before the
all-gather. With 2 ranks its process then exits (gloo sees the closed
connection); with 3 it stays alive until the parent has heard from the others
(only the group's ``timeout=`` can end their wait). The parent waits on a
queue with a generous deadline, so a hang fails the test instead of blocking
it; no timing is asserted.

Ranks are spawned with an environment flag under which this file registers a
bare ``sae_lens_choice`` package object before importing the pure modules, so
a rank never imports SAELens (seconds per process) and asserts that it has not.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import multiprocessing as mp
import os
import queue as queue_module
import sys
import traceback
import types
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

# set (and inherited) while _run_group starts its ranks
_RANK_ENV = "SAE_LENS_CHOICE_TEST_RANK"
if os.environ.get(_RANK_ENV) == "1":
    # A spawned rank imports this file to find its target. Importing the package
    # would run its __init__, which imports SAELens (seconds per process on a
    # busy machine); the modules used here are pure, so a bare package object
    # lets them load alone. The workers also assert that SAELens stays unloaded.
    _spec = importlib.util.find_spec("sae_lens_choice")
    assert _spec is not None and _spec.submodule_search_locations is not None
    _package = types.ModuleType("sae_lens_choice")
    _package.__path__ = list(_spec.submodule_search_locations)
    sys.modules["sae_lens_choice"] = _package

from sae_lens_choice import distributed as distributed_module  # noqa: E402
from sae_lens_choice.allocation import (  # noqa: E402
    capacity_bounds,
    feature_choice_pairs,
    mutual_choice_pairs,
    plan_feature_choice,
    round_capacities,
    uniform_capacities,
    zipf_capacities,
)
from sae_lens_choice.distributed import (  # noqa: E402
    CollectiveStats,
    all_reduce_latent_counts,
    check_same_across_ranks,
    feature_choice_pairs_distributed,
    feature_choice_volume,
    gather_sizes,
    global_smallest_value,
    is_distributed,
    mutual_choice_pairs_distributed,
    mutual_choice_volume,
)
from tests.process_groups import free_port, join_local_group  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# A worker that does not answer by then is hung: the test fails instead of blocking.
DEADLINE_S = 120.0
FAIL_TIMEOUT_S = 3.0


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------


@dataclass
class Case:
    """One selection on one group; ``x`` is the concatenated (N, F) batch."""

    name: str
    rule: str  # "mc" or "fc"
    x: np.ndarray  # (N, F) float64; cast to `dtype` on every rank
    sizes: list[int]
    dtype: str = "float32"
    k: float = 0.0  # mc
    expected: np.ndarray | None = None  # fc: (F,) float64 expected capacities
    caps: np.ndarray | None = None  # fc: (F,) int64, the same on every rank
    use_plan: bool = True
    method: str = "auto"
    slack: float = 2.0
    pass_sizes: bool = True  # False: the ranks gather their sizes
    local_shape: str = "flat"  # "flat", "3d" (leading dims) or "transposed" (F, N) layout
    # expected (stats.checked_rounds, stats.fallbacks): which path ran (None: any)
    path: tuple[int, int] | None = None
    tie_free: bool = False  # also compare with allocation.*_pairs


def _matrix(seed: int, n: int, f: int, kind: str) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(n, f, generator=g, dtype=torch.float64)
    elif kind == "ints":  # many ties, some at the threshold
        x = torch.randint(-2, 4, (n, f), generator=g).to(torch.float64)
    elif kind == "equal":  # every entry ties
        x = torch.ones(n, f, dtype=torch.float64)
    elif kind == "negative":  # few positives: budgets beyond them
        x = torch.randn(n, f, generator=g, dtype=torch.float64) - 1.8
    elif kind == "coarse":  # bfloat16-like coarse values: ties in bf16 and float32
        x = (torch.randn(n, f, generator=g, dtype=torch.float64) * 4).round() / 4
    else:
        raise ValueError(kind)
    return x.numpy()


def _skewed(seed: int, sizes: list[int], f: int, rank: int = 0, every: int = 1) -> np.ndarray:
    # `rank` holds every large value (of every `every`-th latent): a candidate
    # round must fall back (for those latents)
    x = _matrix(seed, sum(sizes), f, "normal")
    start = sum(sizes[:rank])
    x[start : start + sizes[rank], ::every] += 10.0
    return x


def _planted(
    seed: int, sizes: list[int], f: int, positives: list[int], twos: int, per_latent: bool
) -> np.ndarray:
    """-1 everywhere but ``positives[r]`` entries of rank r: ``twos`` 2s, the rest 1s.

    Per latent (each column) when ``per_latent``, else in each rank's whole
    block. With ``positives[r]`` below rank r's candidate offer, every offer
    ends below the threshold (1), so the candidate round is exact, while the
    many 1s make some rank keep only some of its tied entries: the tie break
    happens among the candidates.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.full((sum(sizes), f), -1.0, dtype=torch.float64)
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    for column in range(f) if per_latent else [0]:
        spots = []  # flat positions into x
        for start, size, count in zip(starts, sizes, positives):
            if per_latent:
                rows = torch.randperm(size, generator=g)[:count] + start
                spots += (rows * f + column).tolist()
            else:
                spots += (torch.randperm(size * f, generator=g)[:count] + start * f).tolist()
        values = torch.ones(len(spots), dtype=torch.float64)
        values[torch.randperm(len(spots), generator=g)[:twos]] = 2.0
        x.view(-1)[torch.tensor(spots)] = values
    return x.numpy()


def _fc_case(name: str, x: np.ndarray, sizes: list[int], k: float, seed: int, **kw: Any) -> Case:
    n, f = x.shape
    capacity = kw.pop("capacity", "zipf")
    if capacity == "zipf":
        expected = zipf_capacities(n, f, k, alpha=kw.pop("alpha", 1.0), beta=0.5)
    else:
        expected = uniform_capacities(n, f, k)
    g = torch.Generator().manual_seed(seed)
    caps = round_capacities(expected, generator=g)
    return Case(name, "fc", x, sizes, expected=expected.numpy(), caps=caps.numpy(), **kw)


CHECKED, FALLBACK, FULL = (1, 0), (1, 1), (0, 0)


def _and_full(case: Case, full_name: str | None = None) -> list[Case]:
    """``case``, then the same selection with ``method="full"`` (no candidate round)."""
    name = full_name or f"{case.name} full"
    return [case, replace(case, name=name, method="full", path=FULL)]


def _cases(world: int) -> list[Case]:
    """The same kinds of inputs for 2 and 3 ranks; ``path`` pins which code path ran."""
    sizes = {2: [7, 12], 3: [5, 9, 6]}[world]
    even = {2: [8, 8], 3: [6, 6, 6]}[world]
    n = sum(sizes)
    f = 24
    # planted ties below each rank's candidate offer (offers computed by hand:
    # MC ceil(1.3 * T * N_r / N) + 1; FC with capacity c_fc (bound b = ceil(c_fc))
    # and slack 1: ceil(b * N_r / N) + 1, or all N_r tokens when N_r <= b)
    mc_planted = {2: [10, 16], 3: [7, 12, 8]}[world]
    c_fc = {2: 9.5, 3: 6.5}[world]  # m_j in {floor, ceil}; some rank's offer is checked
    fc_planted = {2: [6, 7], 3: [3, 4, 4]}[world]
    cases = [
        # Mutual Choice
        Case(
            "mc random",
            "mc",
            _matrix(1, n, f, "normal"),
            sizes,
            k=3,
            tie_free=True,
            path={2: FULL, 3: CHECKED}[world],
        ),
        *_and_full(
            Case(
                "mc random candidates slack=1.1",
                "mc",
                _matrix(2, n, f, "normal"),
                sizes,
                k=1.5,
                method="candidates",
                slack=1.1,
                tie_free=True,
                path={2: CHECKED, 3: FALLBACK}[world],
            ),
            "mc random full",
        ),
        Case(
            "mc float64 gathered sizes",
            "mc",
            _matrix(3, n, f, "normal"),
            sizes,
            dtype="float64",
            k=0.7,
            pass_sizes=False,
            tie_free=True,
        ),
        *_and_full(
            Case("mc ties", "mc", _matrix(4, n, f, "ints"), sizes, k=2.5, slack=1.1, path=FALLBACK)
        ),
        *_and_full(
            Case(
                "mc ties inside offers",
                "mc",
                _planted(40, sizes, f, mc_planted, twos=8, per_latent=False),
                sizes,
                k=1.0,
                slack=1.3,
                path=CHECKED,
            )
        ),
        *_and_full(Case("mc all equal", "mc", _matrix(0, n, f, "equal"), sizes, k=1.3, slack=1.0)),
        Case("mc beyond positives", "mc", _matrix(5, n, f, "negative"), sizes, k=f / 2),
        Case(
            "mc beyond positives candidates",
            "mc",
            _matrix(5, n, f, "negative"),
            sizes,
            k=f / 3,
            slack=1.0,
            path=CHECKED,
        ),
        Case("mc k=d_sae", "mc", _matrix(6, n, f, "normal"), sizes, k=float(f)),
        Case("mc budget 0", "mc", _matrix(6, n, f, "normal"), sizes, k=0.01),
        Case(
            "mc skewed falls back",
            "mc",
            _skewed(7, sizes, f),
            sizes,
            k=2.0,
            method="candidates",
            slack=1.0,
            path=FALLBACK,
        ),
        *_and_full(
            Case("mc bfloat16", "mc", _matrix(8, n, f, "coarse"), sizes, dtype="bfloat16", k=4)
        ),
        Case(
            "mc leading dims", "mc", _matrix(9, sum(even), f, "ints"), even, k=2, local_shape="3d"
        ),
        # Feature Choice
        _fc_case("fc zipf", _matrix(10, n, f, "normal"), sizes, 3, 10, tie_free=True),
        *_and_full(
            _fc_case(
                "fc zipf candidates slack=1.1",
                _matrix(11, n, f, "normal"),
                sizes,
                2.5,
                11,
                method="candidates",
                slack=1.1,
                tie_free=True,
            ),
            "fc zipf full",
        ),
        *_and_full(_fc_case("fc zipf ties", _matrix(12, n, f, "ints"), sizes, 3, 12, slack=1.0)),
        *_and_full(
            _fc_case(
                "fc ties inside offers",
                _planted(50, sizes, f, fc_planted, twos=3, per_latent=True),
                sizes,
                c_fc * f / n,
                50,
                capacity="uniform",
                slack=1.0,
                path=CHECKED,
            )
        ),
        _fc_case("fc all equal", _matrix(0, n, f, "equal"), sizes, 2, 13, slack=1.0),
        _fc_case(
            "fc uniform all equal",
            _matrix(0, n, f, "equal"),
            sizes,
            c_fc * f / n,
            13,
            capacity="uniform",
            slack=1.0,
            path=FALLBACK,
        ),
        _fc_case(
            "fc capacities up to N",
            _matrix(14, n, f, "ints"),
            sizes,
            6,
            14,
            alpha=2.5,
            method="full",
        ),
        _fc_case(
            "fc uniform no plan",
            _matrix(15, n, f, "normal"),
            sizes,
            1.7,
            15,
            capacity="uniform",
            use_plan=False,
            tie_free=True,
        ),
        _fc_case("fc beyond positives", _matrix(16, n, f, "negative"), sizes, 8, 16),
        _fc_case(
            "fc skewed",
            _skewed(17, sizes, f, rank=1),  # the rank with the most tokens
            sizes,
            c_fc * f / n,
            17,
            capacity="uniform",
            method="candidates",
            slack=1.0,
            path=FALLBACK,
        ),
        _fc_case(
            # every third latent fails the check: only those get a second round
            "fc skewed some latents",
            _skewed(21, sizes, f, rank=1, every=3),
            sizes,
            c_fc * f / n,
            21,
            capacity="uniform",
            slack=1.0,
            path=FALLBACK,
        ),
        _fc_case("fc bfloat16", _matrix(18, n, f, "coarse"), sizes, 3, 18, dtype="bfloat16"),
        _fc_case(
            "fc transposed layout",
            _matrix(19, n, f, "coarse"),
            sizes,
            3,
            19,
            local_shape="transposed",
            method="full",
        ),
        _fc_case(
            "fc float64 gathered sizes",
            _matrix(20, n, f, "normal"),
            sizes,
            2,
            20,
            dtype="float64",
            pass_sizes=False,
        ),
    ]
    return cases


# ---------------------------------------------------------------------------
# brute-force references (full stable sorts; no top-k)
# ---------------------------------------------------------------------------


def _reference_mc(x: torch.Tensor, k: float) -> torch.Tensor:
    """(N, F) bool: the top round(k N) entries by (value desc, row-major position asc), > 0."""
    n, f = x.shape
    budget = min(math.floor(k * n + 0.5), n * f)
    order = torch.sort(x.reshape(-1), descending=True, stable=True).indices[:budget]
    mask = torch.zeros(n * f, dtype=torch.bool)
    mask[order] = True
    return mask.reshape(n, f) & (x > 0)


def _reference_fc(x: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """(N, F) bool: column j keeps its caps[j] largest (value desc, token asc), > 0."""
    mask = torch.zeros_like(x, dtype=torch.bool)
    for j in range(x.shape[1]):
        order = torch.sort(x[:, j], descending=True, stable=True).indices[: int(caps[j])]
        mask[order, j] = True
    return mask & (x > 0)


# ---------------------------------------------------------------------------
# process groups
# ---------------------------------------------------------------------------


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    # bfloat16 has no numpy dtype; float32 holds every bfloat16 value exactly
    return (t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().numpy()


def _fired(pairs: Any) -> tuple[torch.Tensor, ...]:
    """The firing pairs as (token, latent, value), sorted by position."""
    fires = pairs.values > 0
    token, latent, value = pairs.token_idx[fires], pairs.latent_idx[fires], pairs.values[fires]
    order = torch.argsort(token * 1_000_000 + latent)  # d_sae < 1e6 here
    return token[order], latent[order], value[order]


def _job_select(rank: int, world: int, payload: list[Case], event: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for case in payload:
        dtype = DTYPES[case.dtype]
        offset = sum(case.sizes[:rank])
        n_total, d_sae = case.x.shape
        x = torch.from_numpy(case.x[offset : offset + case.sizes[rank]]).to(dtype)
        if case.local_shape == "3d":
            x = x.reshape(2, -1, d_sae)
        elif case.local_shape == "transposed":
            x = x.t().contiguous().t()  # (N_r, F) view of an (F, N_r) tensor
        stats = CollectiveStats()
        common: dict[str, Any] = {
            "rank_sizes": case.sizes if case.pass_sizes else None,
            "method": case.method,
            "slack": case.slack,
        }
        if case.rule == "mc":
            select = functools.partial(mutual_choice_pairs_distributed, x, case.k, **common)
        else:
            assert case.caps is not None and case.expected is not None
            expected = torch.from_numpy(case.expected)
            plan = (
                plan_feature_choice(capacity_bounds(expected, n_total), n_total)
                if case.use_plan
                else None
            )
            caps = torch.from_numpy(case.caps)
            select = functools.partial(
                feature_choice_pairs_distributed, x, caps, plan=plan, **common
            )
        pairs = select(stats=stats)
        # On accelerators the tie scan always runs (no read-back to skip it):
        # doing so here must change nothing.
        skip_scan = distributed_module._scan_needed
        distributed_module._scan_needed = lambda truncated: True
        try:
            scanned = select()
        finally:
            distributed_module._scan_needed = skip_scan
        same = all(torch.equal(a, b) for a, b in zip(_fired(pairs), _fired(scanned)))
        out[case.name] = {
            "always_scan_same": same,
            "token": _to_numpy(pairs.token_idx),
            "latent": _to_numpy(pairs.latent_idx),
            "value": _to_numpy(pairs.values),
            "counts": _to_numpy(all_reduce_latent_counts(pairs, d_sae)),
            "smallest": float(global_smallest_value(pairs)),
            "smallest_per_latent": _to_numpy(global_smallest_value(pairs, d_sae)),
            "stats": stats,
        }
    out["sizes"] = gather_sizes(len(payload) + rank)
    # world size 1 (a one-rank subgroup) falls back to the single-process functions
    singles = [dist.new_group([s]) for s in range(world)]
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(rank))
    caps = round_capacities(zipf_capacities(6, 10, 2.0), generator=torch.Generator())
    mine = singles[rank]
    assert isinstance(mine, dist.ProcessGroup)
    one_mc = mutual_choice_pairs_distributed(x, 2.5, group=mine)
    one_fc = feature_choice_pairs_distributed(x, caps, group=mine)
    out["single"] = all(
        torch.equal(a, b)
        for a, b in zip(
            [*one_mc, *one_fc],
            [*mutual_choice_pairs(x, 2.5), *feature_choice_pairs(x, caps)],
        )
    ) and not is_distributed(mine)
    # agreement checks: equal values pass, a rank-dependent one fails on every rank
    caps = round_capacities(zipf_capacities(64, 32, 4.0), offset=0.25)
    check_same_across_ranks(caps, "capacities")
    check_same_across_ranks(1234, "seed")
    messages = []
    for value in (caps + (rank == world - 1), 1234 + (rank == world - 1)):
        try:
            check_same_across_ranks(value, "capacities")
            messages.append(None)
        except ValueError as err:
            messages.append(str(err))
    out["disagree"] = messages
    # last: the process group is unusable afterwards
    out["failure"] = _fail_on_last_rank(rank, world, linger=world == 3, event=event)
    return out


def _fail_on_last_rank(rank: int, world: int, linger: bool, event: Any) -> str:
    """The last rank fails validation before the all-gather; what happened on this rank.

    On a group of its own whose collectives time out after ``FAIL_TIMEOUT_S``.
    With ``linger`` the failing rank stays alive (sockets open) until the
    parent, having heard from every other rank, sets ``event``: only the
    timeout can end their wait. Otherwise it goes on to exit, which closes its
    sockets.
    """
    failing = dist.new_group(list(range(world)), timeout=timedelta(seconds=FAIL_TIMEOUT_S))
    assert isinstance(failing, dist.ProcessGroup)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))
    if rank == world - 1:
        x[0, 0] = float("nan")
    try:
        mutual_choice_pairs_distributed(x, 2.0, group=failing, rank_sizes=[8] * world)
        return "selected"
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    finally:
        if linger and rank == world - 1:
            event.wait(DEADLINE_S)


JOBS = {"select": _job_select}


def _worker(
    rank: int,
    world: int,
    port: int,
    job: str,
    payload: Any,
    results: Any,
    event: Any,
    timeout_s: float,
) -> None:
    torch.set_num_threads(1)
    try:
        # the selection modules are pure: they must not have pulled in SAELens
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "sae_lens")
        assert not loaded, f"a pure module imported SAELens: {loaded}"
        join_local_group(rank, world, port, timeout_s)
        results.put((rank, "ok", JOBS[job](rank, world, payload, event)))
    except BaseException as err:
        results.put((rank, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_group(
    world: int, job: str, payload: Any, *, timeout_s: float = 60.0
) -> dict[int, tuple[str, Any]]:
    """Run ``job`` on ``world`` spawned ranks; {rank: (status, result)}.

    Sets the shared event once every rank but the last has answered (a
    lingering last rank waits for it).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    event = ctx.Event()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, job, payload, results, event, timeout_s))
        for r in range(world)
    ]
    os.environ[_RANK_ENV] = "1"
    try:
        for p in procs:
            p.start()
    finally:
        del os.environ[_RANK_ENV]
    answers: dict[int, tuple[str, Any]] = {}
    try:
        while len(answers) < world:
            try:
                rank, status, result = results.get(timeout=DEADLINE_S)
            except queue_module.Empty:
                pytest.fail(f"ranks {sorted(set(range(world)) - set(answers))} hung")
            answers[rank] = (status, result)
            if set(range(world - 1)) <= set(answers):
                event.set()
    finally:
        event.set()
        for p in procs:
            p.join(timeout=DEADLINE_S)
            if p.is_alive():
                p.kill()
    return answers


@functools.cache
def _selections(world: int) -> dict[int, tuple[str, Any]]:
    return _run_group(world, "select", _cases(world))


# ---------------------------------------------------------------------------
# the selections equal the single-process reference on the concatenated batch
# ---------------------------------------------------------------------------

CASE_IDS = [(w, c.name) for w in (2, 3) for c in _cases(w)]


@pytest.mark.parametrize(("world", "name"), CASE_IDS, ids=[f"{w}ranks-{n}" for w, n in CASE_IDS])
def test_selection_matches_reference(world: int, name: str) -> None:
    answers = _selections(world)
    for rank, (status, result) in answers.items():
        assert status == "ok", f"rank {rank} failed:\n{result}"
    case = next(c for c in _cases(world) if c.name == name)
    dtype = DTYPES[case.dtype]
    x = torch.from_numpy(case.x).to(dtype)  # (N, F) concatenated batch
    n_total, d_sae = x.shape
    if case.rule == "mc":
        reference = _reference_mc(x, case.k)
    else:
        assert case.caps is not None
        reference = _reference_fc(x, torch.from_numpy(case.caps))

    kept = torch.zeros(n_total, d_sae, dtype=torch.bool)
    n_kept = 0
    for rank in range(world):
        got = answers[rank][1][name]
        offset = sum(case.sizes[:rank])
        local = x[offset : offset + case.sizes[rank]].double()  # (N_r, F)
        token = torch.from_numpy(got["token"])
        latent = torch.from_numpy(got["latent"])
        value = torch.from_numpy(got["value"]).double()
        # every slot is a distinct entry of this rank's block, padding included
        assert bool(((token >= 0) & (token < case.sizes[rank])).all())
        assert bool(((latent >= 0) & (latent < d_sae)).all())
        assert len(set(zip(token.tolist(), latent.tolist()))) == token.numel()
        fires = value > 0
        # kept values are the pre-activations at their positions; padding is 0
        torch.testing.assert_close(value[fires], local[token[fires], latent[fires]], rtol=0, atol=0)
        assert bool((value[~fires] == 0).all())
        kept[token[fires] + offset, latent[fires]] = True
        n_kept += int(fires.sum())
        assert got["always_scan_same"], "scanning for ties when not needed changed the result"
        stats: CollectiveStats = got["stats"]
        if case.path is not None:
            assert (stats.checked_rounds, stats.fallbacks) == case.path, stats
    assert n_kept == int(kept.sum()), "a pair was returned by two ranks"
    assert torch.equal(kept, reference), (
        f"{name}: {int((kept & ~reference).sum())} extra, {int((reference & ~kept).sum())} missing"
    )
    if case.rule == "mc":
        budget = min(math.floor(case.k * n_total + 0.5), n_total * d_sae)
        assert n_kept == min(budget, int((x > 0).sum()))

    # the state helpers agree with the reference selection on every rank
    counts = reference.sum(0)  # (F,)
    positive = torch.where(reference, x.double(), torch.tensor(float("inf")))
    for rank in range(world):
        got = answers[rank][1][name]
        assert torch.equal(torch.from_numpy(got["counts"]), counts)
        assert got["smallest"] == float(positive.min())
        assert torch.equal(torch.from_numpy(got["smallest_per_latent"]).double(), positive.amin(0))

    if case.tie_free:
        # with distinct values the tie rule is moot: the single-process functions agree
        if case.rule == "mc":
            single = mutual_choice_pairs(x, case.k)
        else:
            single = feature_choice_pairs(x, torch.from_numpy(case.caps))
        fire = single.values > 0
        dense = torch.zeros_like(kept)
        dense[single.token_idx[fire], single.latent_idx[fire]] = True
        assert torch.equal(dense, reference)


@pytest.mark.parametrize("world", [2, 3])
def test_group_helpers(world: int) -> None:
    answers = _selections(world)
    for rank, (status, result) in answers.items():
        assert status == "ok", f"rank {rank} failed:\n{result}"
        # gather_sizes: each rank passed len(cases) + rank
        assert result["sizes"] == [len(_cases(world)) + s for s in range(world)]
        assert result["single"], "a one-rank group must give the single-process selection"
        for message in result["disagree"]:
            assert message is not None and f"ranks [{world - 1}]" in message


@pytest.mark.parametrize("world", [2, 3])
def test_candidate_round_volume(world: int) -> None:
    """Bytes and rounds as documented: one round when exact, two after a fallback."""
    answers = _selections(world)
    for case in _cases(world):
        if case.rule != "mc" or not case.pass_sizes or case.name == "mc budget 0":
            continue
        method = "full" if case.method == "full" else "candidates"
        per_round = mutual_choice_volume(
            case.k, case.sizes, case.x.shape[1], method=method, slack=case.slack
        )
        full = mutual_choice_volume(case.k, case.sizes, case.x.shape[1], method="full")
        item = DTYPES[case.dtype].itemsize
        for rank in range(world):
            stats: CollectiveStats = answers[rank][1][case.name]["stats"]
            sent = per_round + (full if stats.fallbacks else 0)
            assert stats.rounds == 1 + stats.fallbacks
            assert stats.elements_sent == sent
            assert stats.bytes_sent == sent * item
            assert stats.bytes_received == (world - 1) * sent * item


# ---------------------------------------------------------------------------
# a failing rank stops the others with an error, not a hang
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "scenario"), [(2, "exit"), (3, "linger")])
def test_failing_rank_stops_the_others(world: int, scenario: str) -> None:
    """A rank raises before the all-gather; the others must raise too, not hang.

    ``exit`` (2 ranks): the failing process ends, so gloo sees its sockets
    close (or the group's 3 s timeout fires first). ``linger`` (3 ranks): the
    failing process stays alive until the parent has heard from the others, so
    only the process group's ``timeout=`` can end their wait. A hang would
    leave the parent without an answer and fail the test at its deadline.
    """
    answers = _selections(world)
    for rank, (status, result) in answers.items():
        assert status == "ok", f"rank {rank} failed:\n{result}"
    failed = answers[world - 1][1]["failure"]
    assert failed.startswith("ValueError") and "non-finite" in failed, failed
    for rank in range(world - 1):
        message = answers[rank][1]["failure"]
        assert message.startswith(("RuntimeError", "DistBackendError")), (scenario, message)


# ---------------------------------------------------------------------------
# without other ranks: exactly the single-process functions
# ---------------------------------------------------------------------------


def test_not_initialized_is_single_process() -> None:
    assert not is_distributed()
    x = torch.randn(12, 20, generator=torch.Generator().manual_seed(0))
    for method, local in (("auto", "auto"), ("candidates", "candidates"), ("full", "flat")):
        got = mutual_choice_pairs_distributed(x, 3.5, method=method)  # type: ignore[arg-type]
        want = mutual_choice_pairs(x, 3.5, method=local)  # type: ignore[arg-type]
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    expected = zipf_capacities(12, 20, 3.0)
    caps = round_capacities(expected, offset=0.5)
    plan = plan_feature_choice(capacity_bounds(expected, 12), 12)
    got_fc = feature_choice_pairs_distributed(x, caps, plan=plan, rank_sizes=[12])
    want_fc = feature_choice_pairs(x, caps, plan=plan)
    assert all(torch.equal(a, b) for a, b in zip(got_fc, want_fc))
    pairs = mutual_choice_pairs(x, 3.5)
    assert torch.equal(all_reduce_latent_counts(pairs, 20), pairs.latent_counts(20))
    assert torch.equal(global_smallest_value(pairs, 20), pairs.smallest_value(20))
    check_same_across_ranks(caps, "capacities")  # nothing to compare with: no error
    assert gather_sizes(12) == [12]
    with pytest.raises(ValueError, match="rank_sizes"):
        mutual_choice_pairs_distributed(x, 2.0, rank_sizes=[6, 6])
    with pytest.raises(ValueError, match="method"):
        mutual_choice_pairs_distributed(x, 2.0, method="flat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slack"):
        feature_choice_pairs_distributed(x, caps, slack=0.5)


def test_volumes() -> None:
    """The candidate round sends O(k N) values in total, the full round O(R k N)."""
    sizes = [1024] * 4
    n, f, k = sum(sizes), 16384, 32
    budget = k * n
    candidates = mutual_choice_volume(k, sizes, f, slack=2.0)
    assert candidates == 2 * budget // 4 + 1  # the share plus one
    assert mutual_choice_volume(k, sizes, f, method="full") == budget
    expected = zipf_capacities(n, f, k)
    plan = plan_feature_choice(capacity_bounds(expected, n), n)
    fc_candidates = feature_choice_volume(plan, sizes, slack=2.0)
    fc_full = feature_choice_volume(plan, sizes, method="full")
    # a latent in a plan group of bound k_g offers ceil(k_g / 2) <= its own bound
    # (groups span a factor below 2): at most sum_j bound_j <= T + F in all
    assert fc_candidates <= int(capacity_bounds(expected, n).sum())
    assert fc_candidates < fc_full


def test_tie_scan_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tie scan's fallback (a running count) and its chunking find the same positions."""
    from sae_lens_choice import distributed

    g = torch.Generator().manual_seed(0)
    for density in (0.0, 0.01, 0.3, 1.0):
        mask = torch.rand(37, 11, generator=g) < density  # (N_r, F)
        truth = mask.reshape(-1).nonzero().reshape(-1)
        for size in (1, 5, 40, 407):
            want = torch.full((size,), mask.numel(), dtype=torch.long)
            want[: min(size, truth.numel())] = truth[:size]
            assert torch.equal(distributed._first_true(mask, size), want)
            got = distributed._first_true_by_counting(mask.reshape(-1), size)
            assert torch.equal(torch.where(got >= 0, got, mask.numel()), want)
            monkeypatch.setattr(distributed, "_SCAN_CHUNK", 50)  # 9 chunks
            assert torch.equal(distributed._first_true(mask, size), want)
            monkeypatch.undo()
