"""Mutual Choice with a ``latent_floor``: a Feature Choice floor under Mutual Choice.

- the selection equals a brute-force one: each latent's ``floor`` largest
  entries, then the largest remaining entries up to round(k * N);
- the training SAE selects with ``floor(latent_floor * k * N / F)`` per latent;
- the saved JumpReLU holds one threshold per latent, exact on the recent
  training tokens for the training densities, which the metadata keeps so the
  saved SAE recalibrates and batch-encodes as it was trained;
- bad values are refused with the field's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, JumpReLUSAE

from sae_lens_choice import calibrate_thresholds, compute_thresholds, encode_batch
from sae_lens_choice.allocation import (
    batch_budget,
    floor_count,
    mutual_choice_pairs,
    pairs_to_dense,
)
from tests.helpers import l0, make_training_sae, sparse_activations, train, train_step

D_IN, D_SAE, K = 16, 64, 4


def brute_force(x: torch.Tensor, k: float, floor: int) -> torch.Tensor:
    """(N, F) bool: each column's ``floor`` largest, then the largest of the rest."""
    chosen = torch.zeros_like(x, dtype=torch.bool)
    order = x.argsort(dim=0, descending=True)
    for j in range(x.shape[1]):
        chosen[order[:floor, j], j] = True
    rest = batch_budget(k, x.shape[0]) - int(chosen.sum())
    flat = x.masked_fill(chosen, float("-inf")).reshape(-1)
    chosen.view(-1)[flat.argsort(descending=True)[:rest]] = True
    return chosen & (x > 0)  # a pair that is not positive never fires


@pytest.mark.parametrize("method", ["flat", "candidates"])
@pytest.mark.parametrize("floor", [0, 1, 3])
def test_floor_selection_equals_brute_force(method: str, floor: int) -> None:
    g = torch.Generator().manual_seed(floor)
    x = torch.randn(200, 40, generator=g, dtype=torch.float64)
    x[:, 0] = -x[:, 0].abs() - 1  # never positive: fires nowhere, floor or not
    x[:, 1] = -1.0
    x[7, 1] = 0.5  # one positive entry: fires there only
    x[:, 2] -= 3.0  # rare: Mutual Choice alone would starve it
    pairs = mutual_choice_pairs(x, 3.0, method=method, floor=floor, candidates_per_token=4)
    acts = pairs_to_dense(pairs, x)
    expected = brute_force(x, 3.0, floor)
    assert torch.equal(acts > 0, expected)
    torch.testing.assert_close(acts, torch.where(expected, x, torch.zeros(())))
    counts = (acts > 0).sum(0)
    positives = (x > 0).sum(0)
    assert bool((counts >= torch.minimum(positives, torch.tensor(floor))).all())
    if floor:
        plain = pairs_to_dense(mutual_choice_pairs(x, 3.0, method=method), x)
        assert int((plain[:, 2] > 0).sum()) < floor  # the floor is what keeps latent 2


def test_floor_beyond_the_budget_is_refused() -> None:
    x = torch.randn(100, 40)
    # T = 300 pairs cannot hold 8 per latent for 40 latents
    with pytest.raises(ValueError, match=r"= \[0, 7\] for 100 tokens"):
        mutual_choice_pairs(x, 3.0, floor=8)
    with pytest.raises(ValueError, match="floor"):
        mutual_choice_pairs(x, 3.0, floor=-1)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_latent_floor_out_of_range_is_refused_at_config_time(value: float) -> None:
    with pytest.raises(ValueError, match="latent_floor"):
        make_training_sae("mutual_choice", d_in=D_IN, d_sae=D_SAE, k=K, latent_floor=value)


def test_floor_count_fits_the_budget() -> None:
    assert floor_count(0.1, 16, 4096, 2304) == 2
    assert floor_count(0.1, 32, 4096, 2304) == 5
    for n in (1, 7, 100, 4096):
        for k in (1.0, 2.5, 16.0):
            # the whole uniform share rounded down never exceeds T
            assert floor_count(1.0, k, n, 48) * 48 <= batch_budget(k, n)


@pytest.mark.parametrize("step_implementation", ["dense", "sparse"])
def test_training_step_keeps_the_floor(step_implementation: str) -> None:
    sae = make_training_sae(
        "mutual_choice", d_in=D_IN, d_sae=D_SAE, k=K, latent_floor=0.5,
        step_implementation=step_implementation,
    )  # fmt: skip
    with torch.no_grad():
        sae.b_enc[:8] = -0.1  # latents Mutual Choice alone would starve
    x = sparse_activations(512, seed=3, d_in=D_IN)
    out = train_step(sae, x)
    acts = out.feature_acts.to_dense() if out.feature_acts.is_sparse else out.feature_acts
    floor = floor_count(0.5, K, 512, D_SAE)
    assert floor == 16
    with torch.no_grad():
        hidden_pre = sae.compute_hidden_pre(sae.process_sae_in(x))
    expected = brute_force(hidden_pre.double(), K, floor)
    assert torch.equal(acts.detach() > 0, expected)
    counts = (acts > 0).sum(0)
    positives = (hidden_pre > 0).sum(0)
    assert bool((counts >= positives.clamp(max=floor)).all())
    plain = mutual_choice_pairs(hidden_pre, K).latent_counts(D_SAE)
    assert bool((plain[:8] < floor).all()) and bool((counts[:8] >= floor).all())


def test_data_parallel_selection_with_a_floor_is_refused() -> None:
    sae = make_training_sae("mutual_choice", d_in=D_IN, d_sae=D_SAE, k=K, latent_floor=0.5)
    with pytest.raises(ValueError, match="latent_floor > 0 is not supported in data-parallel"):
        sae.select(torch.randn(64, D_SAE), rank_sizes=[64, 64])


def trained(n_steps: int = 30, **overrides: Any) -> Any:
    sae = make_training_sae(
        "mutual_choice", d_in=D_IN, d_sae=D_SAE, k=K, latent_floor=0.25,
        threshold_calibration_tokens=2048, **overrides,
    )  # fmt: skip
    batches = [sparse_activations(256, seed=i, d_in=D_IN) for i in range(n_steps)]
    return train(sae, batches, lr=3e-3)


def test_saved_floor_sae_has_per_latent_thresholds_for_the_training_densities(
    tmp_path: Path,
) -> None:
    sae = trained()
    densities = sae.training_densities()
    torch.testing.assert_close(densities.sum(), torch.tensor(float(K), dtype=torch.float64))
    torch.testing.assert_close(
        densities, sae.latent_density_ema.double() * K / sae.latent_density_ema.double().sum()
    )
    assert sae.threshold.shape == (D_SAE,)
    sae.save_inference_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert isinstance(loaded, JumpReLUSAE)
    assert loaded.cfg.metadata.latent_densities == pytest.approx(densities.tolist())
    assert loaded.cfg.metadata.training_architecture_details["latent_floor"] == 0.25
    # exact on the last 2048 training tokens: each latent fires on round(rho_j * N) of them
    recent = torch.cat([sparse_activations(256, seed=i, d_in=D_IN) for i in range(22, 30)])
    expected = compute_thresholds(sae, recent, show_progress=False)
    assert float(expected.std()) > 0  # one threshold per latent, not one global value
    torch.testing.assert_close(loaded.threshold.double(), expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        fired = (loaded.encode(recent) > 0).sum(0).double()
        positives = (sae.compute_hidden_pre(sae.process_sae_in(recent)) > 0).sum(0).double()
    target = torch.minimum((densities * recent.shape[0]).round(), positives)
    assert float((fired - target).abs().max()) <= 1
    # held out: the mean L0 is k
    held_out = sparse_activations(20_000, seed=10_000, d_in=D_IN)
    with torch.no_grad():
        mean_l0 = float(l0(loaded.encode(held_out)).mean())
    assert abs(mean_l0 - K) / K < 0.05, mean_l0


def test_saved_floor_sae_recalibrates_and_batch_encodes_from_its_metadata(
    tmp_path: Path,
) -> None:
    sae = trained(n_steps=12)
    sae.eval()
    sae.save_inference_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    held_out = sparse_activations(8192, seed=500, d_in=D_IN)
    calibrate_thresholds(loaded, held_out, show_progress=False)
    with torch.no_grad():
        fired = (loaded.encode(held_out) > 0).sum(0).double()
        positives = (sae.compute_hidden_pre(sae.process_sae_in(held_out)) > 0).sum(0).double()
    # each latent aims at its training density; one with fewer positive
    # pre-activations than that fires on all of them
    target = torch.minimum((sae.training_densities() * 8192).round(), positives)
    assert float((fired - target).abs().max()) <= 1
    # the training allocation, floor included, from the saved settings alone
    x = sparse_activations(300, seed=7, d_in=D_IN)
    with torch.no_grad():
        torch.testing.assert_close(encode_batch(loaded, x), sae.encode(x), rtol=1e-5, atol=1e-5)
        hidden_pre = sae.compute_hidden_pre(sae.process_sae_in(x))
    floor = floor_count(0.25, K, 300, D_SAE)
    assert floor == 4
    assert torch.equal(encode_batch(loaded, x) > 0, brute_force(hidden_pre.double(), K, floor))
