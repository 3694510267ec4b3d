"""The sparse step (sae_lens_choice.sparse) against brute-force dense references.

Every fast path is compared with the dense computation SAELens's TopK training
SAE does (``sae_in @ W_enc + b_enc``, optional decoder-norm rescaling, the kept
pairs of ``hidden_pre``, ``act_times_W_dec`` + ``b_dec``), outputs AND gradients
(inputs, ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` and the returned
activations): exact-ish in float64, with tolerance in float32 and bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig, act_times_W_dec

from sae_lens_choice.allocation import (
    ChoicePairs,
    capacity_bounds,
    feature_choice_pairs,
    mutual_choice_pairs,
    pairs_to_dense,
    plan_feature_choice,
    round_capacities,
    zipf_capacities,
)
from sae_lens_choice.sparse import (
    aux_candidate_reconstruction,
    aux_topk_pairs,
    pair_decode,
    pair_dot,
    pair_layout,
    pair_pre_acts,
    sparse_encode_decode,
    sparse_feature_acts,
)

D_IN, D_SAE = 6, 40
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available here")

Params = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_params(
    d_in: int = D_IN, d_sae: int = D_SAE, dtype=torch.float64, device="cpu", seed: int = 0
) -> Params:
    """W_enc, b_enc, W_dec, b_dec as leaves; decoder rows of unequal norm (rescaling matters)."""
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=gen, dtype=torch.float64)
    W_dec = W_dec * torch.rand(d_sae, 1, generator=gen, dtype=torch.float64).add(0.5)
    W_enc = torch.randn(d_in, d_sae, generator=gen, dtype=torch.float64)
    b_enc = 0.3 * torch.randn(d_sae, generator=gen, dtype=torch.float64)
    b_dec = torch.randn(d_in, generator=gen, dtype=torch.float64)
    return tuple(  # type: ignore[return-value]
        p.to(device=device, dtype=dtype).requires_grad_() for p in (W_enc, b_enc, W_dec, b_dec)
    )


def cast(params: Params, dtype: torch.dtype) -> Params:
    return tuple(p.detach().to(dtype).requires_grad_() for p in params)  # type: ignore[return-value]


def hidden_pre_of(x: torch.Tensor, params: Params, rescale: bool) -> torch.Tensor:
    W_enc, b_enc, W_dec, b_dec = params
    hidden_pre = (x - b_dec) @ W_enc + b_enc
    if rescale:
        hidden_pre = hidden_pre * W_dec.norm(dim=-1)
    return hidden_pre


def dense_step(
    x: torch.Tensor, params: Params, pairs: ChoicePairs, rescale: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens TopK's dense step restricted to ``pairs``: (sae_out, the pairs' feature_acts)."""
    W_dec, b_dec = params[2], params[3]
    hidden_pre = hidden_pre_of(x, params, rescale)
    feature_acts = pairs_to_dense(pairs, hidden_pre)  # hidden_pre on kept pairs, 0 elsewhere
    sae_out = act_times_W_dec(feature_acts, W_dec, rescale) + b_dec
    acts = feature_acts.reshape(-1, feature_acts.shape[-1])[pairs.token_idx, pairs.latent_idx]
    return sae_out, acts


def sparse_step(
    x: torch.Tensor, params: Params, pairs: ChoicePairs, rescale: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    W_enc, b_enc, W_dec, b_dec = params
    return sparse_encode_decode(
        x - b_dec, W_enc, b_enc, W_dec, b_dec, pairs, rescale_acts_by_decoder_norm=rescale
    )


def objective(
    x: torch.Tensor, sae_out: torch.Tensor, acts: torch.Tensor | None, seed: int = 1
) -> torch.Tensor:
    """The training MSE plus random linear terms, so every gradient entry is exercised.

    With ``acts`` None, the MSE and the term in ``sae_out`` only (the training step,
    where the activations feed nothing but the decoder).
    """
    gen = torch.Generator().manual_seed(seed)
    r_out = torch.randn(sae_out.shape, generator=gen, dtype=torch.float64).to(sae_out)
    dtype = torch.promote_types(sae_out.dtype, torch.float32)  # bfloat16 squares in float32
    mse = (sae_out.to(dtype) - x.to(dtype)).pow(2).sum(-1).mean()
    loss = mse + (sae_out * r_out).sum()
    if acts is not None:
        r_acts = torch.randn(acts.shape, generator=gen, dtype=torch.float64).to(acts)
        loss = loss + (acts * r_acts).sum()
    return loss


def outputs_and_grads(
    step: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    params: Params,
    pairs: ChoicePairs,
    rescale: bool,
    with_acts: bool = True,
) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    sae_out, acts = step(x, params, pairs, rescale)
    loss = objective(x, sae_out, acts if with_acts else None)
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return [sae_out, acts] + [
        torch.zeros_like(p) if g is None else g for g, p in zip(grads, [x, *params])
    ]


NAMES = ["sae_out", "acts", "grad x", "grad W_enc", "grad b_enc", "grad W_dec", "grad b_dec"]


def assert_match(
    got: list[torch.Tensor], want: list[torch.Tensor], *, rtol: float, atol_scale: float
) -> None:
    """Each tensor close to the reference, the absolute tolerance relative to its scale."""
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape, name
        w64 = w.detach().to(torch.float64)
        atol = atol_scale * max(float(w64.abs().max()), 1e-6) if w.numel() else 0.0
        torch.testing.assert_close(
            g.detach().to(torch.float64),
            w64,
            rtol=rtol,
            atol=atol,
            msg=lambda m, n=name: f"{n}: {m}",
        )


def inputs(shape: tuple[int, ...], dtype=torch.float64, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, D_IN, generator=gen, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------
# selections
# ---------------------------------------------------------------------------


def mc_pairs(hidden_pre: torch.Tensor, k: float = 3) -> ChoicePairs:
    return mutual_choice_pairs(hidden_pre, k)


def fc_zipf_pairs(hidden_pre: torch.Tensor, k: float = 3) -> ChoicePairs:
    n_tokens, d_sae = hidden_pre.reshape(-1, hidden_pre.shape[-1]).shape
    expected = zipf_capacities(n_tokens, d_sae, k)
    plan = plan_feature_choice(capacity_bounds(expected, n_tokens), n_tokens)
    caps = round_capacities(expected, torch.Generator().manual_seed(3))
    # Zipf capacities and plan groups leave padding slots (value 0) in the pairs
    return feature_choice_pairs(hidden_pre, caps, plan=plan)


def topk_pairs(hidden_pre: torch.Tensor, k: int = 3) -> ChoicePairs:
    x = hidden_pre.detach().reshape(-1, hidden_pre.shape[-1])
    values, latents = torch.topk(x, k, dim=-1)
    tokens = torch.arange(x.shape[0]).repeat_interleave(k)
    return ChoicePairs(tokens, latents.reshape(-1), values.relu().reshape(-1))


SELECTIONS = {"mutual_choice": mc_pairs, "feature_choice_zipf": fc_zipf_pairs, "topk": topk_pairs}


def select(x: torch.Tensor, params: Params, rescale: bool, rule: str) -> ChoicePairs:
    with torch.no_grad():
        return SELECTIONS[rule](hidden_pre_of(x, params, rescale))


# ---------------------------------------------------------------------------
# exactness against the dense path
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("rule", list(SELECTIONS))
@pytest.mark.parametrize("lead", [(24,), (3, 8)], ids=["2d", "3d"])
def test_matches_dense_float64(rescale: bool, rule: str, lead: tuple[int, ...]):
    params = make_params()
    x = inputs(lead)
    pairs = select(x, params, rescale, rule)
    if rule == "feature_choice_zipf":
        assert bool((pairs.values == 0).any()), "the Zipf plan should leave padding slots"
    got = outputs_and_grads(sparse_step, x, params, pairs, rescale)
    want = outputs_and_grads(dense_step, x, params, pairs, rescale)
    assert got[0].shape == (*lead, D_IN)
    assert_match(got, want, rtol=1e-10, atol_scale=1e-12)
    # the training loss alone: under rescaling the norms' cancelling terms are skipped
    got = outputs_and_grads(sparse_step, x, params, pairs, rescale, with_acts=False)
    want = outputs_and_grads(dense_step, x, params, pairs, rescale, with_acts=False)
    assert_match(got, want, rtol=1e-10, atol_scale=1e-12)
    # the kept values are returned as the selection computed them (exactly without rescaling)
    if rescale:
        torch.testing.assert_close(got[1], pairs.values, rtol=1e-15, atol=0)
    else:
        assert torch.equal(got[1], pairs.values)


@pytest.mark.parametrize("rescale", [False, True])
def test_matches_dense_float32(rescale: bool):
    params = make_params()
    x = inputs((32,))
    pairs = select(x.float(), cast(params, torch.float32), rescale, "mutual_choice")
    got = outputs_and_grads(sparse_step, x.float(), cast(params, torch.float32), pairs, rescale)
    # float64 reference on the same pairs
    want = outputs_and_grads(dense_step, x, params, pairs, rescale)
    assert all(t.dtype == torch.float32 for t in got)
    assert_match(got, want, rtol=1e-4, atol_scale=1e-5)


@pytest.mark.parametrize("rescale", [False, True])
def test_matches_dense_bfloat16_params(rescale: bool):
    params = make_params()
    x = inputs((32,))
    low = cast(params, torch.bfloat16)
    pairs = select(x.bfloat16(), low, rescale, "mutual_choice")
    got = outputs_and_grads(sparse_step, x.bfloat16(), low, pairs, rescale)
    # the reference runs in float64 from the bfloat16-rounded parameters and inputs
    want = outputs_and_grads(
        dense_step, x.bfloat16().double(), cast(low, torch.float64), pairs, rescale
    )
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    assert_match(got, want, rtol=3e-2, atol_scale=3e-2)


@pytest.mark.parametrize("rescale", [False, True])
def test_autocast_bfloat16(rescale: bool):
    """Under CPU bfloat16 autocast, the sparse ops run in float32 (the parameters' dtype)."""
    params32 = cast(make_params(), torch.float32)
    x = inputs((32,), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pairs = select(x, params32, rescale, "mutual_choice")
        got = outputs_and_grads(sparse_step, x, params32, pairs, rescale)
        dense_autocast = outputs_and_grads(dense_step, x, params32, pairs, rescale)
    assert all(t.dtype == torch.float32 for t in got)
    # float64 reference from the same selected values
    want = outputs_and_grads(dense_step, x.double(), cast(params32, torch.float64), pairs, rescale)
    # the values come from a bfloat16 matmul (relative error ~2**-8); after that the sparse
    # path is float32, so it is at least as close to the reference as the dense autocast path
    assert_match(got, want, rtol=2e-2, atol_scale=2e-2)
    assert_match(dense_autocast, want, rtol=5e-2, atol_scale=5e-2)


def test_padding_gets_no_gradient():
    """A pair with value 0 is padding even where hidden_pre is positive there."""
    params = make_params()
    x = inputs((24,))
    pairs = select(x, params, True, "mutual_choice")
    drop = torch.arange(pairs.values.shape[0]) % 3 == 0  # a capacity cut, as Feature Choice pads
    padded = pairs._replace(values=torch.where(drop, torch.zeros_like(pairs.values), pairs.values))
    got = outputs_and_grads(sparse_step, x, params, padded, True)
    want = outputs_and_grads(dense_step, x, params, padded, True)
    assert_match(got, want, rtol=1e-10, atol_scale=1e-12)
    # and the same reconstruction and gradients as the step on the kept pairs alone
    keep = ~drop
    alone = ChoicePairs(pairs.token_idx[keep], pairs.latent_idx[keep], pairs.values[keep])
    r = torch.randn(24, D_IN, dtype=torch.float64)
    results = []
    for p in (padded, alone):
        sae_out, _ = sparse_step(x, params, p, True)
        results.append([sae_out, *torch.autograd.grad((sae_out * r).sum(), params)])
    for g, w in zip(*results):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert bool((got[1][drop] == 0).all())


@pytest.mark.parametrize("rescale", [False, True])
def test_empty_tokens_and_latents(rescale: bool):
    """First/last tokens and latents keep no pair; padding pairs sit on them."""
    params = make_params()
    n_tokens = 10
    x = inputs((n_tokens,))
    with torch.no_grad():
        hidden_pre = hidden_pre_of(x, params, rescale)
    # kept pairs: positive entries among tokens 1..N-2 and latents 1..F-2
    inner = torch.zeros_like(hidden_pre, dtype=torch.bool)
    inner[1:-1, 1:-1] = True
    token_idx, latent_idx = ((hidden_pre > 0) & inner).nonzero().unbind(1)
    token_idx, latent_idx = token_idx[::3], latent_idx[::3]
    # padding on the empty tokens and latents, first and last in the caller's order
    token_idx = torch.cat(
        [torch.tensor([0, n_tokens - 1]), token_idx, torch.tensor([n_tokens - 1, 0])]
    )
    latent_idx = torch.cat([torch.tensor([0, D_SAE - 1]), latent_idx, torch.tensor([0, D_SAE - 1])])
    values = hidden_pre[token_idx, latent_idx].clone()
    values[[0, 1, -2, -1]] = 0.0
    pairs = ChoicePairs(token_idx, latent_idx, values)
    got = outputs_and_grads(sparse_step, x, params, pairs, rescale)
    want = outputs_and_grads(dense_step, x, params, pairs, rescale)
    assert_match(got, want, rtol=1e-10, atol_scale=1e-12)
    b_dec = params[3].detach()
    assert torch.equal(got[0][0], b_dec) and torch.equal(got[0][-1], b_dec)
    # latents without a kept pair get no gradient, encoder or decoder
    assert bool((got[3][:, [0, -1]] == 0).all()) and bool((got[4][[0, -1]] == 0).all())
    assert bool((got[5][[0, -1]] == 0).all())


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("all_padding", [False, True], ids=["P=0", "all-padding"])
def test_no_pairs(rescale: bool, all_padding: bool):
    params = make_params()
    x = inputs((5,))
    n = 4 if all_padding else 0
    pairs = ChoicePairs(torch.arange(n), torch.arange(n), torch.zeros(n, dtype=torch.float64))
    got = outputs_and_grads(sparse_step, x, params, pairs, rescale)
    want = outputs_and_grads(dense_step, x, params, pairs, rescale)
    assert_match(got, want, rtol=1e-12, atol_scale=1e-12)
    torch.testing.assert_close(got[0], params[3].detach().expand(5, D_IN))
    assert bool((got[3] == 0).all()) and bool((got[4] == 0).all())


def test_pair_pre_acts_returns_values_and_needs_no_hidden_pre():
    """Nothing of size N x F is saved for backward: hidden_pre can be freed."""
    params = make_params(d_in=5, d_sae=97)
    W_enc, b_enc = params[0], params[1]
    x = torch.randn(13, 5, dtype=torch.float64)
    with torch.no_grad():
        pairs = mutual_choice_pairs(hidden_pre_of(x, params, True), 2)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, acts = sparse_step(x, params, pairs, True)
    assert saved and max(saved) < 13 * 97
    torch.testing.assert_close(acts, pairs.values, rtol=1e-15, atol=0)
    out.sum().backward()
    assert W_enc.grad is not None and b_enc.grad is not None


# ---------------------------------------------------------------------------
# the auxiliary loss
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("n_candidates", [2, 12, D_SAE], ids=["few", "some", "all"])
@pytest.mark.parametrize("method", ["pairs compact", "pairs masked", "candidate columns"])
def test_aux_loss_matches_saelens(rescale: bool, n_candidates: int, method: str):
    """SAELens's TopK aux loss (dense) from aux_topk_pairs decoded by sparse_encode_decode,
    and from aux_candidate_reconstruction."""
    params = make_params()
    W_enc, b_enc, W_dec, b_dec = params
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=3, rescale_acts_by_decoder_norm=rescale, dtype="float64"
        )
    )
    with torch.no_grad():
        for name, p in zip(("W_enc", "b_enc", "W_dec", "b_dec"), params):
            getattr(sae, name).copy_(p)
    x = inputs((16,))
    k_aux = D_IN // 2  # SAELens's heuristic
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(4))[:n_candidates]] = True
    sae_out = (x + 0.5 * torch.randn(x.shape, dtype=torch.float64)).detach()

    _, hidden_pre = sae.encode_with_hidden_pre(x)
    loss = sae.calculate_topk_aux_loss(x, sae_out, hidden_pre, mask)
    sae_params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    want = [loss, *torch.autograd.grad(loss, sae_params)]

    if method == "candidate columns":
        recons = aux_candidate_reconstruction(
            x - b_dec,
            W_enc,
            b_enc,
            W_dec,
            mask.nonzero().squeeze(1),
            k_aux,
            rescale_acts_by_decoder_norm=rescale,
        )
    else:
        with torch.no_grad():
            hidden_pre = hidden_pre_of(x, params, rescale)
            compact = method == "pairs compact"
            pairs, kept = aux_topk_pairs(hidden_pre, mask, k_aux, compact=compact)
        recons, _ = sparse_encode_decode(
            x - b_dec,
            W_enc,
            b_enc,
            W_dec,
            None,
            pairs,
            rescale_acts_by_decoder_norm=rescale,
            kept=kept,
        )
    scale = min(n_candidates / k_aux, 1.0)
    loss = scale * (recons - (x - sae_out)).pow(2).sum(-1).mean()
    got = [loss, *torch.autograd.grad(loss, params)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_aux_candidate_reconstruction_without_candidates():
    params = make_params()
    W_enc, b_enc, W_dec, b_dec = params
    x = inputs((2, 4))
    recons = aux_candidate_reconstruction(
        x - b_dec,
        W_enc,
        b_enc,
        W_dec,
        torch.zeros(0, dtype=torch.long),
        3,
        rescale_acts_by_decoder_norm=True,
    )
    assert recons.shape == (2, 4, D_IN) and bool((recons == 0).all())


def test_aux_topk_pairs_shapes():
    hidden_pre = torch.randn(7, D_SAE, dtype=torch.float64)
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[[2, 9, 30]] = True
    pairs, kept = aux_topk_pairs(hidden_pre, mask, 5, compact=True)
    assert pairs.values.shape == (7 * 3,) and bool(kept.all())  # min(k_aux, n_candidates)
    pairs, kept = aux_topk_pairs(hidden_pre, mask, 5, compact=False)
    assert pairs.values.shape == (7 * 5,) and int(kept.sum()) == 7 * 3
    assert bool((pairs.values[~kept] == 0).all())
    assert set(pairs.latent_idx[kept].tolist()) == {2, 9, 30}


# ---------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_pair_dot_matches_brute_force(dtype):
    """The CPU SDDMM (float32/64) and the blocked-gather fallback (bfloat16)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(9, 4, generator=gen).to(dtype)
    b = torch.randn(11, 4, generator=gen).to(dtype)
    rows = torch.tensor([0, 0, 2, 2, 2, 8, 8])
    cols = torch.tensor([3, 1, 10, 0, 3, 5, 5])  # unsorted and repeated within a row
    crow = torch.searchsorted(rows, torch.arange(10))
    got = pair_dot(a, b, rows, cols, crow)
    want = (a.double()[rows] * b.double()[cols]).sum(-1)
    tol = 1e-12 if dtype == torch.float64 else 3e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_pair_layout_groups():
    token_idx = torch.tensor([3, 0, 3, 1, 2, 0])
    latent_idx = torch.tensor([1, 4, 0, 1, 4, 2])
    kept = torch.tensor([True, True, False, True, True, True])
    lay = pair_layout(token_idx, latent_idx, kept, n_tokens=5, d_sae=6)
    # token 0: pairs 1, 5; token 1: 3; token 2: 4; token 3: 0; token 4: none; padding (2) last
    assert lay.token_order.tolist() == [1, 5, 3, 4, 0, 2]
    assert lay.token_crow.tolist() == [0, 2, 3, 4, 5, 6]
    assert lay.token_gather.tolist() == [4, 2, 1, 4, 1, 0]
    assert lay.token_rows.tolist() == [0, 0, 1, 2, 3, 4]
    # latent 1: pairs 0, 3; latent 2: 5; latent 4: 1, 4; padding last
    assert lay.latent_order.tolist() == [0, 3, 5, 1, 4, 2]
    assert lay.latent_crow.tolist() == [0, 0, 2, 3, 3, 5, 6]
    assert lay.latent_gather.tolist() == [3, 1, 0, 0, 2, 0]
    assert (lay.n_tokens, lay.d_sae, lay.n_pairs) == (5, 6, 6)


@settings(max_examples=40, deadline=None)
@given(
    n_tokens=st.integers(1, 9),
    d_sae=st.integers(1, 12),
    d=st.integers(1, 5),
    density=st.floats(0.0, 1.0),
    pad_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_pair_decode_property(n_tokens, d_sae, d, density, pad_frac, seed):
    """pair_decode = dense feature_acts @ W, outputs and gradients, for any pair set."""
    gen = torch.Generator().manual_seed(seed)
    n_pairs = round(density * n_tokens * d_sae)
    flat = torch.randperm(n_tokens * d_sae, generator=gen)[:n_pairs]
    token_idx, latent_idx = flat // d_sae, flat % d_sae
    kept = torch.rand(n_pairs, generator=gen) >= pad_frac
    coeffs = torch.randn(n_pairs, generator=gen, dtype=torch.float64).requires_grad_()
    W = torch.randn(d_sae, d, generator=gen, dtype=torch.float64).requires_grad_()
    r = torch.randn(n_tokens, d, generator=gen, dtype=torch.float64)

    lay = pair_layout(token_idx, latent_idx, kept, n_tokens, d_sae)
    out = pair_decode(coeffs, W, lay)
    got = [out, *torch.autograd.grad((out * r).sum(), [coeffs, W])]

    dense = torch.zeros(n_tokens, d_sae, dtype=torch.float64)
    dense = dense.index_put((token_idx, latent_idx), torch.where(kept, coeffs, 0.0))
    ref = dense @ W
    want = [ref, *torch.autograd.grad((ref * r).sum(), [coeffs, W])]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    n_tokens=st.integers(1, 8),
    d_sae=st.integers(1, 10),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    with_scale=st.booleans(),
)
def test_pair_pre_acts_property(n_tokens, d_sae, density, seed, with_scale):
    """pair_pre_acts' gradients = those of the dense hidden_pre gathered at the kept pairs."""
    gen = torch.Generator().manual_seed(seed)
    d_in = 3
    n_pairs = round(density * n_tokens * d_sae)
    flat = torch.randperm(n_tokens * d_sae, generator=gen)[:n_pairs]
    token_idx, latent_idx = flat // d_sae, flat % d_sae
    sae_in = torch.randn(n_tokens, d_in, generator=gen, dtype=torch.float64).requires_grad_()
    W_enc = torch.randn(d_in, d_sae, generator=gen, dtype=torch.float64).requires_grad_()
    b_enc = torch.randn(d_sae, generator=gen, dtype=torch.float64).requires_grad_()
    scale = (torch.rand(d_sae, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    r = torch.randn(n_pairs, generator=gen, dtype=torch.float64)
    leaves = [sae_in, W_enc, b_enc, scale]

    hidden_pre = sae_in @ W_enc + b_enc
    if with_scale:
        hidden_pre = hidden_pre * scale
    ref = hidden_pre[token_idx, latent_idx]
    kept = ref.detach() > 0  # relu: non-positive pairs are padding
    ref = torch.where(kept, ref, 0.0)
    want = [ref, *torch.autograd.grad((ref * r).sum(), leaves, allow_unused=True)]

    lay = pair_layout(token_idx, latent_idx, kept, n_tokens, d_sae)
    out = pair_pre_acts(
        sae_in, W_enc, b_enc, ref.detach(), lay, scale=scale if with_scale else None
    )
    got = [out, *torch.autograd.grad((out * r).sum(), leaves, allow_unused=True)]
    for g, w, leaf in zip(got, want, [ref, *leaves]):
        g = torch.zeros_like(leaf) if g is None else g
        w = torch.zeros_like(leaf) if w is None else w
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_sparse_feature_acts_matches_dense_and_trainer_statistics():
    """The COO feature_acts equals the dense one, and SAELens's trainer statistics agree."""
    params = make_params()
    x = inputs((3, 8))
    pairs = fc_zipf_pairs(hidden_pre_of(x, params, False).detach())
    dense = pairs_to_dense(pairs, hidden_pre_of(x, params, False)).detach()
    coo = sparse_feature_acts(pairs, None, dense.shape)
    assert coo.is_sparse and coo.shape == dense.shape
    torch.testing.assert_close(coo.to_dense(), dense)

    # the expressions of SAETrainer._train_step and build_train_step_log_dict
    def stats(feature_acts: torch.Tensor) -> list[torch.Tensor]:
        flat = feature_acts if feature_acts.ndim == 2 else None
        firing_feats = (flat if flat is not None else feature_acts).bool().float()
        did_fire = firing_feats.sum(-2).bool()
        if did_fire.is_sparse:
            did_fire = did_fire.to_dense()
        act_freq = torch.zeros(firing_feats.shape[-1]) + firing_feats.sum(0)
        l0 = feature_acts.bool().float().sum(-1).to_dense().mean()
        return [did_fire, act_freq, l0]

    coo2 = sparse_feature_acts(pairs, None, (24, D_SAE))
    for g, w in zip(stats(coo2), stats(dense.reshape(24, D_SAE))):
        torch.testing.assert_close(g.to_dense() if g.is_sparse else g, w)


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile(backend: str):
    torch._dynamo.reset()
    params = cast(make_params(), torch.float32)
    x = inputs((16,), torch.float32)
    pairs = select(x, params, True, "mutual_choice")

    def step(x, W_enc, b_enc, W_dec, b_dec, token_idx, latent_idx, values):
        sae_out, acts = sparse_encode_decode(
            x - b_dec,
            W_enc,
            b_enc,
            W_dec,
            b_dec,
            (token_idx, latent_idx, values),
            rescale_acts_by_decoder_norm=True,
        )
        return (sae_out - x).pow(2).sum(-1).mean() + acts.sum()

    def run(fn) -> list[torch.Tensor]:
        loss = fn(x, *params, *pairs)
        return [loss, *torch.autograd.grad(loss, params)]

    want = run(step)
    got = run(torch.compile(step, backend=backend))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_dense(rescale: bool, dtype: torch.dtype):
    params = make_params(device="cuda", dtype=dtype)
    x = inputs((24,), dtype).cuda()
    for rule in ("mutual_choice", "feature_choice_zipf"):
        pairs = select(x, params, rescale, rule)
        got = outputs_and_grads(sparse_step, x, params, pairs, rescale)
        want = outputs_and_grads(dense_step, x, params, pairs, rescale)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        assert_match(got, want, rtol=tol, atol_scale=tol)


@CUDA
@pytest.mark.parametrize("rescale", [False, True])
def test_cuda_autocast_and_aux(rescale: bool):
    params = make_params(dtype=torch.float32, device="cuda")
    x = inputs((24,), torch.float32).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        pairs = select(x, params, rescale, "mutual_choice")
        got = outputs_and_grads(sparse_step, x, params, pairs, rescale)
    want = outputs_and_grads(dense_step, x.double(), cast(params, torch.float64), pairs, rescale)
    assert_match(got, want, rtol=2e-2, atol_scale=2e-2)
    mask = torch.zeros(D_SAE, dtype=torch.bool, device="cuda")
    mask[:7] = True
    with torch.no_grad():
        aux, kept = aux_topk_pairs(hidden_pre_of(x, params, rescale), mask, 4)
    assert aux.values.shape == (24 * 4,) and kept.device.type == "cuda"
