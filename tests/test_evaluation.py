"""``sae_lens_choice.evaluation``: hand-worked examples and a brute-force reference."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import make_training_sae, randomize_weights, sparse_activations
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.synthetic import feature_uniqueness, mean_correlation_coefficient

from sae_lens_choice.evaluation import MIN_ZIPF_POINTS, evaluate_sae
from sae_lens_choice.zipf import fit_rank_window, fit_zipf, underused_mask

# ---------------------------------------------------------------------------
# a hand-worked example: d_in 2, d_sae 4, five tokens, codes given per token
# ---------------------------------------------------------------------------

# Decoder rows e0 = (1, 0), e1 = (0, 1), e2 = (1, 1), e3 = (1, -1); b_dec = 0.
W_DEC = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]
# token -> code; reconstruction code @ W_DEC, squared error, L0
CODES = {
    (1.0, 0.0): (1.0, 0.0, 0.0, 0.0),  # recon (1, 0): error 0,             L0 1
    (0.0, 2.0): (0.0, 2.0, 0.0, 0.0),  # recon (0, 2): error 0,             L0 1
    (2.0, 2.0): (0.0, 0.0, 2.0, 0.0),  # recon (2, 2): error 0,             L0 1
    (1.0, 2.0): (1.0, 1.0, 0.0, 0.0),  # recon (1, 1): error 0^2 + 1^2 = 1, L0 2
    (1.0, 1.5): (0.0, 0.0, 0.0, 0.0),  # recon (0, 0): 1^2 + 1.5^2 = 3.25,  L0 0
}
TOKENS = torch.tensor(list(CODES), dtype=torch.float64)  # (5, 2)


def lookup_encode(x: torch.Tensor) -> torch.Tensor:
    """The code of each row of ``x`` from :data:`CODES`."""
    return torch.tensor([CODES[tuple(row)] for row in x.tolist()], dtype=x.dtype)


def hand_sae() -> JumpReLUSAE:
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=2, d_sae=4, dtype="float64"))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor(W_DEC, dtype=torch.float64))
        sae.b_dec.zero_()
    return sae


@pytest.mark.parametrize("split", [[5], [3, 2], [1, 1, 1, 1, 1]])
def test_hand_worked_example(split: list[int]) -> None:
    # the same numbers whatever the batching: the moments are merged exactly
    batches = list(TOKENS.split(split))
    result = evaluate_sae(hand_sae(), batches, encode=lookup_encode)

    assert result.n_tokens == 5 and result.d_sae == 4
    # sum of squared errors: 0 + 0 + 0 + 1 + 3.25 = 4.25.
    # mean(x) = ((1+0+2+1+1)/5, (0+2+2+2+1.5)/5) = (1, 1.5); squared deviations:
    # (0,-1.5) 2.25 + (-1,0.5) 1.25 + (1,0.5) 1.25 + (0,0.5) 0.25 + (0,0) 0 = 5.
    assert result.nmse == pytest.approx(4.25 / 5.0, abs=1e-12)  # 0.85
    assert result.explained_variance == pytest.approx(0.15, abs=1e-12)
    # L0 = [1, 1, 1, 2, 0]: mean 1; deviations 0,0,0,1,-1 -> variance 2 / (5 - 1) = 0.5
    assert result.l0_mean == 1.0
    assert result.l0_std == pytest.approx(math.sqrt(0.5), abs=1e-12)
    assert (result.l0_min, result.l0_max) == (0, 2)
    assert result.frac_tokens_zero_l0 == pytest.approx(1 / 5)
    assert result.l0_histogram.tolist() == [1, 3, 1, 0, 0]  # L0 = 0, 1, 2, 3, 4
    # latent 0 fires on tokens 1 and 4, latent 1 on 2 and 4, latent 2 on 3, latent 3 never
    assert result.densities.tolist() == pytest.approx([0.4, 0.4, 0.2, 0.0])
    assert result.dead_latents == 1
    # corr(L0, ||x||): norms 1, 2, sqrt(8), sqrt(5), sqrt(3.25)
    norms = TOKENS.norm(dim=-1)
    l0 = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.0], dtype=torch.float64)
    expected = float(torch.corrcoef(torch.stack([l0, norms]))[0, 1])
    assert result.l0_norm_corr == pytest.approx(expected, abs=1e-12)
    assert result.mcc is None and result.uniqueness is None


def test_hand_worked_zipf_fit_and_underuse() -> None:
    result = evaluate_sae(hand_sae(), TOKENS, encode=lookup_encode)
    # d_sae 4: ranks int(0.01 * 4) + 1 = 1 to int(0.9 * 4) = 3; 3 live latents there
    assert result.zipf_rank_window == (1, 3) == fit_rank_window(4)
    assert result.zipf_window is not None and result.zipf_all_ranks is not None
    expected = fit_zipf(torch.tensor([0.4, 0.4, 0.2, 0.0], dtype=torch.float64), (1, 3))
    assert result.zipf_window.to_dict() == pytest.approx(expected.to_dict())
    assert float(result.zipf_window.n_points) == 3  # the dead latent is left out
    # the dead latent is always under-used; the live ones lie on or near the fit
    mask = underused_mask(result.densities, result.zipf_window, 0.5)
    assert result.underused_latents == int(mask.sum()) >= 1
    assert bool(mask[3])


def test_too_few_live_latents_gives_no_fit() -> None:
    # only latent 0 ever fires: one live rank, fewer than MIN_ZIPF_POINTS
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    result = evaluate_sae(hand_sae(), x, encode=lambda t: torch.nn.functional.pad(t[:, :1], (0, 3)))
    assert MIN_ZIPF_POINTS > 1
    assert result.zipf_window is None and result.zipf_all_ranks is None
    assert result.dead_latents == 3
    assert result.underused_latents == 3  # with no fit: the dead latents
    assert result.to_dict()["zipf_window"] is None


def test_constant_l0_has_undefined_correlation() -> None:
    # TopK: every token has exactly k latents, so corr(L0, ||x||) is undefined
    sae = TopKSAE(TopKSAEConfig(d_in=16, d_sae=32, k=3))
    randomize_weights(sae, seed=1, b_enc=1.0)  # positive pre-activations: exactly k fire
    result = evaluate_sae(sae, sparse_activations(64, seed=2))
    assert result.l0_histogram[3] == 64 and result.l0_std == 0.0
    assert math.isnan(result.l0_norm_corr)


# ---------------------------------------------------------------------------
# brute force: everything at once, straight from the definitions
# ---------------------------------------------------------------------------


def jumprelu_sae(seed: int, dtype: str = "float32") -> JumpReLUSAE:
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=16, d_sae=48, dtype=dtype))
    randomize_weights(sae, seed)
    threshold: torch.Tensor = sae.threshold  # type: ignore[assignment]
    with torch.no_grad():
        threshold.copy_(0.2 + 0.3 * torch.rand(48, generator=torch.Generator().manual_seed(seed)))
    return sae


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matches_brute_force(dtype: str) -> None:
    sae = jumprelu_sae(seed=3, dtype=dtype)
    # a large mean: the NMSE denominator must not cancel it away
    x = sparse_activations(300, seed=4, scale=2.0) + 50.0
    batches = list(x.split([7, 100, 1, 92, 100]))
    truth = torch.randn(20, 16, generator=torch.Generator().manual_seed(5))
    result = evaluate_sae(sae, batches, feature_vectors=truth)

    with torch.no_grad():
        acts = sae.encode(x).to(torch.float64)  # (300, 48), all tokens at once
        recon = sae.decode(sae.encode(x)).to(torch.float64)
    x64 = x.to(torch.float64)
    nmse = float((recon - x64).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())
    l0 = (acts != 0).sum(-1).to(torch.float64)
    densities = (acts != 0).to(torch.float64).mean(0)
    fit_window = fit_zipf(densities, fit_rank_window(48))

    tol = 1e-5 if dtype == "float32" else 1e-12
    assert result.nmse == pytest.approx(nmse, rel=tol)
    assert result.explained_variance == pytest.approx(1 - nmse, rel=tol)
    assert result.l0_mean == pytest.approx(float(l0.mean()), abs=1e-12)
    assert result.l0_std == pytest.approx(float(l0.std()), abs=1e-12)
    assert (result.l0_min, result.l0_max) == (int(l0.min()), int(l0.max()))
    assert result.frac_tokens_zero_l0 == float((l0 == 0).to(torch.float64).mean())
    torch.testing.assert_close(result.densities, densities, rtol=0, atol=1e-15)
    assert result.dead_latents == int((densities == 0).sum())
    norms = x64.norm(dim=-1)
    corr = float(torch.corrcoef(torch.stack([l0, norms]))[0, 1])
    assert result.l0_norm_corr == pytest.approx(corr, abs=1e-9)
    assert result.zipf_window is not None and result.zipf_all_ranks is not None
    assert result.zipf_window.to_dict() == pytest.approx(fit_window.to_dict())
    assert result.zipf_all_ranks.to_dict() == pytest.approx(fit_zipf(densities).to_dict())
    assert result.underused_latents == int(underused_mask(densities, fit_window, 0.5).sum())
    decoder = sae.W_dec.detach().float()
    assert result.mcc == pytest.approx(mean_correlation_coefficient(decoder, truth))
    assert result.uniqueness == pytest.approx(feature_uniqueness(decoder, truth))
    # the run is not trivial: some tokens and latents fire, some do not
    assert 0 < result.l0_mean < 48 and result.l0_std > 0


def test_one_tensor_is_cut_into_batches() -> None:
    sae = jumprelu_sae(seed=6)
    x = sparse_activations(100, seed=7)
    whole = evaluate_sae(sae, x, batch_size=30)
    listed = evaluate_sae(sae, list(x.split(30)))
    # the same batches in the same order: the same numbers to the bit
    assert whole.to_dict(include_tensors=True) == listed.to_dict(include_tensors=True)
    assert whole.n_tokens == 100


def test_encode_callable_and_training_sae() -> None:
    # a training SAE in batch mode (its own encode) against a per-token callable:
    # the same decoder, different codes
    sae = make_training_sae("mutual_choice", d_in=16, d_sae=64, k=4)
    randomize_weights(sae, seed=8, b_enc=1.0)  # every pre-activation positive
    sae.train()
    x = sparse_activations(128, seed=9)
    batch_mode = evaluate_sae(sae, x, batch_size=64)
    # the batch keeps round(4 * 64) = 256 pairs of its 64 tokens: mean L0 exactly 4
    assert batch_mode.l0_mean == 4.0 and batch_mode.l0_std > 0
    assert sae.training  # the mode is restored
    first_latent = evaluate_sae(
        sae, x, encode=lambda t: torch.nn.functional.pad(sae.encode(t)[:, :1], (0, 63))
    )
    assert first_latent.l0_max <= 1 and first_latent.dead_latents >= 63


def test_to_dict_is_json() -> None:
    result = evaluate_sae(hand_sae(), TOKENS, encode=lookup_encode)
    plain = result.to_dict()
    assert "densities" not in plain and "l0_histogram" not in plain
    assert plain["zipf_rank_window"] == [1, 3]
    assert set(plain["zipf_window"]) == {"alpha", "beta", "log_C", "r2", "n_points"}
    text = json.dumps(result.to_dict(include_tensors=True))
    assert json.loads(text)["l0_histogram"] == [1, 3, 1, 0, 0]


def test_bad_input() -> None:
    sae = hand_sae()
    with pytest.raises(ValueError, match="no tokens"):
        evaluate_sae(sae, [])
    with pytest.raises(ValueError, match="d_sae=4"):
        evaluate_sae(sae, TOKENS, encode=lambda t: t)  # (5, 2) codes
    with pytest.raises(ValueError, match="underuse_ratio"):
        evaluate_sae(sae, TOKENS, underuse_ratio=2.0)
    with pytest.raises(ValueError, match="rank window"):
        evaluate_sae(sae, TOKENS, rank_window=(0.9, 0.1))
