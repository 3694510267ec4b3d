"""The sparse training step: encoder gradients, decoding and its backward from the kept pairs.

Pure torch; nothing here imports SAELens. A Choice SAE's training step needs one
dense product, the encoder's ``hidden_pre = sae_in @ W_enc + b_enc`` (N x F), to
select the (token, latent) pairs it keeps (:mod:`sae_lens_choice.allocation`).
Everything after the selection depends on the P kept pairs alone, so it runs
here at O(P * d_in) cost instead of O(N * F * d_in), and ``hidden_pre`` can be
freed as soon as the pairs are chosen:

- :func:`pair_pre_acts`: the kept pre-activations as an autograd leaf of the
  encoder: their backward gives ``sae_in``, ``W_enc``, ``b_enc`` (and the
  decoder-norm scale) gradients from the pairs only, and the forward recomputes
  nothing (the values come from the selection's no-grad pass).
- :func:`pair_decode`: ``out[i] = sum over pairs (i, j) of c_p * W[j]``, with
  gradients for ``c`` and ``W``.
- :func:`sparse_encode_decode`: the two composed as SAELens's TopK training SAE
  composes its dense step (``rescale_acts_by_decoder_norm`` included); with
  ``b_dec=None`` it is the auxiliary losses' bias-free reconstruction.
- :func:`sparse_feature_acts`: the kept activations as a sparse COO
  ``feature_acts``, which SAELens's trainer accepts for its statistics.
- :func:`aux_topk_pairs`: the pairs of the TopK auxiliary loss (each token's
  top ``k_aux`` candidate latents) in the same form; and
  :func:`aux_candidate_reconstruction`, that loss's reconstruction computed
  densely on the candidate columns alone, the faster of the two when the
  candidates are few (measured).

Two primitives do all the work, on pairs grouped by token or by latent
(:class:`PairLayout`, built once per step): a weighted gather-sum of table rows
per group (``F.embedding_bag`` with ``mode="sum"`` and ``per_sample_weights``,
as EleutherAI sparsify's decoder) and a dot product per pair (on CPU
``torch.sparse.sampled_addmm``, an SDDMM; elsewhere chunked gathers). Which
candidate is fastest was measured by ``python -m benchmarks.sparse_ops``.

Dtypes: the sparse pieces run with autocast off, in the parameters' dtype
(float32 for a float32 SAE under bfloat16 autocast, where the only
low-precision work is the dense encoder product that produced the values;
float64 in float64). Gradients come back in each input's own dtype.

Padding: a pair is padding when ``kept`` is False (for a selection, when its
value is 0). Padding pairs contribute nothing and receive zero gradient, as the
dense path's ``relu`` restricted to the kept pairs gives them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sae_lens_choice.allocation import ChoicePairs

__all__ = [
    "PairLayout",
    "aux_candidate_reconstruction",
    "aux_topk_pairs",
    "pair_decode",
    "pair_dot",
    "pair_layout",
    "pair_pre_acts",
    "sparse_encode_decode",
    "sparse_feature_acts",
]

# Pairs per block in the gather path of :func:`pair_dot`: on CPU two (block, d) gathers
# of this many rows stay within a few MiB of cache; accelerators take larger blocks
# (fewer kernel launches).
_PAIR_DOT_BLOCK = {"cpu": 2048}
_PAIR_DOT_BLOCK_DEFAULT = 1 << 16


# ---------------------------------------------------------------------------
# layout: the kept pairs grouped by token and by latent
# ---------------------------------------------------------------------------


class PairLayout(NamedTuple):
    """P pairs of an (N, F) matrix, grouped by token and by latent. No gradients.

    Built once per step by :func:`pair_layout` and shared by every sparse op of
    that step. Sorting puts the padding pairs last, after every real group; their
    gather index is 0 and their weight is zeroed, so they cost a cached row read
    each and contribute nothing.

    Attributes:
        token_idx: (P,) token of each pair, in the caller's order.
        latent_idx: (P,) latent of each pair, in the caller's order.
        kept: (P,) bool, False for padding.
        token_order: (P,) permutation listing the pairs token by token, padding last.
        token_crow: (N + 1,) CSR row pointers of that order: token i's pairs are
            ``token_order[token_crow[i]:token_crow[i + 1]]``, except that the
            padding pairs are appended to the last token (``token_crow[N] == P``).
        token_gather: (P,) latent of each pair in token order (0 for padding).
        token_rows: (P,) token of each pair in token order (N - 1 for padding).
        latent_order: (P,) permutation listing the pairs latent by latent, padding last.
        latent_crow: (F + 1,) pointers of that order, padding appended to the last latent.
        latent_gather: (P,) token of each pair in latent order (0 for padding).
    """

    token_idx: torch.Tensor
    latent_idx: torch.Tensor
    kept: torch.Tensor
    token_order: torch.Tensor
    token_crow: torch.Tensor
    token_gather: torch.Tensor
    token_rows: torch.Tensor
    latent_order: torch.Tensor
    latent_crow: torch.Tensor
    latent_gather: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return self.token_crow.shape[0] - 1

    @property
    def d_sae(self) -> int:
        return self.latent_crow.shape[0] - 1

    @property
    def n_pairs(self) -> int:
        return self.token_idx.shape[0]


def _group(
    keys: torch.Tensor, other: torch.Tensor, kept: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group pairs by ``keys``, padding last: (order, crow, other, group) in that order.

    ``other`` in the sorted order is 0 on padding (a harmless gather index) and
    ``group`` is each sorted pair's group, the last one for padding.
    """
    n_pairs = keys.shape[0]
    # padding sorts after every real group
    sort_keys = torch.where(kept, keys, torch.full_like(keys, n_groups))
    sorted_keys, order = torch.sort(sort_keys, stable=True)  # (P,), (P,)
    boundaries = torch.arange(n_groups, device=keys.device, dtype=keys.dtype)
    starts = torch.searchsorted(sorted_keys, boundaries)  # (G,) first pair of each group
    # the padding pairs (sorted last) join the last group, where their zero weight is harmless
    crow = torch.cat([starts, starts.new_full((1,), n_pairs)])  # (G + 1,)
    kept_sorted = kept.index_select(0, order)
    gathered = torch.where(kept_sorted, other.index_select(0, order), torch.zeros_like(other))
    group_of = torch.where(kept_sorted, sorted_keys, torch.full_like(sorted_keys, n_groups - 1))
    return order, crow, gathered, group_of


def pair_layout(
    token_idx: torch.Tensor,
    latent_idx: torch.Tensor,
    kept: torch.Tensor,
    n_tokens: int,
    d_sae: int,
) -> PairLayout:
    """Group P pairs of an (N, F) matrix by token and by latent (two sorts of P keys).

    Args:
        token_idx: (P,) int64 token (row) of each pair, in [0, N).
        latent_idx: (P,) int64 latent (column) of each pair, in [0, F).
        kept: (P,) bool; False marks padding. Kept pairs must be distinct.
        n_tokens: N.
        d_sae: F.

    Runs without autograd and reads nothing back from the device.
    """
    if token_idx.shape != latent_idx.shape or token_idx.shape != kept.shape:
        raise ValueError(
            "token_idx, latent_idx and kept must have the same shape (P,), got "
            f"{tuple(token_idx.shape)}, {tuple(latent_idx.shape)} and {tuple(kept.shape)}"
        )
    if token_idx.ndim != 1:
        raise ValueError(f"pairs must be 1-D (P,), got shape {tuple(token_idx.shape)}")
    if n_tokens < 1 or d_sae < 1:
        raise ValueError(f"n_tokens and d_sae must be >= 1, got {n_tokens} and {d_sae}")
    with torch.no_grad():
        token_idx = token_idx.to(torch.long)
        latent_idx = latent_idx.to(torch.long)
        kept = kept.to(torch.bool)
        token_order, token_crow, token_gather, token_rows = _group(
            token_idx, latent_idx, kept, n_tokens
        )
        latent_order, latent_crow, latent_gather, _ = _group(latent_idx, token_idx, kept, d_sae)
    return PairLayout(
        token_idx=token_idx,
        latent_idx=latent_idx,
        kept=kept,
        token_order=token_order,
        token_crow=token_crow,
        token_gather=token_gather,
        token_rows=token_rows,
        latent_order=latent_order,
        latent_crow=latent_crow,
        latent_gather=latent_gather,
    )


# ---------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------


def _gather_sum(
    table: torch.Tensor,
    gather: torch.Tensor,
    crow: torch.Tensor,
    order: torch.Tensor,
    weights: torch.Tensor,
    kept: torch.Tensor,
) -> torch.Tensor:
    """out[g] = sum over the pairs p of group g of weights[p] * table[gather of p].

    table: (R, d); gather, order, weights, kept: (P,), weights and kept in the caller's
    order; crow: (G + 1,). Returns (G, d) in the table's dtype.
    """
    table = table.contiguous()
    w = torch.where(kept, weights, torch.zeros_like(weights)).index_select(0, order)
    # embedding_bag with per-sample weights is a weighted segment sum of gathered rows,
    # fused (no (P, d) temporary); the measured fastest on CPU (benchmarks/sparse_ops.py).
    return F.embedding_bag(
        gather, table, crow[:-1], mode="sum", per_sample_weights=w.to(table.dtype)
    )


def _pair_dot_gather(
    a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    # (P,) = a[rows] . b[cols], in blocks so the (block, d) gathers stay small
    out = a.new_empty(rows.shape[0])
    block = _PAIR_DOT_BLOCK.get(a.device.type, _PAIR_DOT_BLOCK_DEFAULT)
    for start in range(0, rows.shape[0], block):
        stop = min(start + block, rows.shape[0])
        a_rows = a.index_select(0, rows[start:stop])  # (block, d)
        b_rows = b.index_select(0, cols[start:stop])  # (block, d)
        out[start:stop] = (a_rows * b_rows).sum(-1)
    return out


def _pair_dot_impl(
    a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, crow: torch.Tensor
) -> torch.Tensor:
    if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64) and cols.numel():
        # An SDDMM: the (N, F) product sampled at the pairs, without (P, d) temporaries.
        # The pairs are in row order (crow); columns within a row need not be sorted.
        with warnings.catch_warnings():
            # "Sparse CSR tensor support is in beta state": this use is stable since torch 2.0
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
            pattern = torch.sparse_csr_tensor(
                crow,
                cols,
                a.new_zeros(cols.shape[0]),
                (a.shape[0], b.shape[0]),
                check_invariants=False,
            )
        return torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0).values()
    return _pair_dot_gather(a, b, rows, cols)


def _pair_dot_contiguous(
    a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, crow: torch.Tensor
) -> torch.Tensor:
    return _pair_dot_impl(a.contiguous(), b.contiguous(), rows, cols, crow)


_pair_dot_op: Callable[..., torch.Tensor] = _pair_dot_contiguous
if hasattr(torch.library, "custom_op"):
    # An opaque operator to torch.compile: the sparse CSR tensor inside never reaches
    # the tracer, which only needs the output's shape (torch >= 2.4; plain call before).
    _custom_pair_dot = torch.library.custom_op("sae_lens_choice::pair_dot", mutates_args=())(
        _pair_dot_contiguous
    )

    @_custom_pair_dot.register_fake
    def _(a, b, rows, cols, crow):
        return a.new_empty(rows.shape[0])

    _pair_dot_op = _custom_pair_dot


def pair_dot(
    a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, crow: torch.Tensor
) -> torch.Tensor:
    """(P,) dot products ``a[rows[p]] . b[cols[p]]``, the pairs sorted by row. No autograd.

    Args:
        a: (N, d); b: (F, d), same dtype.
        rows: (P,) non-decreasing row of each pair; cols: (P,) column of each pair.
        crow: (N + 1,) row pointers of ``rows`` (``rows[crow[i]:crow[i + 1]] == i``).
    """
    return _pair_dot_op(a, b, rows, cols, crow)


# ---------------------------------------------------------------------------
# autograd functions
# ---------------------------------------------------------------------------


def _autocast_off(device_type: str) -> torch.autocast:
    # the sparse ops are gathers and sums: run them at the parameters' precision
    return torch.autocast(device_type=device_type, enabled=False)


class _PairPreActs(torch.autograd.Function):
    """The pairs' pre-activations, differentiable in sae_in, W_enc, b_enc and scale.

    forward returns the given values (computed in the selection's no-grad pass);
    backward computes, for the incoming g (P,) (zeroed on padding) and
    ``g_raw = g * scale[latent]``:
    ``grad_sae_in[i] = sum_(i,j) g_raw W_enc[:, j]``,
    ``grad_W_enc[:, j] = sum_(i,j) g_raw sae_in[i]``, ``grad_b_enc[j] = sum_(i,j) g_raw``,
    ``grad_scale[j] = sum_(i,j) g * values / scale[j]`` (the raw pre-activation).
    """

    @staticmethod
    def forward(
        ctx,
        sae_in: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        scale: torch.Tensor | None,
        values: torch.Tensor,
        *layout: torch.Tensor,
    ) -> torch.Tensor:
        # layout: the PairLayout's tensors, in its field order
        ctx.has_scale = scale is not None
        ctx.save_for_backward(sae_in, W_enc, scale, values, *layout)
        ctx.b_enc_dtype = b_enc.dtype
        return values.detach().to(W_enc.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        sae_in, W_enc, scale, values, *layout_tensors = ctx.saved_tensors
        layout = PairLayout(*layout_tensors)
        latent_idx, kept = layout.latent_idx, layout.kept
        d_sae = W_enc.shape[1]
        grad_sae_in = grad_W_enc = grad_b_enc = grad_scale = None
        with _autocast_off(grad.device.type):
            g = torch.where(kept, grad.to(W_enc.dtype), torch.zeros((), dtype=W_enc.dtype))
            if ctx.has_scale:
                s = scale.to(W_enc.dtype).index_select(0, latent_idx)  # (P,)
                if ctx.needs_input_grad[3]:
                    # d hidden_pre / d scale = the raw pre-activation = value / scale; a
                    # kept pair's scale is positive unless its value is 0 (then g * 0).
                    raw = values.to(W_enc.dtype) / torch.where(s != 0, s, torch.ones_like(s))
                    grad_scale = torch.zeros(d_sae, dtype=scale.dtype, device=grad.device)
                    grad_scale.index_add_(0, latent_idx, (g * raw).to(scale.dtype))
                g = g * s
            if ctx.needs_input_grad[0]:
                # rows of W_enc^T: one (F, d_in) copy makes the gathers contiguous
                grad_sae_in = _gather_sum(
                    W_enc.t().to(sae_in.dtype),
                    layout.token_gather,
                    layout.token_crow,
                    layout.token_order,
                    g,
                    kept,
                )
            if ctx.needs_input_grad[1]:
                # (F, d_in) rows summed per latent, returned as the (d_in, F) transpose
                grad_W_enc = _gather_sum(
                    sae_in.to(W_enc.dtype),
                    layout.latent_gather,
                    layout.latent_crow,
                    layout.latent_order,
                    g,
                    kept,
                ).t()
            if ctx.needs_input_grad[2]:
                grad_b_enc = torch.zeros(d_sae, dtype=ctx.b_enc_dtype, device=grad.device)
                grad_b_enc.index_add_(0, latent_idx, g.to(ctx.b_enc_dtype))
        return (grad_sae_in, grad_W_enc, grad_b_enc, grad_scale, None, *([None] * len(layout)))


class _PairDecode(torch.autograd.Function):
    """(N, d) = sum over pairs (i, j) of c_p * W[j] into row i; differentiable in c and W.

    backward: ``grad_W[j] = sum_(i,j) c_p grad_out[i]``, ``grad_c_p = grad_out[i] . W[j]``.
    """

    @staticmethod
    def forward(
        ctx, coefficients: torch.Tensor, W: torch.Tensor, *layout_tensors: torch.Tensor
    ) -> torch.Tensor:
        # layout_tensors: the PairLayout's tensors, in its field order
        ctx.save_for_backward(coefficients, W, *layout_tensors)
        layout = PairLayout(*layout_tensors)
        with _autocast_off(W.device.type):
            return _gather_sum(
                W,
                layout.token_gather,
                layout.token_crow,
                layout.token_order,
                coefficients,
                layout.kept,
            )

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        coefficients, W, *layout_tensors = ctx.saved_tensors
        layout = PairLayout(*layout_tensors)
        kept = layout.kept
        grad_c = grad_W = None
        with _autocast_off(grad_out.device.type):
            grad_out = grad_out.to(W.dtype)
            if ctx.needs_input_grad[0]:
                dots = pair_dot(  # in token order
                    grad_out, W, layout.token_rows, layout.token_gather, layout.token_crow
                )
                grad_c = torch.empty_like(dots).scatter_(0, layout.token_order, dots)
                grad_c = torch.where(kept, grad_c, torch.zeros_like(grad_c))
                grad_c = grad_c.to(coefficients.dtype)
            if ctx.needs_input_grad[1]:
                grad_W = _gather_sum(
                    grad_out,
                    layout.latent_gather,
                    layout.latent_crow,
                    layout.latent_order,
                    coefficients,
                    kept,
                )
        return (grad_c, grad_W, *([None] * len(layout)))


def pair_pre_acts(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    values: torch.Tensor,
    layout: PairLayout,
    *,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pairs' ``hidden_pre`` values, with gradients that touch only the pairs.

    Stands for ``((sae_in @ W_enc + b_enc) * scale)[token_idx, latent_idx]`` without
    recomputing it: the forward returns ``values`` (from the selection's no-grad
    pass), the backward gives ``sae_in``, ``W_enc``, ``b_enc`` and ``scale`` their
    gradients at O(P * d_in) cost. Padding pairs (``layout.kept`` False) get zero
    gradient. With ``values = relu(hidden_pre)`` on the kept pairs this is the
    dense path's ``relu`` restricted to them.

    Args:
        sae_in: (N, d_in) encoder input.
        W_enc: (d_in, F); b_enc: (F,).
        values: (P,) the pairs' ``hidden_pre`` (any dtype; detached).
        layout: :func:`pair_layout` of the pairs.
        scale: (F,) or None: the per-latent factor ``hidden_pre`` was multiplied by
            (the decoder norms under ``rescale_acts_by_decoder_norm``).

    Returns:
        (P,) in ``W_enc``'s dtype, equal to ``values``.
    """
    if sae_in.ndim != 2 or sae_in.shape[0] != layout.n_tokens:
        raise ValueError(
            f"sae_in must be (N, d_in) with N = {layout.n_tokens}, got {tuple(sae_in.shape)}"
        )
    if W_enc.shape != (sae_in.shape[1], layout.d_sae):
        raise ValueError(
            f"W_enc must be (d_in, d_sae) = ({sae_in.shape[1]}, {layout.d_sae}), "
            f"got {tuple(W_enc.shape)}"
        )
    out = _PairPreActs.apply(sae_in, W_enc, b_enc, scale, values.detach(), *layout)
    return out  # type: ignore[return-value]


def pair_decode(coefficients: torch.Tensor, W: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    """(N, d) with row i = sum over the pairs (i, j) of ``coefficients[p] * W[j]``.

    The sparse ``feature_acts @ W`` for ``feature_acts`` holding ``coefficients``
    at the pairs; padding pairs contribute nothing and get zero gradient.
    Differentiable in ``coefficients`` and ``W`` (O(P * d) each way); runs in
    ``W``'s dtype.

    Args:
        coefficients: (P,) one weight per pair.
        W: (F, d) table (``W_dec``).
        layout: :func:`pair_layout` of the pairs.
    """
    if W.ndim != 2 or W.shape[0] != layout.d_sae:
        raise ValueError(f"W must be (d_sae, d) with d_sae = {layout.d_sae}, got {tuple(W.shape)}")
    out = _PairDecode.apply(coefficients.to(W.dtype), W, *layout)
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# composed step
# ---------------------------------------------------------------------------


def sparse_encode_decode(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    rescale_acts_by_decoder_norm: bool,
    kept: torch.Tensor | None = None,
    layout: PairLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens TopK's ``decode(encode(x))`` before its output hooks, from the kept pairs.

    Equals, outputs and gradients, the dense

    ``hidden_pre = sae_in @ W_enc + b_enc`` (times ``W_dec.norm(dim=-1)`` under
    ``rescale_acts_by_decoder_norm``), ``feature_acts = hidden_pre`` on the kept
    pairs and 0 elsewhere, ``sae_out_pre = feature_acts (/ W_dec norms) @ W_dec + b_dec``,

    at O(P * d_in) cost after the selection. Under rescaling the norms cancel in
    ``sae_out_pre`` (values and gradients; the dense path computes the two
    cancelling terms), so the norm vector's gradient reaches ``W_dec`` only
    through ``acts``, when the caller differentiates them (e.g. a sparsity penalty).

    Args:
        sae_in: (..., d_in) encoder input (``process_sae_in(x)``), with its graph
            (to ``b_dec``).
        W_enc, b_enc, W_dec: (d_in, F), (F,), (F, d_in) parameters.
        b_dec: (d_in,) added to the output, or None for a bias-free
            reconstruction (the auxiliary losses).
        pairs: a :class:`~sae_lens_choice.allocation.ChoicePairs`
            ``(token_idx, latent_idx, values)`` over the flattened tokens, ``values``
            being ``hidden_pre`` (rescaled when rescaling) at the pairs, from a
            no-grad pass over the same parameters.
        rescale_acts_by_decoder_norm: as SAELens's TopK config field.
        kept: (P,) bool, the pairs that count; default ``values > 0`` (the
            selection's convention: 0 marks padding, as ``relu`` would zero it).
            The auxiliary loss passes its own mask (its values are not relu'd).
        layout: a :func:`pair_layout` of these pairs, if already built.

    Returns:
        ``(sae_out_pre, acts)``: (..., d_in) reconstruction in ``W_dec``'s dtype,
        and (P,) the kept activations in ``W_enc``'s dtype (``values``, exactly
        without rescaling and up to rounding with it; 0 on padding), differentiable.
    """
    token_idx, latent_idx, values = pairs
    d_in = sae_in.shape[-1]
    x = sae_in.reshape(-1, d_in)  # (N, d_in)
    d_sae = W_enc.shape[1]
    if kept is None:
        kept = values > 0
    if layout is None:
        layout = pair_layout(token_idx, latent_idx, kept, x.shape[0], d_sae)
    if not rescale_acts_by_decoder_norm:
        acts = pair_pre_acts(x, W_enc, b_enc, values, layout)  # (P,)
        coefficients = acts
    else:
        # SAELens decodes feature_acts * (1 / norms) with feature_acts = hidden_pre * norms:
        # the norms cancel in the reconstruction, so it is decoded from the unscaled
        # pre-activations (equal up to rounding) and the norms' gradient, which cancels
        # there too, is computed only where the caller uses ``acts`` (no (F, d_in) work).
        norms = W_dec.norm(dim=-1)  # (F,)
        pair_norms = norms.index_select(0, layout.latent_idx)  # (P,)
        with torch.no_grad():
            safe = torch.where(pair_norms > 0, pair_norms, torch.ones_like(pair_norms))
            unscaled = values.to(safe.dtype) / safe
        coefficients = pair_pre_acts(x, W_enc, b_enc, unscaled, layout)  # (P,)
        acts = coefficients * pair_norms.to(coefficients.dtype)
    out = pair_decode(coefficients, W_dec, layout)  # (N, d_in)
    if b_dec is not None:
        out = out + b_dec
    return out.reshape(*sae_in.shape[:-1], out.shape[-1]), acts


def sparse_feature_acts(
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    acts: torch.Tensor | None,
    shape: tuple[int, ...] | torch.Size,
) -> torch.Tensor:
    """A sparse COO ``feature_acts`` of ``shape`` (..., F) holding ``acts`` at the pairs.

    For SAELens's trainer statistics (``feature_acts.bool().float().sum(-2)``,
    L0) and metrics: the values are detached; padding pairs are stored as
    explicit zeros (so the count of stored entries never depends on the data),
    which every such statistic ignores. Leading dimensions are unravelled from the
    flattened token index, as SAELens's sparse ``TopK`` builds them.

    Args:
        pairs: ``(token_idx, latent_idx, values)`` over the flattened tokens.
        acts: (P,) values to store (e.g. :func:`sparse_encode_decode`'s ``acts``);
            None stores ``pairs.values``.
        shape: the dense ``feature_acts`` shape, (..., F).
    """
    token_idx, latent_idx, values = pairs
    data = (values if acts is None else acts).detach()
    lead = tuple(shape[:-1])
    coords = []
    rest = token_idx
    for size in reversed(lead[1:]):
        coords.append(rest % size)
        rest = torch.div(rest, size, rounding_mode="floor")
    coords.append(rest)
    indices = torch.stack([*reversed(coords), latent_idx])  # (ndim, P)
    return torch.sparse_coo_tensor(indices, data, tuple(shape), check_invariants=False)


# ---------------------------------------------------------------------------
# auxiliary loss pairs
# ---------------------------------------------------------------------------


def aux_topk_pairs(
    hidden_pre: torch.Tensor,
    candidate_mask: torch.Tensor,
    k_aux: int,
    *,
    compact: bool | None = None,
) -> tuple[ChoicePairs, torch.Tensor]:
    """Each token's top ``k_aux`` candidate latents by ``hidden_pre``, as pairs. No autograd.

    The selection of SAELens's ``calculate_topk_aux_acts`` and
    :func:`sae_lens_choice.losses.aux_reconstruction_loss`: per token, the
    ``min(k_aux, n_candidates)`` largest pre-activations among the candidate
    latents, values not relu'd. Decode them with
    ``sparse_encode_decode(..., b_dec=None, kept=kept)``.

    Args:
        hidden_pre: (..., F) pre-activations (rescaled when rescaling).
        candidate_mask: (F,) bool candidate latents.
        k_aux: latents per token.
        compact: take the top-k over the candidate columns only. That reads the
            candidate count back from the device (its shape depends on it) and is
            much cheaper when candidates are few; the default is True on CPU,
            where a read-back costs nothing, else a fixed-size top-k over all F
            columns with non-candidates masked (no read-back).

    Returns:
        ``(pairs, kept)``: pairs ``(token_idx, latent_idx, values)`` of P = N * k
        entries, token by token (k = ``min(k_aux, n_candidates)`` when compact,
        else ``min(k_aux, F)``), and (P,) bool ``kept``: False for the slots no
        candidate fills (value 0).
    """
    x = hidden_pre.detach().reshape(-1, hidden_pre.shape[-1])  # (N, F)
    n_tokens, d_sae = x.shape
    mask = candidate_mask.to(device=x.device, dtype=torch.bool)
    if compact is None:
        compact = x.device.type == "cpu"
    with torch.no_grad():
        if compact:
            candidates = mask.nonzero().squeeze(1)  # (n_c,): reads the count back
            k = min(k_aux, candidates.shape[0])
            values, cols = torch.topk(x.index_select(1, candidates), k, dim=-1, sorted=False)
            latent_idx = candidates.index_select(0, cols.reshape(-1))  # (N * k,)
            kept = torch.ones(n_tokens * k, dtype=torch.bool, device=x.device)
        else:
            k = min(k_aux, d_sae)
            masked = torch.where(mask, x, x.new_tensor(float("-inf")))  # (N, F)
            values, cols = torch.topk(masked, k, dim=-1, sorted=False)  # (N, k)
            latent_idx = cols.reshape(-1)
            kept = torch.isfinite(values).reshape(-1)
            values = torch.where(torch.isfinite(values), values, values.new_zeros(()))
        token_idx = torch.arange(n_tokens, device=x.device).repeat_interleave(k)  # (N * k,)
    return ChoicePairs(token_idx, latent_idx, values.reshape(-1)), kept


def aux_candidate_reconstruction(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    candidates: torch.Tensor,
    k_aux: int,
    *,
    rescale_acts_by_decoder_norm: bool,
) -> torch.Tensor:
    """The TopK aux loss's bias-free reconstruction, computed on the candidate columns only.

    SAELens's ``calculate_topk_aux_acts`` + ``act_times_W_dec`` restricted to the
    ``n_c`` candidate latents: their pre-activations are recomputed with autograd
    (an (N, n_c) product), each token keeps its top ``min(k_aux, n_c)``, and they
    are decoded through the candidates' decoder rows. Dense within the candidates,
    so it costs O(N * n_c * d_in) matmul work and needs nothing of the (N, F)
    pre-activations: with few candidates (dead latents are usually well under
    ``k_aux`` times a few) this is far cheaper than decoding ``N * k_aux`` pairs
    (measured in ``benchmarks/sparse_ops.py``).

    Args:
        sae_in: (..., d_in) encoder input, with its graph.
        W_enc, b_enc, W_dec: (d_in, F), (F,), (F, d_in) parameters.
        candidates: (n_c,) int64 candidate latent indices (``mask.nonzero()``; its
            length is data-dependent, so building it reads back from the device).
        k_aux: latents per token before the ``min`` with ``n_c``.
        rescale_acts_by_decoder_norm: as SAELens's TopK config field.

    Returns:
        (..., d_in) reconstruction (no ``b_dec``); zeros when there is no candidate.
    """
    d_in = sae_in.shape[-1]
    x = sae_in.reshape(-1, d_in)  # (N, d_in)
    k = min(k_aux, candidates.shape[0])
    if k == 0:
        return x.new_zeros((*sae_in.shape[:-1], W_dec.shape[1]), dtype=W_dec.dtype)
    W_dec_c = W_dec.index_select(0, candidates)  # (n_c, d_in)
    hidden_pre = x @ W_enc.index_select(1, candidates) + b_enc.index_select(0, candidates)
    if rescale_acts_by_decoder_norm:
        norms = W_dec_c.norm(dim=-1)  # (n_c,)
        hidden_pre = hidden_pre * norms  # (N, n_c)
    top = torch.topk(hidden_pre.detach(), k, dim=-1, sorted=False).indices  # (N, k)
    aux_acts = torch.zeros_like(hidden_pre).scatter(-1, top, hidden_pre.gather(-1, top))
    if rescale_acts_by_decoder_norm:
        aux_acts = aux_acts * (1 / norms)
    recons = aux_acts @ W_dec_c  # (N, d_in)
    return recons.reshape(*sae_in.shape[:-1], recons.shape[-1])
