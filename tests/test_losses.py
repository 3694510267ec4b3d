"""Tests for ``sae_lens_choice.losses``: aux_k / aux_zipf against SAELens's TopK aux loss."""

from __future__ import annotations

import pytest
import torch
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from sae_lens_choice.losses import aux_candidate_mask, aux_reconstruction_loss, default_k_aux
from sae_lens_choice.zipf import fit_zipf, underused_mask, zipf_mandelbrot_pmf

D_IN, D_SAE, K = 16, 64, 4  # k_aux = D_IN // 2 = 8


def _random_topk_sae(rescale: bool, seed: int) -> TopKTrainingSAE:
    """A SAELens TopK training SAE with random weights and uneven decoder norms.

    SAELens initialises every decoder row to the same norm, which would make
    ``rescale_acts_by_decoder_norm`` a uniform scaling; random norms exercise it.
    """
    cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale)
    sae = TopKTrainingSAE(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=gen) / D_IN**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=gen))
        row_norms = torch.rand(D_SAE, 1, generator=gen) * 2 + 0.1
        w_dec = torch.randn(D_SAE, D_IN, generator=gen)
        sae.W_dec.copy_(w_dec / w_dec.norm(dim=-1, keepdim=True) * row_norms)
        sae.b_dec.copy_(0.1 * torch.randn(D_IN, generator=gen))
    return sae


def _dead_mask(n_dead: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 100)
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[torch.randperm(D_SAE, generator=gen)[:n_dead]] = True
    return mask


@pytest.mark.parametrize("rescale", [True, False])
# 0 dead; fewer than k_aux = 8 (the loss is scaled down, top-k over all dead);
# more than k_aux (scale 1, top-8 of the dead)
@pytest.mark.parametrize("n_dead", [0, 3, 20])
@pytest.mark.parametrize("lead_shape", [(32,), (4, 8)])
def test_aux_loss_equals_sae_lens_topk_aux_loss(
    rescale: bool, n_dead: int, lead_shape: tuple[int, ...]
) -> None:
    sae = _random_topk_sae(rescale, seed=n_dead)
    gen = torch.Generator().manual_seed(7)
    sae_in = torch.randn(*lead_shape, D_IN, generator=gen)
    feature_acts, hidden_pre = sae.encode_with_hidden_pre(sae_in)
    sae_out = sae.decode(feature_acts)
    # Leaf copies so each implementation's gradient can be read separately.
    hidden_pre = hidden_pre.detach().requires_grad_()
    sae_out = sae_out.detach().requires_grad_()
    dead = _dead_mask(n_dead, seed=n_dead)

    expected = sae.calculate_topk_aux_loss(
        sae_in=sae_in, sae_out=sae_out, hidden_pre=hidden_pre, dead_neuron_mask=dead
    )
    ours = aux_reconstruction_loss(
        sae_in,
        sae_out,
        hidden_pre,
        dead,
        sae.W_dec,
        rescale_acts_by_decoder_norm=rescale,
        coefficient=sae.cfg.aux_loss_coefficient,
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    if n_dead == 0:
        # SAELens returns a constant 0 with no graph; ours is 0 with zero gradients.
        assert float(ours.detach()) == 0.0
        grads = torch.autograd.grad(ours, [hidden_pre, sae.W_dec], allow_unused=True)
        assert all(g is None or bool((g == 0).all()) for g in grads)
        return
    assert float(expected.detach()) > 0
    expected_grads = torch.autograd.grad(expected, [hidden_pre, sae.W_dec])
    our_grads = torch.autograd.grad(ours, [hidden_pre, sae.W_dec])
    for got, want in zip(our_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # The residual is a target, not a path: nothing flows into sae_out.
    assert torch.autograd.grad(ours, sae_out, allow_unused=True)[0] is None


def test_aux_loss_hand_worked() -> None:
    # d_in = 2 -> k_aux = 1. Three latents, latent 1 and 2 dead (2 candidates):
    # scale = min(2 / 1, 1) = 1. The single best candidate per token:
    #   token 0: hidden_pre (5, 2, -1) -> latent 1 with 2
    #   token 1: hidden_pre (0, -3, 4) -> latent 2 with 4
    # W_dec rows: latent 1 -> (1, 0), latent 2 -> (0, 0.5): recons (2, 0) and (0, 2).
    # Residual x - x_hat = (2, 1) and (0, 0): squared errors 1 and 4, mean 2.5.
    hidden_pre = torch.tensor([[5.0, 2.0, -1.0], [0.0, -3.0, 4.0]])
    W_dec = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 0.5]])
    sae_in = torch.tensor([[3.0, 1.0], [1.0, 1.0]])
    sae_out = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    mask = torch.tensor([False, True, True])
    loss = aux_reconstruction_loss(sae_in, sae_out, hidden_pre, mask, W_dec)
    torch.testing.assert_close(loss, torch.tensor(2.5))
    # coefficient multiplies; with k_aux = 4 > 2 candidates the scale is 2 / 4 and both
    # candidates are used: recons (2*1 + (-1)*0, 0.5*(-1)) = (2, -0.5) and (-3, 2).
    # Squared errors (0 + 1.5^2) = 2.25 and (3^2 + 2^2) = 13: mean 7.625, times 0.5 * 2.
    loss = aux_reconstruction_loss(
        sae_in, sae_out, hidden_pre, mask, W_dec, k_aux=4, coefficient=2.0
    )
    torch.testing.assert_close(loss, torch.tensor(7.625))


def test_aux_loss_without_candidates_is_zero() -> None:
    hidden_pre = torch.randn(5, D_SAE)
    sae_in, sae_out = torch.randn(5, D_IN), torch.randn(5, D_IN)
    W_dec = torch.randn(D_SAE, D_IN)
    assert float(aux_reconstruction_loss(sae_in, sae_out, hidden_pre, None, W_dec)) == 0.0
    none = torch.zeros(D_SAE, dtype=torch.bool)
    assert float(aux_reconstruction_loss(sae_in, sae_out, hidden_pre, none, W_dec)) == 0.0


def test_aux_loss_rejects_mask_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"candidate_mask must have shape \(64,\)"):
        aux_reconstruction_loss(
            torch.randn(5, D_IN),
            torch.randn(5, D_IN),
            torch.randn(5, D_SAE),
            torch.ones(D_SAE - 1, dtype=torch.bool),
            torch.randn(D_SAE, D_IN),
        )


def test_default_k_aux() -> None:
    assert default_k_aux(16) == 8
    assert default_k_aux(17) == 8
    assert default_k_aux(1) == 1  # never 0, which would divide by zero in the scale


# ---------------------------------------------------------------------------
# aux_zipf candidate set
# ---------------------------------------------------------------------------


def _densities_with_dead() -> tuple[torch.Tensor, torch.Tensor]:
    d = zipf_mandelbrot_pmf(D_SAE, 1.0, 2.0) * 8
    d[-5:] *= 0.01  # five latents far below the law
    d[3] = 0.0  # and one dead
    dead = d == 0
    return d, dead


def test_aux_candidate_mask_gamma_zero_is_the_dead_mask() -> None:
    d, dead = _densities_with_dead()
    fit = fit_zipf(d, (1, 40))
    assert aux_candidate_mask(dead, d, fit, gamma=0.0) is dead
    assert aux_candidate_mask(dead, None, fit, gamma=0.5) is dead
    assert aux_candidate_mask(dead, d, None, gamma=0.5) is dead
    assert aux_candidate_mask(None, d, fit, gamma=0.0) is None


def test_aux_candidate_mask_is_dead_union_underused() -> None:
    d, dead = _densities_with_dead()
    fit = fit_zipf(d, (1, 40))
    under = underused_mask(d, fit, 0.5)
    assert int(under.sum()) >= 5
    union = aux_candidate_mask(dead, d, fit, gamma=0.5)
    assert union is not None
    assert torch.equal(union, dead | under)
    assert bool(union[-5:].all())
    # A dead latent stays a candidate even if a (stale) density says otherwise.
    stale_dead = torch.zeros(D_SAE, dtype=torch.bool)
    stale_dead[0] = True
    union = aux_candidate_mask(stale_dead, d, fit, gamma=0.5)
    assert union is not None
    assert bool(union[0])
    assert torch.equal(union, stale_dead | under)
    # Without a dead mask the candidates are the under-used latents alone.
    only_under = aux_candidate_mask(None, d, fit, gamma=0.5)
    assert only_under is not None
    assert torch.equal(only_under, under)


def test_aux_zipf_loss_with_gamma_zero_equals_aux_k() -> None:
    # The DESIGN section 4 contract: at gamma = 0, aux_zipf is aux_k exactly.
    sae = _random_topk_sae(rescale=True, seed=3)
    sae_in = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(3))
    feature_acts, hidden_pre = sae.encode_with_hidden_pre(sae_in)
    sae_out = sae.decode(feature_acts)
    d, _ = _densities_with_dead()
    dead = _dead_mask(12, seed=3)
    mask = aux_candidate_mask(dead, d, fit_zipf(d), gamma=0.0)
    ours = aux_reconstruction_loss(
        sae_in, sae_out, hidden_pre, mask, sae.W_dec, rescale_acts_by_decoder_norm=True
    )
    expected = sae.calculate_topk_aux_loss(sae_in, sae_out, hidden_pre, dead)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
