"""Exact Mutual Choice and Feature Choice across data-parallel ranks.

Pure torch and ``torch.distributed``; nothing here imports SAELens. With R
ranks of a process group, rank r holding ``hidden_pre`` for N_r tokens
(N = sum N_r), the functions below select exactly what the single-process rule
selects on the concatenated batch (rank 0's tokens first, then rank 1's, ...),
and each rank gets back its own pairs, with local token indices:

- :func:`mutual_choice_pairs_distributed`: the T = round(k * N) largest entries
  of the whole (N, F) matrix (positive ones only);
- :func:`feature_choice_pairs_distributed`: latent j keeps its ``m_j`` largest
  tokens of the whole batch (positive ones only); every rank passes the same
  capacities ``m`` (draw them with :func:`~sae_lens_choice.allocation.round_capacities`
  and the same ``offset`` / seed everywhere; :func:`check_same_across_ranks`
  checks it).

Tie rule
--------
Entries are ordered by value descending, then by *global position* ascending.
The global position of a Mutual Choice entry is its row-major index
``(token_offset_r + t) * F + j`` in the concatenated (N, F) batch; for Feature
Choice (within one latent) it is the global token index ``token_offset_r + t``,
with ``token_offset_r = N_0 + ... + N_{r-1}``. This is a total order, so "the
top T" is one well-defined set: the union over ranks keeps exactly T pairs
(Mutual Choice, when T entries are positive) or exactly ``m_j`` pairs of latent
j (Feature Choice, when ``m_j`` of its entries are positive), however many
values tie. Every rank applies the rule to the same gathered numbers, so they
all agree on it. (A single process, and these functions at world size 1,
break ties as ``torch.topk`` does: arbitrarily. With tie-free inputs the sets
are the same.)

Algorithm and proof of exactness
--------------------------------
Only ``relu(hidden_pre)`` matters: the kept set of the rule on ``x`` equals
the top-T (top-m_j) of ``y = relu(x)`` under the same order, intersected with
``y > 0`` (if at least T entries are positive both are the top T of the
positive region; otherwise both are all positive entries). So candidate
values are sent after ``relu``.

One round: rank r offers its ``c_r`` largest values (Mutual Choice: of its
whole (N_r, F) block; Feature Choice: per latent, of its N_r tokens), sorted
descending; one all-gather brings every rank the same pool of R offers (values
only; positions stay local). From the pool each rank computes the same
``tau`` = the T-th largest pooled value (per latent: the ``m_j``-th), and for
every rank s the counts ``gt_s`` / ``eq_s`` of its offered values above /
equal to ``tau``. The global selection is then every entry above ``tau`` plus
the first ``need = T - sum_s gt_s`` entries equal to ``tau`` in global-position
order; since ranks hold consecutive position ranges, rank r keeps its first
``q_r = clamp(need - sum_{s<r} eq_s, 0, eq_r)`` tied entries in local order,
and only if ``tau > 0``.

*Full round* (``c_r = min(T, N_r F)``; Feature Choice ``min(k_g, N_r)`` with
``k_g >= m_j`` the plan group's bound). Let S be the global top T. The part of
S on rank r is the top ``|S_r| <= c_r`` of rank r's entries, so its values lie
in rank r's offered multiset (the values of a top-c do not depend on how ties
were broken); hence the pool's value multiset contains S's and lies within all
values, and its T-th largest is the true T-th largest ``tau``. Rank r has fewer
than T entries above ``tau`` (all of them offered, as either ``c_r = T`` or it
offered everything), so ``gt_r`` is exact. Its offered ties may be truncated:
``eq'_r = min(eq_r, c_r - gt_r)``, which still lies between ``min(eq_r, need)``
and ``eq_r``; ``clamp(need - sum_{s<r} e_s, 0, e_r)`` takes the same value for
any such ``e`` (if an earlier rank has ``eq_s >= need`` both prefix sums reach
``need`` and give 0; otherwise the earlier terms are equal and a rank with
``eq_r >= need`` is capped at ``need`` in both). So ``q_r`` is exact, and rank r
finds its first ``q_r`` entries equal to ``tau`` by scanning its block (a
compare and a ``nonzero_static`` / cumulative count: the truncated offer may
hold other tied entries; only an offer that ends exactly at ``tau`` short of
the whole block can, so on CPU the scan runs only for those, on accelerators
always, to avoid a read-back). A Feature Choice offer of one token per latent is
taken with ``max``, which returns the first maximal token: that offer is the
rank's first tied token itself, so such latents need no scan. Sent:
``sum_r c_r`` values, up to R * T.

*Candidate round* (the default on CPU; O(k N) values in total): rank r offers
only ``c_r = min(N_r F, T, ceil(slack * T * N_r / N) + 1)`` values (Feature
Choice, per latent: ``min(N_r, k_g, ceil(slack * k_g * N_r / N) + 1)``, or all
N_r tokens when ``N_r <= k_g``), ``sum_r c_r >= T``. Let ``tau^`` be the
pool's T-th largest and ``v_s`` rank s's smallest offered value. The pool is a
sub-multiset of all values, so ``tau^ <= tau``. If every rank s that did not
offer everything has ``v_s < tau^``, its unoffered values are
``<= v_s < tau^ <= tau``, so the pool holds every entry ``>= tau``, at least T
of them: ``tau^ = tau``, and every tied entry is among the candidates, so all
counts are exact and the tie break needs no scan. If instead ``tau^ = 0`` (the
pool has fewer than T positive values) and every such rank has ``v_s = 0``,
every positive entry was offered, so fewer than T are positive and the rule
keeps them all: again exact. (The ``+ 1`` lets a rank that holds exactly its
offer's worth of winners show a value below the threshold.) Every rank
evaluates this check on the same pool, so all take the same branch;
otherwise (one rank holds more than ``slack`` times its share of the
winners, or ties straddle an offer's edge) a second round with full offers
follows: for Mutual Choice the whole selection, for Feature Choice only the
latents that failed the check (latents are independent, and with thousands
of small-capacity latents a few always fail). A candidate offer is
used only where its widest offer over ranks is narrower than the full
round's, per Feature Choice plan group: elsewhere it would send as much and
still need the check, so those groups (for Zipf capacities, the many latents
of capacity 1 or 2, whose winner any rank may hold) get the full offer inside
the same round and are exact by the full-round argument. Reading the check
back is one device synchronisation, so ``method="auto"`` uses candidate
offers on CPU and the full round (no host read-back anywhere) on accelerators.

Communication per call (R ranks, equal shards, T = k N): the candidate round
sends about ``slack * T / R`` values per rank (Feature Choice: about that plus
the full offer of small-capacity latents, at least one value per latent whose
capacity can be positive), the full round T per rank (Feature Choice
``sum_g g * min(k_g, N_r)``); values travel in ``hidden_pre``'s dtype; each
rank receives R - 1 offers. See :func:`mutual_choice_volume`,
:func:`feature_choice_volume` and :class:`CollectiveStats`.

Output shapes: :class:`~sae_lens_choice.allocation.ChoicePairs` with one slot
per offered candidate (``P = c_r``; Feature Choice ``P = sum_g g * c_{r,g}``);
slots that do not fire have value 0 and point at distinct unselected entries,
so :func:`~sae_lens_choice.allocation.pairs_to_dense` works unchanged. ``P``
depends only on sizes, never on values, except after a candidate round's
second round: Mutual Choice then returns the full round's (larger) ``P``,
Feature Choice drops the failed latents' first-round slots and appends their
full-offer slots.

Failure handling: a rank that raises (e.g. a validation error) stops taking
part; the others block in the next collective until the process group notices.
With gloo, a peer process that exited closes its sockets and the others raise
at once; a peer that stays alive is detected after the process group's
``timeout`` (pass ``timeout=datetime.timedelta(seconds=...)`` to
``init_process_group``; the default is 30 minutes). With NCCL the same
``timeout`` applies through the watchdog (``TORCH_NCCL_ASYNC_ERROR_HANDLING``,
on by default), which aborts the process.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from typing_extensions import TypedDict, Unpack

from sae_lens_choice.allocation import (
    ChoicePairs,
    FeatureChoicePlan,
    MutualChoiceMethod,
    batch_budget,
    check_finite,
    feature_choice_pairs,
    mutual_choice_pairs,
)
from sae_lens_choice.validation import check_choice, check_number

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

DistributedMethod = Literal["auto", "candidates", "full"]

__all__ = [
    "CollectiveStats",
    "DistributedMethod",
    "DistributedOptions",
    "all_reduce_latent_counts",
    "any_across_ranks",
    "check_same_across_ranks",
    "feature_choice_pairs_distributed",
    "feature_choice_volume",
    "gather_sizes",
    "global_smallest_value",
    "is_distributed",
    "mutual_choice_pairs_distributed",
    "mutual_choice_volume",
]

# What a single process runs for each method when there are no other ranks.
_SINGLE_PROCESS_METHOD: dict[str, MutualChoiceMethod] = {
    "auto": "auto",
    "candidates": "candidates",
    "full": "flat",
}
# Pool padding: below every relu'd value, so it never reaches a threshold.
_PAD = -1.0
# nonzero_static works on chunks of at most this many entries (CUDA's nonzero
# kernels index with 32-bit integers).
_SCAN_CHUNK = 1 << 30


# ---------------------------------------------------------------------------
# process-group helpers
# ---------------------------------------------------------------------------


@dataclass
class CollectiveStats:
    """Counters a selection adds to when passed as ``stats=`` (per rank).

    Attributes:
        selections: calls that communicated.
        rounds: all-gathers of candidate values (2 for a fallback call).
        checked_rounds: rounds whose offers were (partly) candidate offers,
            checked for exactness on the pool (one host read-back each).
        fallbacks: candidate rounds that were not provably exact (Feature
            Choice: for some latents) and were followed by a second round with
            full offers (Feature Choice: for those latents only).
        elements_sent: values this rank contributed, padding included.
        bytes_sent: ``elements_sent`` times the value size.
        bytes_received: what the all-gathers brought this rank from the others.
        seconds: wall time spent inside the all-gathers. On CPU (gloo) that is
            the collective itself; on CUDA it is only the launch, as NCCL runs
            asynchronously.
    """

    selections: int = 0
    rounds: int = 0
    checked_rounds: int = 0
    fallbacks: int = 0
    elements_sent: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


def is_distributed(group: ProcessGroup | None = None) -> bool:
    """Whether ``torch.distributed`` is initialized and ``group`` has more than one rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of the given process group")
    return dist.get_world_size(group) > 1


def _default_device(group: ProcessGroup | None) -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU ones (and CUDA ones).
    if "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(
    tensor: torch.Tensor,
    world: int,
    group: ProcessGroup | None,
    stats: CollectiveStats | None = None,
) -> torch.Tensor:
    """(L,) on every rank -> (world, L), rank s's tensor in row s."""
    tensor = tensor.contiguous()
    out = tensor.new_empty((world * tensor.numel(),))
    # all_gather_single replaces all_gather_into_tensor in recent torch versions
    gather: Any = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    start = time.perf_counter()
    gather(out, tensor, group=group)
    if stats is not None:
        stats.seconds += time.perf_counter() - start
        stats.rounds += 1
        stats.elements_sent += tensor.numel()
        stats.bytes_sent += tensor.numel() * tensor.element_size()
        stats.bytes_received += (world - 1) * tensor.numel() * tensor.element_size()
    return out.view(world, tensor.numel())


def gather_sizes(
    n_tokens: int,
    *,
    group: ProcessGroup | None = None,
    device: torch.device | str | None = None,
) -> list[int]:
    """Every rank's token count, in rank order (a list of length 1 when not distributed).

    One tiny all-gather plus a host read-back. Training with fixed per-rank
    batch sizes can skip it by passing ``rank_sizes`` to the selections.
    """
    check_number(n_tokens, "n_tokens", integer=True, ge=0)
    if not is_distributed(group):
        return [n_tokens]
    world = dist.get_world_size(group)
    dev = torch.device(device) if device is not None else _default_device(group)
    sizes = _all_gather(torch.tensor([n_tokens], dtype=torch.long, device=dev), world, group)
    return [int(v) for v in sizes.reshape(-1).tolist()]


def _resolve_sizes(
    n_local: int,
    rank_sizes: Sequence[int] | None,
    group: ProcessGroup | None,
    device: torch.device,
    rank: int,
    world: int,
) -> list[int]:
    if rank_sizes is None:
        sizes = gather_sizes(n_local, group=group, device=device)
    else:
        sizes = list(rank_sizes)
        if len(sizes) != world:
            raise ValueError(
                f"rank_sizes has {len(sizes)} entries but the process group has {world} ranks"
            )
        for s, size in enumerate(sizes):
            check_number(size, f"rank_sizes[{s}]", integer=True, ge=0)
        if sizes[rank] != n_local:
            raise ValueError(
                f"rank_sizes[{rank}] = {sizes[rank]} but this rank's hidden_pre has "
                f"{n_local} tokens"
            )
    if min(sizes) < 1:
        raise ValueError(f"every rank needs at least one token; got rank sizes {sizes}")
    return sizes


def _local_matrix(hidden_pre: torch.Tensor) -> torch.Tensor:
    if not isinstance(hidden_pre, torch.Tensor):
        raise TypeError(f"hidden_pre must be a torch.Tensor, got {type(hidden_pre).__name__}")
    if hidden_pre.ndim == 0 or hidden_pre.numel() == 0:
        raise ValueError(
            f"hidden_pre must be a non-empty (..., d_sae) tensor, got shape "
            f"{tuple(hidden_pre.shape)}"
        )
    if not hidden_pre.is_floating_point():
        raise ValueError(f"hidden_pre must be a floating tensor, got dtype {hidden_pre.dtype}")
    return hidden_pre.detach().reshape(-1, hidden_pre.shape[-1])  # (N_r, F)


def _check_method(method: str, slack: float) -> None:
    check_choice(method, "method", ("auto", "candidates", "full"))
    check_number(slack, "slack", ge=1, hint="each rank offers slack times its share")


def _resolve_method(method: DistributedMethod, device: torch.device) -> str:
    if method == "auto":
        return "candidates" if device.type == "cpu" else "full"
    return method


class DistributedOptions(TypedDict, total=False):
    """The keyword options both distributed selections take.

    What each means, and its default: :func:`mutual_choice_pairs_distributed`.
    """

    group: ProcessGroup | None
    rank_sizes: Sequence[int] | None
    method: DistributedMethod
    slack: float
    validate: bool
    stats: CollectiveStats | None


@dataclass(frozen=True)
class _Options:
    """One call's :class:`DistributedOptions`, defaults filled in and checked.

    Also the steps both selections take with them, so each is written once.
    """

    group: ProcessGroup | None = None
    rank_sizes: Sequence[int] | None = None
    method: DistributedMethod = "auto"
    slack: float = 2.0
    validate: bool = True
    stats: CollectiveStats | None = None

    def __post_init__(self) -> None:
        _check_method(self.method, self.slack)

    def single_process(self, hidden_pre: torch.Tensor) -> bool:
        """Whether there are no other ranks (then ``rank_sizes`` may name only this one)."""
        if is_distributed(self.group):
            return False
        n_tokens = _local_matrix(hidden_pre).shape[0]
        if self.rank_sizes is not None and list(self.rank_sizes) != [n_tokens]:
            raise ValueError(f"rank_sizes must be [{n_tokens}] without other ranks")
        return True

    def rank_and_sizes(self, x: torch.Tensor) -> tuple[int, list[int]]:
        """This rank in ``group``, and every rank's token count (``x`` holds this rank's)."""
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        return rank, _resolve_sizes(x.shape[0], self.rank_sizes, self.group, x.device, rank, world)

    def all_gather(self, tensor: torch.Tensor, world: int) -> torch.Tensor:
        """:func:`_all_gather` over ``group``, counted in ``stats``."""
        return _all_gather(tensor, world, self.group, self.stats)

    def count(self, counter: Literal["selections", "checked_rounds", "fallbacks"]) -> None:
        """One more ``counter`` in ``stats``, when there are stats."""
        if self.stats is not None:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)


def _empty_pairs(x: torch.Tensor) -> ChoicePairs:
    empty = torch.zeros(0, dtype=torch.long, device=x.device)
    return ChoicePairs(empty, empty, x.new_zeros(0))


def _row_masks(counts: Sequence[int], width: int, device: torch.device) -> torch.Tensor:
    """(R, width) bool: slot i of rank s's offer is real iff i < counts[s].

    Built from Python scalars, so no host-to-device copy (which would
    synchronise a CUDA stream).
    """
    slots = torch.arange(width, device=device)
    return torch.stack([slots < c for c in counts])


# ---------------------------------------------------------------------------
# the shared threshold arithmetic
# ---------------------------------------------------------------------------


def _tie_quota(
    pool: torch.Tensor,
    valid: torch.Tensor,
    tau: torch.Tensor,
    budget: torch.Tensor | int,
    rank: int,
) -> torch.Tensor:
    """How many of this rank's entries equal to ``tau`` are kept.

    pool: (R, B, c) offered values (B rows: 1 for Mutual Choice, latents for
    Feature Choice); valid: (R, 1, c) real slots; tau: (B,); budget: (B,) or
    int. Returns (B,) int64: ``clamp(need - sum_{s<rank} eq_s, 0, eq_rank)``,
    0 where ``tau <= 0`` (ties at 0 never fire).
    """
    above = ((pool > tau[None, :, None]) & valid).sum(-1)  # (R, B)
    equal = ((pool == tau[None, :, None]) & valid).sum(-1)  # (R, B)
    need = budget - above.sum(0)  # (B,)
    before = equal[:rank].sum(0)  # (B,)
    quota = torch.minimum((need - before).clamp(min=0), equal[rank])
    return torch.where(tau > 0, quota, torch.zeros_like(quota))


def _offer_is_exact(
    pool: torch.Tensor,
    tau: torch.Tensor,
    counts: Sequence[int],
    complete: Sequence[bool],
) -> torch.Tensor:
    """(B,) bool: per row, the candidate offers are provably exact (module docstring).

    pool: (R, B, c) offers sorted descending; tau: (B,); counts[s]: rank s's
    real slots; complete[s]: rank s offered all its entries.
    """
    ok = torch.ones(tau.shape, dtype=torch.bool, device=pool.device)
    for s, (c, whole) in enumerate(zip(counts, complete)):
        if whole:
            continue
        smallest = pool[s, :, c - 1]  # (B,) offers are sorted descending
        ok = ok & ((smallest < tau) | ((smallest <= 0) & (tau <= 0)))
    return ok


def _scan_needed(truncated: torch.Tensor) -> bool:
    """Whether to scan this rank's block for tied entries its offer may have missed.

    On CPU, reads the flag back (cheap) and skips the scan when no offer was
    truncated at the threshold; on accelerators, always scans rather than
    synchronise with the host.
    """
    if truncated.device.type != "cpu":
        return True
    return bool(truncated.any())


def _first_ties(block: torch.Tensor, tau: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) int64: per row of ``block`` (B, N_r), the first ``count`` tokens equal to
    ``tau`` (B,) (none where ``tau <= 0``), ascending, ``N_r`` where missing."""
    tied = (block == tau[:, None]) & (tau > 0)[:, None]  # (B, N_r)
    running = torch.cumsum(tied, dim=1, dtype=torch.int32)  # (B, N_r)
    targets = torch.arange(1, count + 1, dtype=torch.int32, device=block.device)
    return torch.searchsorted(running, targets.expand(block.shape[0], count).contiguous())


def _first_true_by_counting(flat: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`_first_true` of a 1-D chunk through a running count (int64, 8x the mask's memory)."""
    running = torch.cumsum(flat, 0)  # (n,) int64
    targets = torch.arange(1, size + 1, device=flat.device)
    found = torch.searchsorted(running, targets)  # (size,) n where missing
    return torch.where(found < flat.numel(), found, -1)


def _first_true(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(size,) int64: the first ``size`` positions where the flat ``mask`` is true, ascending.

    Missing positions are ``mask.numel()``. No host read-back: ``nonzero_static``
    (torch < 2.6 has no CUDA kernel for it; then a running count).
    """
    flat = mask.reshape(-1)
    n = flat.numel()
    parts = []
    for start in range(0, n, _SCAN_CHUNK):
        chunk = flat[start : start + _SCAN_CHUNK]
        try:
            found = torch.nonzero_static(chunk, size=size, fill_value=-1).reshape(-1)
        except NotImplementedError:
            found = _first_true_by_counting(chunk, size)
        parts.append(torch.where(found >= 0, found + start, n))
    if len(parts) == 1:
        return parts[0]
    # each chunk found its own first `size`; the overall first `size` are among them
    return torch.sort(torch.cat(parts)).values[:size]


def _assemble(
    cand_values: torch.Tensor,
    cand_pos: torch.Tensor,
    tau: torch.Tensor,
    quota: torch.Tensor,
    tie_pos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's kept pairs, in the slots of its offer.

    cand_values: (B, c) offered values, sorted descending per row; cand_pos:
    (B, c) their positions; tau, quota: (B,); tie_pos: (B, c) positions of the
    row's entries equal to ``tau`` in ascending order, padded with a value
    above every position; the first ``quota`` of them are kept.

    Returns positions and values (B, c): first the entries above ``tau`` (a
    prefix of the offer), then the kept ties (value ``tau``), then padding
    (value 0) on offered entries that are not kept, so all positions differ.
    """
    c = cand_values.shape[1]
    slot = torch.arange(c, device=cand_values.device)[None, :]  # (1, c)
    strict = (cand_values > tau[:, None]).sum(1, keepdim=True)  # (B, 1) relu'd values: > 0
    quota = quota[:, None]  # (B, 1)
    # which offered entries are kept ties: their position is among the first `quota`
    where = torch.searchsorted(tie_pos, cand_pos)  # (B, c)
    hit = tie_pos.gather(1, where.clamp(max=c - 1)) == cand_pos
    kept = (slot < strict) | ((cand_values == tau[:, None]) & hit & (where < quota))
    # offered entries not kept, first (a stable sort keeps the rest in order)
    spare = cand_pos.gather(1, torch.sort(kept.to(torch.uint8), dim=1, stable=True).indices)
    tie_slot = (slot - strict).clamp(0, c - 1)
    spare_slot = (slot - strict - quota).clamp(0, c - 1)
    is_tie = (slot >= strict) & (slot < strict + quota)
    pos = torch.where(
        slot < strict,
        cand_pos,
        torch.where(is_tie, tie_pos.gather(1, tie_slot), spare.gather(1, spare_slot)),
    )
    zero = cand_values.new_zeros(())
    values = torch.where(
        slot < strict, cand_values, torch.where(is_tie, tau[:, None].to(cand_values), zero)
    )
    return pos, values


# ---------------------------------------------------------------------------
# Mutual Choice
# ---------------------------------------------------------------------------


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """0-d: the k-th largest of the 1-D ``values`` (counted with multiplicity)."""
    if values.device.type == "cpu":
        # a selection in linear time; CUDA's kthvalue lacks bfloat16 in some versions
        return torch.kthvalue(values, values.numel() - k + 1).values
    return torch.topk(values, k, sorted=False).values.amin()


def _mc_counts(
    budget: int, sizes: Sequence[int], d_sae: int, method: str, slack: float
) -> tuple[list[int], bool]:
    """Each rank's offer, and whether it is a checked candidate round (else a full round).

    A candidate round offers ``ceil(slack * T * N_r / N) + 1`` (the extra value
    lets a rank holding exactly its share of winners show a value below the
    threshold); it is used only where its widest offer is narrower than the
    full round's, since otherwise it would send as much and still need a check.
    """
    full = [min(budget, n * d_sae) for n in sizes]
    if method == "full":
        return full, False
    n_total = sum(sizes)
    cand = [min(f, math.ceil(slack * budget * n / n_total) + 1) for f, n in zip(full, sizes)]
    if max(cand) < max(full):
        return cand, True
    return full, False


def mutual_choice_volume(
    k: float,
    rank_sizes: Sequence[int],
    d_sae: int,
    *,
    method: Literal["candidates", "full"] = "candidates",
    slack: float = 2.0,
) -> int:
    """Values each rank sends in one Mutual Choice round (padding included).

    Multiply by the value size for bytes; each rank receives
    ``(len(rank_sizes) - 1)`` times this. A candidate round that falls back
    adds one full round (:func:`feature_choice_volume`: for the failed latents).
    """
    budget = min(batch_budget(k, sum(rank_sizes)), sum(rank_sizes) * d_sae)
    if budget == 0:
        return 0
    return max(_mc_counts(budget, rank_sizes, d_sae, method, slack)[0])


def _mc_offer(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``count`` largest relu'd entries, sorted descending, and flat positions."""
    n_local, d_sae = x.shape
    # batch_budget(count / n_local, n_local) == count: the float error is far below 1/2
    local = mutual_choice_pairs(x, count / n_local, validate=False)
    values, order = torch.sort(local.values, descending=True)  # (c,)
    positions = (local.token_idx * d_sae + local.latent_idx).gather(0, order)  # (c,)
    return values, positions


def _mc_round(
    x: torch.Tensor,
    budget: int,
    counts: list[int],
    complete: list[bool],
    rank: int,
    opts: _Options,
    scan: bool,
) -> tuple[ChoicePairs, torch.Tensor]:
    """One round; returns this rank's pairs and the 0-d exactness flag of the offer."""
    world = len(counts)
    d_sae = x.shape[1]
    count, width = counts[rank], max(counts)
    values, positions = _mc_offer(x, count)  # (c,), (c,)
    offer = values.new_full((width,), _PAD)
    offer[:count] = values
    pool = opts.all_gather(offer, world)  # (R, width)
    valid = _row_masks(counts, width, x.device)[:, None, :]  # (R, 1, width)
    # the T-th largest pooled value; padding (-1) ranks below every real value
    tau = _kth_largest(pool.reshape(-1), budget).reshape(1)  # (1,)
    quota = _tie_quota(pool[:, None, :], valid, tau, budget, rank)  # (1,)
    exact = _offer_is_exact(pool[:, None, :], tau, counts, complete).all()
    # Only an offer that ends at tau (and is not the whole block) can miss tied
    # entries; otherwise every tied entry is offered.
    truncated = (values[-1] == tau) & (quota > 0) & (count < x.numel())
    if scan and _scan_needed(truncated):
        # the offer may miss some of this rank's tied entries: find them in the block
        tie_pos = _first_true((x == tau) & (tau > 0), count)[None, :]  # (1, c)
    else:
        sentinel = torch.full_like(positions, x.numel())
        tied = (values == tau) & (tau > 0)
        tie_pos = torch.sort(torch.where(tied, positions, sentinel)).values[None, :]  # (1, c)
    pos, kept = _assemble(values[None, :], positions[None, :], tau, quota, tie_pos)
    pos, kept = pos.reshape(-1), kept.reshape(-1)  # (c,)
    token_idx = torch.div(pos, d_sae, rounding_mode="floor")
    return ChoicePairs(token_idx, pos - token_idx * d_sae, kept), exact


def mutual_choice_pairs_distributed(
    hidden_pre: torch.Tensor, k: float, **options: Unpack[DistributedOptions]
) -> ChoicePairs:
    """Mutual Choice over the concatenated batch of all ranks; this rank's pairs.

    Keeps the T = round(k * N) largest entries (N = total tokens over ranks) of
    the whole concatenated (N, F) matrix, positive ones only, ties broken by
    global position (module docstring). Every rank of ``group`` must call it
    with the same ``k``, ``method`` and ``slack``.

    Args:
        hidden_pre: (..., F) this rank's pre-activations (N_r tokens).
        k: expected L0 per token, as for
            :func:`~sae_lens_choice.allocation.mutual_choice_pairs`.
        group: process group (default: the world).
        rank_sizes: every rank's token count in rank order; ``None`` (the
            default) gathers them (:func:`gather_sizes`: one small collective
            and a read-back).
        method: ``"candidates"`` (each rank offers about ``slack`` times its
            share of T, checks exactness on the gathered pool and, if needed,
            runs a ``"full"`` round; one host read-back), ``"full"`` (each rank
            offers ``min(T, N_r F)``; no host read-back), ``"auto"`` (the
            default: ``"candidates"`` on CPU, ``"full"`` elsewhere).
        slack: over-offer factor of the candidate round (>= 1; default 2).
        validate: check this rank's input for NaN/inf (one read-back; default
            ``True``).
        stats: counters to add this call's communication to (default: none).

    Returns:
        :class:`~sae_lens_choice.allocation.ChoicePairs` with local token
        indices (rows of this rank's ``hidden_pre.reshape(-1, F)``); the pairs
        with a positive value are this rank's part of the global selection.

    Not distributed (``torch.distributed`` not initialized, or one rank): exactly
    :func:`~sae_lens_choice.allocation.mutual_choice_pairs` (``"full"`` maps
    to its ``"flat"``).
    """
    opts = _Options(**options)
    if opts.single_process(hidden_pre):
        local_method = _SINGLE_PROCESS_METHOD[opts.method]
        return mutual_choice_pairs(hidden_pre, k, method=local_method, validate=opts.validate)
    x = _local_matrix(hidden_pre)  # (N_r, F)
    d_sae = x.shape[1]
    check_number(k, "k", gt=0, le=d_sae, hint="k is the expected L0 per token, at most d_sae")
    rank, sizes = opts.rank_and_sizes(x)
    if opts.validate:
        check_finite(x)
    n_total = sum(sizes)
    budget = min(batch_budget(k, n_total), n_total * d_sae)
    if budget == 0:
        return _empty_pairs(x)
    opts.count("selections")
    counts, checked = _mc_counts(
        budget, sizes, d_sae, _resolve_method(opts.method, x.device), opts.slack
    )
    with torch.no_grad():
        if checked:
            complete = [c == n * d_sae for c, n in zip(counts, sizes)]
            pairs, exact = _mc_round(x, budget, counts, complete, rank, opts, scan=False)
            opts.count("checked_rounds")
            # identical on every rank (same pool, same arithmetic): all branch alike
            if bool(exact):
                return pairs
            opts.count("fallbacks")
            counts, _ = _mc_counts(budget, sizes, d_sae, "full", opts.slack)
        complete = [c == n * d_sae for c, n in zip(counts, sizes)]
        pairs, _ = _mc_round(x, budget, counts, complete, rank, opts, scan=True)
        return pairs


# ---------------------------------------------------------------------------
# Feature Choice
# ---------------------------------------------------------------------------


def _fc_counts(
    plan: FeatureChoicePlan, sizes: Sequence[int], method: str, slack: float
) -> tuple[list[list[int]], list[bool]]:
    """counts[s][g]: tokens per latent rank s offers in plan group g; checked[g].

    A group is *checked* (a candidate offer, ``ceil(slack * k_g * N_s / N) + 1``,
    exact only if the pool passes :func:`_offer_is_exact`) when that is
    narrower than the full offer ``min(N_s, k_g)``; otherwise, and in a full
    round, it gets the full offer, exact by construction. Small-capacity
    groups (most latents under Zipf capacities) are never checked: a latent
    with capacity 1 needs every rank's best token anyway.
    """
    n_total = sum(sizes)
    counts: list[list[int]] = [[] for _ in sizes]
    checked = []
    for _, _, bound in plan.groups:
        full = [min(bound, n) for n in sizes]
        cand = [
            min(f, n, math.ceil(slack * bound * n / n_total) + 1) if f < n else f
            for f, n in zip(full, sizes)
        ]
        use_cand = method != "full" and max(cand) < max(full)
        checked.append(use_cand)
        for row, value in zip(counts, cand if use_cand else full):
            row.append(value)
    return counts, checked


def feature_choice_volume(
    plan: FeatureChoicePlan,
    rank_sizes: Sequence[int],
    *,
    method: Literal["candidates", "full"] = "candidates",
    slack: float = 2.0,
) -> int:
    """Values each rank sends in one Feature Choice round (padding included).

    ``plan`` is the global plan (``plan.n_tokens == sum(rank_sizes)``).
    Multiply by the value size for bytes; each rank receives
    ``(len(rank_sizes) - 1)`` times this.
    """
    counts, _ = _fc_counts(plan, rank_sizes, method, slack)
    return sum(
        (end - start) * max(row[g] for row in counts)
        for g, (start, end, _) in enumerate(plan.groups)
    )


def _check_fc_inputs(
    capacities: torch.Tensor, plan: FeatureChoicePlan, n_total: int, d_sae: int
) -> None:
    if not isinstance(capacities, torch.Tensor) or capacities.shape != (d_sae,):
        shape = tuple(capacities.shape) if isinstance(capacities, torch.Tensor) else capacities
        raise ValueError(f"capacities must be a ({d_sae},) integer tensor, got {shape}")
    if capacities.is_floating_point() or capacities.is_complex():
        raise ValueError(
            f"capacities must be integers (dtype {capacities.dtype}); use round_capacities(c)"
        )
    caps = capacities.detach().to("cpu", torch.long)
    if int(caps.min()) < 0 or int(caps.max()) > n_total:
        raise ValueError(f"capacities must lie in [0, N] with N = {n_total} tokens over all ranks")
    bound = torch.zeros(d_sae, dtype=torch.long)  # (F,) in plan order
    for start, end, k in plan.groups:
        bound[start:end] = k
    if plan.order is not None:
        caps = caps.index_select(0, plan.order.to("cpu"))
    over = (caps > bound).nonzero()
    if over.numel() > 0:
        raise ValueError(
            "capacities exceed the plan's bounds; build the plan with "
            "plan_feature_choice(capacity_bounds(c, N), N) for the global N from the same "
            "expected capacities c"
        )


def feature_choice_pairs_distributed(
    hidden_pre: torch.Tensor,
    capacities: torch.Tensor,
    *,
    plan: FeatureChoicePlan | None = None,
    **options: Unpack[DistributedOptions],
) -> ChoicePairs:
    """Feature Choice over the concatenated batch of all ranks; this rank's pairs.

    Latent j keeps its ``capacities[j]`` largest tokens of the whole batch
    (positive ones only), ties broken by global token index. Every rank must
    pass the same ``capacities``, ``plan``, ``method`` and ``slack``.

    Args:
        hidden_pre: (..., F) this rank's pre-activations (N_r tokens); a
            transposed view of an (F, N_r) contiguous tensor is used without a
            copy, as in :func:`~sae_lens_choice.allocation.feature_choice_pairs`.
        capacities: (F,) integers in [0, N], N the total over ranks, the same on
            every rank.
        plan: :func:`~sae_lens_choice.allocation.plan_feature_choice` built
            for the *global* N (``plan_feature_choice(capacity_bounds(c, N), N)``).
            Without one, a single group bounded by ``max(capacities)`` (read back).
        group, rank_sizes, method, slack, validate, stats: as for
            :func:`mutual_choice_pairs_distributed`; per latent, a candidate
            offer is ``min(N_r, k_g, ceil(slack * k_g * N_r / N) + 1)`` tokens,
            used for plan groups where it is narrower than the full offer
            ``min(N_r, k_g)`` (``k_g`` the plan group's bound); latents whose
            candidate offers fail the exactness check get a second round with
            full offers.

    Returns:
        :class:`~sae_lens_choice.allocation.ChoicePairs` with local token
        indices; ``P = sum_g g * c_{r,g}`` slots (group g's latents, each with
        this rank's offer size), group by group in plan order; after a second
        round the failed latents' slots are replaced by full-offer slots at
        the end.

    Not distributed: exactly :func:`~sae_lens_choice.allocation.feature_choice_pairs`.
    """
    opts = _Options(**options)
    if opts.single_process(hidden_pre):
        return feature_choice_pairs(hidden_pre, capacities, plan=plan, validate=opts.validate)
    x = _local_matrix(hidden_pre)  # (N_r, F)
    d_sae = x.shape[1]
    rank, sizes = opts.rank_and_sizes(x)
    n_total = sum(sizes)
    if plan is None:
        k_max = int(capacities.max())
        groups = ((0, d_sae, k_max),) if k_max > 0 else ()
        plan = FeatureChoicePlan(d_sae=d_sae, n_tokens=n_total, groups=groups)
    elif plan.d_sae != d_sae or plan.n_tokens != n_total:
        raise ValueError(
            f"plan was made for (n_tokens={plan.n_tokens}, d_sae={plan.d_sae}) but the ranks "
            f"hold (n_tokens={n_total}, d_sae={d_sae}) together; build it for the global N"
        )
    if opts.validate:
        _check_fc_inputs(capacities, plan, n_total, d_sae)
        check_finite(x)
    if not plan.groups:
        return _empty_pairs(x)
    opts.count("selections")
    xt = x.t()  # (F, N_r)
    if not xt.is_contiguous():
        xt = xt.contiguous()
    caps = capacities.to(device=x.device, dtype=torch.long)
    order = None if plan.order is None else plan.order.to(x.device)
    counts, checked = _fc_counts(plan, sizes, _resolve_method(opts.method, x.device), opts.slack)
    with torch.no_grad():
        pairs, ok = _fc_round(xt, caps, plan, order, counts, checked, sizes, rank, opts)
        if not any(checked):
            return pairs
        opts.count("checked_rounds")
        # identical on every rank (same pool, same arithmetic): all branch alike
        failed = (~ok).nonzero().reshape(-1)  # (f,) latents whose offers were too short
        if failed.numel() == 0:
            return pairs
        opts.count("fallbacks")
        # a second round for those latents only, with full offers; latents are
        # independent, so the others keep their first-round pairs
        redo = _subplan(plan, order, failed, n_total)
        redo_counts, redo_checked = _fc_counts(redo, sizes, "full", opts.slack)
        again, _ = _fc_round(
            xt, caps, redo, redo.order, redo_counts, redo_checked, sizes, rank, opts
        )
        keep = ~torch.isin(pairs.latent_idx, failed)  # drop the failed latents' slots
        return ChoicePairs(
            torch.cat([pairs.token_idx[keep], again.token_idx]),
            torch.cat([pairs.latent_idx[keep], again.latent_idx]),
            torch.cat([pairs.values[keep], again.values]),
        )


def _subplan(
    plan: FeatureChoicePlan, order: torch.Tensor | None, latents: torch.Tensor, n_total: int
) -> FeatureChoicePlan:
    """The plan restricted to ``latents`` (sorted ids), each keeping its group's bound."""
    position = torch.empty(plan.d_sae, dtype=torch.long, device=latents.device)  # id -> slot
    slots = torch.arange(plan.d_sae, device=latents.device)
    if order is None:
        position = slots
    else:
        position[order] = slots
    bound = torch.zeros(plan.d_sae, dtype=torch.long, device=latents.device)  # by slot
    for start, end, k in plan.groups:
        bound[start:end] = k
    picked = latents[torch.argsort(position[latents])]  # in plan order: bounds descending
    sizes = torch.unique_consecutive(bound[position[picked]], return_counts=True)
    groups, start = [], 0
    for k, n in zip(sizes[0].tolist(), sizes[1].tolist()):
        groups.append((start, start + n, k))
        start += n
    return FeatureChoicePlan(d_sae=plan.d_sae, n_tokens=n_total, groups=tuple(groups), order=picked)


def _fc_round(
    xt: torch.Tensor,
    caps: torch.Tensor,
    plan: FeatureChoicePlan,
    order: torch.Tensor | None,
    counts: list[list[int]],
    checked: list[bool],
    sizes: list[int],
    rank: int,
    opts: _Options,
) -> tuple[ChoicePairs, torch.Tensor]:
    """One Feature Choice round over all plan groups (one all-gather).

    Returns this rank's pairs and ``ok`` (F,) bool: the latent's selection is
    provably exact (always for latents of unchecked groups). Only the plan's
    latents are selected (``plan.order`` may list a subset).
    """
    world = len(sizes)
    n_local = xt.shape[1]
    device = xt.device
    offers, blocks = [], []
    for g, (start, end, _) in enumerate(plan.groups):
        latents = (
            torch.arange(start, end, device=device) if order is None else order[start:end]
        )  # (g,)
        block = xt[start:end] if order is None else xt.index_select(0, latents)  # (g, N_r)
        count, width = counts[rank][g], max(row[g] for row in counts)
        if count == 1:
            # max returns the first maximal token: the offer is the first tie itself
            values, tokens = block.max(dim=1, keepdim=True)  # (g, 1)
        else:
            values, tokens = torch.topk(block, count, dim=1, sorted=True)  # (g, c) descending
        values = values.relu()
        offer = values.new_full((end - start, width), _PAD)
        offer[:, :count] = values
        offers.append(offer.reshape(-1))
        blocks.append((latents, block, values, tokens, width))
    pool_all = opts.all_gather(torch.cat(offers), world)  # (R, sum_g g * width_g)

    token_parts, latent_parts, value_parts = [], [], []
    ok = torch.ones(xt.shape[0], dtype=torch.bool, device=device)  # (F,)
    offset = 0
    for g, (latents, block, values, tokens, width) in enumerate(blocks):
        n_lat = latents.numel()
        bound = plan.groups[g][2]
        pool = pool_all[:, offset : offset + n_lat * width].reshape(world, n_lat, width)
        offset += n_lat * width
        group_counts = [row[g] for row in counts]
        valid = _row_masks(group_counts, width, device)[:, None, :]  # (R, 1, w)
        m = caps.index_select(0, latents)  # (g,)
        # per latent: the m_j-th largest pooled value (+inf when m_j = 0: nothing kept)
        merged = pool.permute(1, 0, 2).reshape(n_lat, world * width)  # (g, R*w)
        top = torch.topk(merged, bound, dim=1, sorted=True).values  # (g, k_g)
        tau = top.gather(1, (m - 1).clamp(min=0)[:, None]).squeeze(1)  # (g,)
        tau = torch.where(m > 0, tau, torch.full_like(tau, float("inf")))
        quota = _tie_quota(pool, valid, tau, m, rank)  # (g,)
        count = counts[rank][g]
        if checked[g]:
            complete = [c == n for c, n in zip(group_counts, sizes)]
            ok[latents] = _offer_is_exact(pool, tau, group_counts, complete)
        # every tied token that can be kept is among the offers (checked groups:
        # if exact; one slot: the offer is the rank's first maximal token) ...
        tied = (values == tau[:, None]) & (tau > 0)[:, None]  # (g, c)
        tie_tok = torch.sort(torch.where(tied, tokens, n_local), dim=1).values
        if not checked[g] and count > 1:
            # ... except where a full offer ends at tau short of all N_r tokens
            truncated = (values[:, -1] == tau) & (quota > 0) & (count < n_local)  # (g,)
            if device.type != "cpu":
                # no read-back on accelerators: scan every latent of the group
                tie_tok = _first_ties(block, tau, count)
            elif bool(truncated.any()):
                rows = truncated.nonzero().reshape(-1)  # (t,)
                tie_tok[rows] = _first_ties(block[rows], tau[rows], count)
        pos, kept = _assemble(values, tokens, tau, quota, tie_tok)  # (g, c)
        token_parts.append(pos.reshape(-1))
        latent_parts.append(latents[:, None].expand(n_lat, count).reshape(-1))
        value_parts.append(kept.reshape(-1))
    pairs = ChoicePairs(torch.cat(token_parts), torch.cat(latent_parts), torch.cat(value_parts))
    return pairs, ok


# ---------------------------------------------------------------------------
# identical state across ranks
# ---------------------------------------------------------------------------


def all_reduce_latent_counts(
    pairs: ChoicePairs, d_sae: int, *, group: ProcessGroup | None = None
) -> torch.Tensor:
    """(F,) int64: how many tokens of the whole batch (all ranks) each latent fires on.

    The sum over ranks of ``pairs.latent_counts(d_sae)``; feed it to a density
    EMA so every rank holds the same state. One all-reduce of F int64; no
    read-back.
    """
    counts = pairs.latent_counts(d_sae)
    if is_distributed(group):
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return counts


def global_smallest_value(
    pairs: ChoicePairs, d_sae: int | None = None, *, group: ProcessGroup | None = None
) -> torch.Tensor:
    """Smallest firing value over all ranks: 0-d, or (F,) per latent with ``d_sae``.

    The minimum over ranks of ``pairs.smallest_value(d_sae)`` (``inf`` where
    nothing fires anywhere): the global threshold for a threshold EMA. One
    all-reduce; no read-back.
    """
    smallest = pairs.smallest_value(d_sae).contiguous()
    if is_distributed(group):
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN, group=group)
    return smallest


def _fingerprint(value: Any) -> int:
    """A 63-bit hash of a tensor's dtype, shape and bytes, or of a Python value's repr."""
    digest = hashlib.sha256()
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        digest.update(f"tensor {t.dtype} {tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        digest.update(f"{type(value).__name__} {value!r}".encode())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def any_across_ranks(flag: torch.Tensor, *, group: ProcessGroup | None = None) -> torch.Tensor:
    """0-d bool: ``flag`` is true on some rank (one tiny all-reduce; no read-back)."""
    if not is_distributed(group):
        return flag.reshape(())
    as_int = flag.reshape(1).to(torch.int64)
    dist.all_reduce(as_int, op=dist.ReduceOp.MAX, group=group)
    return as_int.reshape(()) > 0


def check_same_across_ranks(
    value: Any,
    name: str,
    *,
    group: ProcessGroup | None = None,
) -> None:
    """Raise ``ValueError`` on every rank if ``value`` differs between ranks.

    For capacities, expected capacities, seeds, rounding offsets, ``k``: a
    tensor is compared by dtype, shape and bytes, anything else by its
    ``repr``. Cheap: each rank hashes its value (a tensor is copied to the host
    once) and one all-gather of one int64 per rank compares the hashes; call it
    at start-up and every so often, not on every step. Every rank raises the
    same error, naming the ranks that disagree with rank 0. A no-op when not
    distributed.
    """
    if not is_distributed(group):
        return
    world = dist.get_world_size(group)
    mine = torch.tensor([_fingerprint(value)], dtype=torch.long, device=_default_device(group))
    prints = _all_gather(mine, world, group).reshape(-1).tolist()
    odd = [s for s, p in enumerate(prints) if p != prints[0]]
    if odd:
        raise ValueError(
            f"{name} differs across ranks: ranks {odd} disagree with rank 0; every rank must "
            "use the same value (draw capacities from the same offset or seed)"
        )
