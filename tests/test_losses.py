"""``sae_lens_choice.losses``: aux_k / aux_zipf against SAELens's TopK aux loss.

The pure functions (``aux_topk``, ``aux_reconstruction_loss``) are glued the
way the training SAEs glue them (SAELens's ``act_times_W_dec`` and
``reshape_fn_out``) and compared with ``TopKTrainingSAE.calculate_topk_aux_loss``
on the same weights, values and gradients; then the training SAE's own glue
(its CPU path decodes the candidate latents only) is compared the same way.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig, act_times_W_dec

from sae_lens_choice.losses import (
    aux_candidate_mask,
    aux_reconstruction_loss,
    aux_topk,
    default_k_aux,
)
from sae_lens_choice.zipf import fit_zipf, underused_mask, zipf_mandelbrot_pmf
from tests.helpers import make_training_sae, randomize_weights, step_input

D_IN, D_SAE, K = 16, 64, 4  # k_aux = D_IN // 2 = 8


def topk_sae(rescale: bool, seed: int, **overrides: Any) -> TopKTrainingSAE:
    """A SAELens TopK training SAE with random weights and uneven decoder norms.

    SAELens initialises every decoder row to the same norm, which would make
    ``rescale_acts_by_decoder_norm`` a uniform scaling; random norms exercise it.
    """
    cfg = TopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale, **overrides
    )
    sae = TopKTrainingSAE(cfg)
    randomize_weights(sae, seed)
    return sae


def dead_mask(n_dead: int, seed: int) -> torch.Tensor:
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(seed + 100))[:n_dead]] = True
    return mask


def our_aux_loss(
    sae: TopKTrainingSAE,
    sae_in: torch.Tensor,
    sae_out: torch.Tensor,
    hidden_pre: torch.Tensor,
    candidate_mask: torch.Tensor,
    k_aux: int,
) -> torch.Tensor:
    """The pure functions glued as the training SAEs glue them (the dense path)."""
    values, indices = aux_topk(hidden_pre, candidate_mask, k_aux)  # (..., min(k_aux, F))
    aux_acts = torch.zeros_like(hidden_pre).scatter(-1, indices, values)  # (..., F)
    recons = act_times_W_dec(aux_acts, sae.W_dec, sae.cfg.rescale_acts_by_decoder_norm)
    recons = sae.reshape_fn_out(recons, sae.d_head)  # (..., d_in) or (..., heads, d_head)
    return aux_reconstruction_loss(
        recons, sae_in - sae_out, candidate_mask, k_aux, sae.cfg.aux_loss_coefficient
    )


def forward_leaves(sae: TopKTrainingSAE, sae_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_pre, sae_out) as leaves, so each implementation's gradient is read alone."""
    feature_acts, hidden_pre = sae.encode_with_hidden_pre(sae_in)
    sae_out = sae.decode(feature_acts)
    return hidden_pre.detach().requires_grad_(), sae_out.detach().requires_grad_()


def assert_same_value_and_grads(
    ours: torch.Tensor, expected: torch.Tensor, wrt: list[torch.Tensor]
) -> None:
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    assert float(expected.detach()) > 0  # not vacuous
    our_grads = torch.autograd.grad(ours, wrt, retain_graph=True)
    expected_grads = torch.autograd.grad(expected, wrt, retain_graph=True)
    for got, want in zip(our_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rescale", [True, False])
# fewer dead than k_aux = 8 (the loss is scaled down, top-k over all dead);
# more than k_aux (scale 1, top-8 of the dead)
@pytest.mark.parametrize("n_dead", [3, 20])
@pytest.mark.parametrize("lead_shape", [(32,), (4, 8)])
def test_aux_loss_equals_sae_lens_topk_aux_loss(
    rescale: bool, n_dead: int, lead_shape: tuple[int, ...]
) -> None:
    sae = topk_sae(rescale, seed=n_dead)
    sae_in = torch.randn(*lead_shape, D_IN, generator=torch.Generator().manual_seed(7))
    hidden_pre, sae_out = forward_leaves(sae, sae_in)
    dead = dead_mask(n_dead, seed=n_dead)

    expected = sae.calculate_topk_aux_loss(sae_in, sae_out, hidden_pre, dead)
    ours = our_aux_loss(sae, sae_in, sae_out, hidden_pre, dead, default_k_aux(D_IN))
    assert_same_value_and_grads(ours, expected, [hidden_pre, sae.W_dec])
    # The residual is a target, not a path: nothing flows into sae_out.
    assert torch.autograd.grad(ours, sae_out, allow_unused=True)[0] is None


def test_aux_loss_equals_sae_lens_with_hook_z_reshaping() -> None:
    # hook_z SAEs take (N, n_heads, d_head) and SAELens reshapes the aux
    # reconstruction back with reshape_fn_out, as the training SAEs now do.
    # SAELens takes k_aux from the last input dimension (d_head // 2 = 2 here).
    sae = topk_sae(True, seed=1, reshape_activations="hook_z")
    sae.turn_on_forward_pass_hook_z_reshaping()  # training mode turns it off
    sae_in = torch.randn(32, 4, D_IN // 4, generator=torch.Generator().manual_seed(8))
    hidden_pre, sae_out = forward_leaves(sae, sae_in)
    assert sae_out.shape == (32, 4, 4) and hidden_pre.shape == (32, D_SAE)
    dead = dead_mask(20, seed=1)

    expected = sae.calculate_topk_aux_loss(sae_in, sae_out, hidden_pre, dead)
    ours = our_aux_loss(sae, sae_in, sae_out, hidden_pre, dead, k_aux=sae_in.shape[-1] // 2)
    assert_same_value_and_grads(ours, expected, [hidden_pre, sae.W_dec])


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("n_dead", [0, 3, 20])
def test_training_sae_aux_k_equals_sae_lens_topk_aux_loss(
    arch: str, rescale: bool, n_dead: int
) -> None:
    # The training SAE's own glue, whose CPU path decodes only the candidate
    # latents, on the weights of a SAELens TopK SAE.
    topk = topk_sae(rescale, seed=n_dead)
    ours_sae = make_training_sae(
        arch, d_in=D_IN, d_sae=D_SAE, k=K, aux_loss="aux_k", rescale_acts_by_decoder_norm=rescale
    )
    ours_sae.load_state_dict(topk.state_dict(), strict=False)
    sae_in = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(9))
    hidden_pre, sae_out = forward_leaves(topk, sae_in)
    dead = dead_mask(n_dead, seed=n_dead)

    expected = topk.calculate_topk_aux_loss(sae_in, sae_out, hidden_pre, dead)
    losses = ours_sae.calculate_aux_loss(
        step_input=step_input(ours_sae, sae_in, dead_neuron_mask=dead),
        feature_acts=torch.zeros_like(hidden_pre),
        hidden_pre=hidden_pre,
        sae_out=sae_out,
    )
    ours = losses["auxiliary_reconstruction_loss"]
    if n_dead == 0:
        # SAELens returns a constant 0; ours is 0 and moves nothing.
        assert float(ours.detach()) == 0.0 == float(expected)
        return
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    assert float(expected.detach()) > 0
    our_grads = torch.autograd.grad(ours, [hidden_pre, ours_sae.W_dec])
    expected_grads = torch.autograd.grad(expected, [hidden_pre, topk.W_dec])
    for got, want in zip(our_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_aux_topk_hand_worked() -> None:
    # Latents 1 and 3 of 4 are candidates. Token 0 pre-activations (5, 2, 9, -1):
    # the candidates hold 2 and -1 (raw values, not relu'd, as SAELens takes
    # them). With k_aux = 3 > 2 candidates the third slot falls on a
    # non-candidate and carries 0, so it reconstructs nothing.
    hidden_pre = torch.tensor([[5.0, 2.0, 9.0, -1.0]])
    mask = torch.tensor([False, True, False, True])
    values, indices = aux_topk(hidden_pre, mask, 3)
    assert values.shape == indices.shape == (1, 3)
    got = torch.zeros_like(hidden_pre).scatter(-1, indices, values)
    assert got.tolist() == [[0.0, 2.0, 0.0, -1.0]]
    # k_aux = 1: the best candidate only; k_aux beyond F: width F
    values, indices = aux_topk(hidden_pre, mask, 1)
    assert (values.tolist(), indices.tolist()) == ([[2.0]], [[1]])
    assert aux_topk(hidden_pre, mask, 10)[0].shape == (1, 4)


def test_aux_loss_hand_worked() -> None:
    # d_in = 2 -> k_aux = 1. Three latents, latents 1 and 2 candidates:
    # scale = min(2 / 1, 1) = 1. The single best candidate per token:
    #   token 0: hidden_pre (5, 2, -1) -> latent 1 with 2
    #   token 1: hidden_pre (0, -3, 4) -> latent 2 with 4
    # W_dec rows: latent 1 -> (1, 0), latent 2 -> (0, 0.5): recons (2, 0) and (0, 2).
    # Residual x - x_hat = (2, 1) and (0, 0): squared errors 1 and 4, mean 2.5.
    hidden_pre = torch.tensor([[5.0, 2.0, -1.0], [0.0, -3.0, 4.0]])
    W_dec = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 0.5]])
    residual = torch.tensor([[3.0, 1.0], [1.0, 1.0]]) - torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    mask = torch.tensor([False, True, True])

    def loss(k_aux: int, coefficient: float = 1.0) -> torch.Tensor:
        values, indices = aux_topk(hidden_pre, mask, k_aux)
        recons = torch.zeros_like(hidden_pre).scatter(-1, indices, values) @ W_dec
        return aux_reconstruction_loss(recons, residual, mask, k_aux, coefficient)

    torch.testing.assert_close(loss(1), torch.tensor(2.5))
    # coefficient multiplies; with k_aux = 4 > 2 candidates the scale is 2 / 4 and both
    # candidates are used: recons (2*1 + (-1)*0, 0.5*(-1)) = (2, -0.5) and (-3, 2).
    # Squared errors (0 + 1.5^2) = 2.25 and (3^2 + 2^2) = 13: mean 7.625, times 0.5 * 2.
    torch.testing.assert_close(loss(4, coefficient=2.0), torch.tensor(7.625))


def test_aux_loss_without_candidates_is_zero_with_zero_gradients() -> None:
    hidden_pre = torch.randn(5, D_SAE, requires_grad=True)
    W_dec = torch.randn(D_SAE, D_IN, requires_grad=True)
    none = torch.zeros(D_SAE, dtype=torch.bool)
    values, indices = aux_topk(hidden_pre, none, 8)
    assert bool((values == 0).all())
    recons = torch.zeros_like(hidden_pre).scatter(-1, indices, values) @ W_dec
    loss = aux_reconstruction_loss(recons, torch.randn(5, D_IN), none, 8)
    assert float(loss.detach()) == 0.0
    for grad in torch.autograd.grad(loss, [hidden_pre, W_dec]):
        assert bool((grad == 0).all())


def test_aux_topk_rejects_mask_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"candidate_mask must have shape \(64,\)"):
        aux_topk(torch.randn(5, D_SAE), torch.ones(D_SAE - 1, dtype=torch.bool), 8)


def test_default_k_aux() -> None:
    assert default_k_aux(16) == 8
    assert default_k_aux(17) == 8
    assert default_k_aux(1) == 1  # never 0, which would divide by zero in the scale


# ---------------------------------------------------------------------------
# aux_zipf candidate set
# ---------------------------------------------------------------------------


def densities_with_dead() -> tuple[torch.Tensor, torch.Tensor]:
    d = zipf_mandelbrot_pmf(D_SAE, 1.0, 2.0) * 8
    d[-5:] *= 0.01  # five latents far below the law
    d[3] = 0.0  # and one dead
    return d, d == 0


def test_aux_candidate_mask_gamma_zero_is_the_dead_mask() -> None:
    d, dead = densities_with_dead()
    fit = fit_zipf(d, (1, 40))
    assert aux_candidate_mask(dead, d, fit, gamma=0.0) is dead
    assert aux_candidate_mask(dead, None, fit, gamma=0.5) is dead
    assert aux_candidate_mask(dead, d, None, gamma=0.5) is dead
    assert aux_candidate_mask(None, d, fit, gamma=0.0) is None


def test_aux_candidate_mask_is_dead_union_underused() -> None:
    d, dead = densities_with_dead()
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
    # At gamma = 0, aux_zipf is aux_k exactly: value and gradients.
    sae = topk_sae(rescale=True, seed=3)
    sae_in = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(3))
    hidden_pre, sae_out = forward_leaves(sae, sae_in)
    d, _ = densities_with_dead()
    dead = dead_mask(12, seed=3)
    mask = aux_candidate_mask(dead, d, fit_zipf(d), gamma=0.0)
    assert mask is not None
    ours = our_aux_loss(sae, sae_in, sae_out, hidden_pre, mask, default_k_aux(D_IN))
    expected = sae.calculate_topk_aux_loss(sae_in, sae_out, hidden_pre, dead)
    assert_same_value_and_grads(ours, expected, [hidden_pre, sae.W_dec])
    # gamma > 0 adds under-used latents: a different, larger candidate set
    wider = aux_candidate_mask(dead, d, fit_zipf(d), gamma=0.5)
    assert wider is not None and int(wider.sum()) > int(dead.sum())
