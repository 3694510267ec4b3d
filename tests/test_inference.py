"""Inference SAEs (threshold and batch modes), calibration, folding, loading errors.

Also runs the inference SAEs through SAELens's own consumers: HookedSAETransformer
and run_evals, on a tiny random transformer and a local token dataset.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import load_file, save_file

from sae_lens_choice import (
    FeatureChoiceSAE,
    FeatureChoiceSAEConfig,
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceSAE,
    MutualChoiceSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    calibrate_thresholds,
)
from sae_lens_choice.calibration import target_densities
from sae_lens_choice.inference import choice_hidden_pre, jumprelu

D_IN = 16
D_SAE = 64
HOOK = "blocks.0.hook_resid_post"

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def sparse_activations(n_tokens: int, seed: int, d_in: int = D_IN) -> torch.Tensor:
    """Synthetic activations: sparse non-negative codes over a fixed random
    dictionary plus a little noise. The dictionary is the same for every seed,
    so different seeds are held-out samples of one distribution."""
    dictionary = torch.randn(128, d_in, generator=torch.Generator().manual_seed(1234))
    dictionary = dictionary / dictionary.norm(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(n_tokens, 128, generator=g) < 0.05
    magnitude = torch.empty(n_tokens, 128).exponential_(1.0, generator=g)
    noise = 0.05 * torch.randn(n_tokens, d_in, generator=g)
    return (active * magnitude) @ dictionary + noise


def make_sae(
    arch: str,
    *,
    k: float = 4,
    rescale: bool = False,
    capacity: str = "uniform",
    seed: int = 0,
    b_enc: float = 0.0,
    hook_name: str | None = None,
) -> MutualChoiceSAE | FeatureChoiceSAE:
    """A random inference SAE (decoder rows of varying norm, so rescaling matters)."""
    metadata = SAEMetadata(hook_name=hook_name, context_size=16, prepend_bos=False)
    if arch == "mutual_choice":
        sae: Any = MutualChoiceSAE(
            MutualChoiceSAEConfig(
                d_in=D_IN, d_sae=D_SAE, k=k, rescale_acts_by_decoder_norm=rescale, metadata=metadata
            )
        )
    else:
        sae = FeatureChoiceSAE(
            FeatureChoiceSAEConfig(
                d_in=D_IN,
                d_sae=D_SAE,
                k=k,
                rescale_acts_by_decoder_norm=rescale,
                capacity=capacity,  # type: ignore[arg-type]
                metadata=metadata,
            )
        )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) / math.sqrt(D_IN))
        sae.b_enc.copy_(b_enc + 0.1 * torch.randn(D_SAE, generator=g))
        row_norms = 0.5 + torch.rand(D_SAE, 1, generator=g)
        W_dec = torch.randn(D_SAE, D_IN, generator=g)
        sae.W_dec.copy_(W_dec / W_dec.norm(dim=-1, keepdim=True) * row_norms)
        sae.b_dec.copy_(0.01 * torch.randn(D_IN, generator=g))
        sae.threshold.fill_(0.3)
    return sae


def l0(acts: torch.Tensor) -> torch.Tensor:
    return (acts > 0).sum(-1).to(torch.float64)


BOTH = ["mutual_choice", "feature_choice"]


# ---------------------------------------------------------------------------
# threshold mode: JumpReLU semantics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", BOTH)
@pytest.mark.parametrize("rescale", [False, True])
def test_threshold_mode_is_relu_times_strict_step(arch: str, rescale: bool) -> None:
    sae = make_sae(arch, rescale=rescale)
    x = sparse_activations(200, seed=1)
    with torch.no_grad():
        sae.threshold.copy_(torch.linspace(0.0, 1.0, D_SAE))
        hidden_pre = choice_hidden_pre(sae, sae.process_sae_in(x))
        expected = hidden_pre.relu() * (hidden_pre > sae.threshold)
        torch.testing.assert_close(sae.encode(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(sae.encode_hidden_pre(x), hidden_pre, rtol=0, atol=0)


def test_jumprelu_is_strict_at_the_threshold() -> None:
    # h = [0.5, 1.0, 1.5, -2] with threshold 1.0: 1.0 is *not* above 1.0, so
    # only 1.5 survives; the negative value is cut by relu as well.
    h = torch.tensor([[0.5, 1.0, 1.5, -2.0]])
    out = jumprelu(h, torch.tensor(1.0))
    assert out.tolist() == [[0.0, 0.0, 1.5, 0.0]]
    # threshold 0 is plain relu
    assert jumprelu(h, torch.tensor(0.0)).tolist() == [[0.5, 1.0, 1.5, 0.0]]


@pytest.mark.parametrize("arch", BOTH)
def test_threshold_mode_is_per_token(arch: str) -> None:
    # Encoding a token alone or inside a batch gives the same code.
    sae = make_sae(arch)
    x = sparse_activations(32, seed=2)
    with torch.no_grad():
        batch = sae.encode(x)
        alone = torch.cat([sae.encode(x[i : i + 1]) for i in range(32)])
    torch.testing.assert_close(batch, alone, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# batch mode and calibration
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "capacity"),
    [("mutual_choice", "uniform"), ("feature_choice", "uniform")],
)
@pytest.mark.parametrize("rescale", [False, True])
def test_batch_and_threshold_modes_agree_when_calibrated_on_that_batch(
    arch: str, capacity: str, rescale: bool
) -> None:
    # N = 512 tokens, k = 4, F = 64: Mutual Choice keeps T = 2048 entries;
    # uniform Feature Choice gives each latent c_j = 4 * 512 / 64 = 32 tokens,
    # an integer, so batch mode's m_j = 32 exactly. Calibrating on the same
    # batch puts each threshold between the T-th (m_j-th) and next value, so
    # threshold mode keeps exactly the same entries (continuous data: no ties).
    sae = make_sae(arch, rescale=rescale, capacity=capacity, b_enc=1.0)
    x = sparse_activations(512, seed=3)
    calibrate_thresholds(sae, x, show_progress=False)
    with torch.no_grad():
        by_threshold = sae.encode(x)
        sae.cfg.inference_mode = "batch"
        by_batch = sae.encode(x)
    assert l0(by_batch).mean().item() == 4.0
    torch.testing.assert_close(by_threshold, by_batch, rtol=0, atol=0)
    if arch == "feature_choice":
        assert ((by_batch > 0).sum(0) == 32).all()


def test_zipf_feature_choice_counts_agree_with_batch_mode_within_rounding() -> None:
    # Zipf capacities are fractional: batch mode rounds each c_j to floor or
    # ceil at random, calibration to the nearest integer, so per-latent counts
    # differ by at most one.
    sae = make_sae("feature_choice", capacity="zipf", k=3, b_enc=2.0)
    x = sparse_activations(1024, seed=4)
    calibrate_thresholds(sae, x, show_progress=False)
    with torch.no_grad():
        thr_counts = (sae.encode(x) > 0).sum(0)
        sae.cfg.inference_mode = "batch"
        batch_counts = (sae.encode(x) > 0).sum(0)
    c = sae.activation_fn.expected_capacities(1024)  # type: ignore[union-attr]
    assert (thr_counts - torch.floor(c + 0.5).long()).abs().max() == 0
    assert (thr_counts - batch_counts).abs().max() <= 1


def test_mutual_choice_calibration_generalises_to_held_out_tokens() -> None:
    sae = make_sae("mutual_choice", k=4, rescale=True)
    calib = [sparse_activations(1024, seed=100 + i) for i in range(16)]  # 16k tokens
    calibrate_thresholds(sae, calib, show_progress=False)
    with torch.no_grad():
        on_calib = l0(sae.encode(torch.cat(calib))).mean().item()
        held_out = l0(sae.encode(sparse_activations(16384, seed=7))).mean().item()
    assert on_calib == 4.0  # exact on the calibration set: T = 4 * 16384 kept
    assert abs(held_out - 4.0) / 4.0 < 0.05


@pytest.mark.parametrize("capacity", ["zipf", "uniform"])
def test_feature_choice_calibration_hits_every_latent_density(capacity: str) -> None:
    # k = 3, F = 64: zipf target densities run from 0.64 (latent 0) down to
    # 0.010 (latent 63); uniform ones are all 3/64. b_enc = 2 makes most
    # pre-activations positive, so every target is reachable.
    sae = make_sae("feature_choice", k=3, capacity=capacity, b_enc=2.0)
    n = 16384
    calibrate_thresholds(
        sae,
        (sparse_activations(2048, seed=200 + i) for i in range(8)),
        n_batches=8,
        show_progress=False,
    )
    target = target_densities(sae, 2048)
    with torch.no_grad():
        density = (sae.encode(sparse_activations(n, seed=8)) > 0).to(torch.float64).mean(0)
    assert (density > 0).all(), "a latent is dead at inference"
    # Binomial error of the held-out count plus that of the calibrated quantile:
    # tolerance 5 standard deviations, plus one token of rounding.
    sd = torch.sqrt(target * (1 - target) * (2 / n))
    assert ((density - target).abs() <= 5 * sd + 1 / n).all(), (density - target).abs().max()
    assert abs(density.sum().item() - 3.0) / 3.0 < 0.05  # mean L0 ~ k


def test_target_densities_do_not_depend_on_the_batch_size() -> None:
    sae = make_sae("feature_choice", k=20, capacity="zipf")
    # k = 20 of 64 latents: Zipf water-filling clips the head at density 1.
    d_small, d_large = target_densities(sae, 100), target_densities(sae, 100_000)
    assert d_small[0] == 1.0
    torch.testing.assert_close(d_small, d_large, rtol=1e-9, atol=1e-12)
    assert abs(d_small.sum().item() - 20) < 1e-9


@pytest.mark.parametrize("arch", BOTH)
def test_calibration_streaming_equals_one_shot(arch: str) -> None:
    # Batches of uneven sizes, as a list (exact token count known up front),
    # give the same thresholds as one batch holding all tokens.
    sae = make_sae(arch, capacity="zipf", b_enc=1.0)
    x = sparse_activations(1500, seed=9)
    sizes = [100, 700, 1, 399, 300]
    parts = list(torch.split(x, sizes))
    one = calibrate_thresholds(make_sae(arch, capacity="zipf", b_enc=1.0), x, show_progress=False)
    many = calibrate_thresholds(sae, parts, show_progress=False)
    torch.testing.assert_close(many.threshold, one.threshold, rtol=0, atol=0)
    # max_tokens cuts the stream: same as calibrating on the first 1000 tokens.
    cut = calibrate_thresholds(
        make_sae(arch, capacity="zipf", b_enc=1.0),
        iter(parts),
        max_tokens=1000,
        show_progress=False,
    )
    ref = calibrate_thresholds(
        make_sae(arch, capacity="zipf", b_enc=1.0), x[:1000], show_progress=False
    )
    torch.testing.assert_close(cut.threshold, ref.threshold, rtol=0, atol=0)


def test_calibration_accepts_leading_dims_and_reports_bad_streams() -> None:
    sae = make_sae("mutual_choice")
    x = sparse_activations(256, seed=10)
    calibrate_thresholds(sae, [x.reshape(4, 64, D_IN)], show_progress=False)
    assert l0(sae.encode(x)).mean().item() == 4.0

    with pytest.raises(ValueError, match="n_batches or max_tokens"):
        calibrate_thresholds(sae, (b for b in [x]), show_progress=False)
    with pytest.raises(ValueError, match="d_in=16"):
        calibrate_thresholds(sae, [torch.randn(8, 3)], show_progress=False)
    with pytest.raises(ValueError, match="no calibration tokens"):
        calibrate_thresholds(sae, [], show_progress=False)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        calibrate_thresholds(sae, [bad], show_progress=False)
    # batches growing beyond the first one's size need an explicit bound
    with pytest.raises(ValueError, match="max_tokens"):
        calibrate_thresholds(sae, iter([x[:10], x]), n_batches=2, show_progress=False)


@pytest.mark.parametrize("arch", BOTH)
def test_calibrating_a_training_sae_carries_over_to_the_saved_inference_sae(
    arch: str, tmp_path: Path
) -> None:
    common: dict[str, Any] = {"d_in": D_IN, "d_sae": D_SAE, "k": 4, "aux_loss": "none"}
    if arch == "mutual_choice":
        train: Any = MutualChoiceTrainingSAE(MutualChoiceTrainingSAEConfig(**common))
        assert train.threshold.shape == ()
    else:
        train = FeatureChoiceTrainingSAE(
            FeatureChoiceTrainingSAEConfig(**common, capacity="uniform")
        )
        assert train.threshold.shape == (D_SAE,)
    x = sparse_activations(512, seed=11)
    calibrate_thresholds(train, x, show_progress=False)
    assert (train.threshold_updates >= 1).all()
    assert (train.threshold > 0).all()
    train.save_inference_model(tmp_path)
    sae = SAE.load_from_disk(tmp_path)
    assert sae.cfg.inference_mode == "threshold"
    torch.testing.assert_close(
        sae.threshold, train.threshold.expand(D_SAE).to(torch.float32), rtol=0, atol=0
    )
    with torch.no_grad():
        acts = sae.encode(x)
        # the training SAE's own allocation over the batch keeps the same set
        batch_acts = train.encode(x)
    assert l0(acts).mean().item() == 4.0
    torch.testing.assert_close(acts > 0, batch_acts > 0)


# ---------------------------------------------------------------------------
# batch mode details
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", BOTH)
def test_batch_mode_rejects_non_finite_input(arch: str) -> None:
    sae = make_sae(arch)
    sae.cfg.inference_mode = "batch"
    x = sparse_activations(64, seed=12)
    x[5, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        sae.encode(x)
    x[5, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        sae(x)


def test_batch_mode_follows_config_edits_after_loading(tmp_path: Path) -> None:
    sae = make_sae("mutual_choice", k=4)
    sae.save_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    x = sparse_activations(128, seed=13)
    loaded.cfg.inference_mode = "batch"
    assert l0(loaded.encode(x)).mean().item() == 4.0
    loaded.cfg.k = 2
    assert l0(loaded.encode(x)).mean().item() == 2.0
    loaded.cfg.inference_mode = "fast"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="inference_mode"):
        loaded.encode(x)


@pytest.mark.parametrize("arch", BOTH)
def test_save_and_load_round_trip_keeps_thresholds_and_mode(arch: str, tmp_path: Path) -> None:
    sae = make_sae(arch, rescale=True, capacity="zipf")
    calibrate_thresholds(sae, sparse_activations(512, seed=14), show_progress=False)
    sae.cfg.inference_mode = "batch"
    sae.save_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded) is type(sae)
    assert loaded.cfg.to_dict() == sae.cfg.to_dict()
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    loaded.cfg.inference_mode = sae.cfg.inference_mode = "threshold"
    x = sparse_activations(64, seed=15)
    torch.testing.assert_close(loaded(x), sae(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# folding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", BOTH)
@pytest.mark.parametrize("rescale", [False, True])
def test_fold_W_dec_norm_keeps_outputs(arch: str, rescale: bool) -> None:
    sae = make_sae(arch, rescale=rescale, capacity="zipf")
    x = sparse_activations(512, seed=16)
    calibrate_thresholds(sae, x, show_progress=False)
    with torch.no_grad():
        acts, out = sae.encode(x), sae(x)
        norms = sae.get_W_dec_norm().clone()
        sae.fold_W_dec_norm()
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
        acts_f, out_f = sae.encode(x), sae(x)
    torch.testing.assert_close(acts_f > 0, acts > 0)
    torch.testing.assert_close(out_f, out, rtol=1e-5, atol=1e-5)
    if rescale:  # hidden_pre (and so the codes) unchanged
        torch.testing.assert_close(acts_f, acts, rtol=1e-5, atol=1e-5)
    else:  # codes now in units of a unit-norm decoder row
        torch.testing.assert_close(acts_f, acts * norms, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", BOTH)
@pytest.mark.parametrize("rescale", [False, True])
def test_fold_activation_norm_scaling_factor_keeps_outputs(arch: str, rescale: bool) -> None:
    # The SAE was trained on x * s; after folding s it takes raw x and returns
    # the raw-scale reconstruction: fold(x) == original(x * s) / s, same firing.
    s = 3.7
    sae = make_sae(arch, rescale=rescale, capacity="zipf")
    x = sparse_activations(512, seed=17)
    calibrate_thresholds(sae, x * s, show_progress=False)
    with torch.no_grad():
        acts, out = sae.encode(x * s), sae(x * s)
        sae.fold_activation_norm_scaling_factor(s)
        acts_f, out_f = sae.encode(x), sae(x)
    assert sae.cfg.normalize_activations == "none"
    torch.testing.assert_close(acts_f > 0, acts > 0)
    torch.testing.assert_close(out_f, out / s, rtol=1e-5, atol=1e-5)
    # with rescaling the codes shrink by s too (as for SAELens's TopK)
    torch.testing.assert_close(acts_f, acts / s if rescale else acts, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", BOTH)
def test_fold_activation_whitening_with_rescale_keeps_outputs(arch: str) -> None:
    sae = make_sae(arch, rescale=True, capacity="zipf")
    x = sparse_activations(512, seed=18)
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(D_IN, generator=g)
    M = torch.eye(D_IN) + 0.1 * torch.randn(D_IN, D_IN, generator=g)
    z = (x - mean) @ M  # what the SAE was trained on
    calibrate_thresholds(sae, z, show_progress=False)
    with torch.no_grad():
        acts, out = sae.encode(z), sae(z) @ torch.linalg.inv(M) + mean
        sae.fold_activation_whitening(mean, M, torch.linalg.inv(M))
        acts_f, out_f = sae.encode(x), sae(x)
    torch.testing.assert_close(acts_f > 0, acts > 0)
    torch.testing.assert_close(out_f, out, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# loading errors
# ---------------------------------------------------------------------------


def _saved(tmp_path: Path, arch: str = "feature_choice") -> Path:
    make_sae(arch).save_model(tmp_path)
    return tmp_path


def _edit_cfg(path: Path, **changes: Any) -> None:
    cfg = json.loads((path / "cfg.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    (path / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"k": None}, "k is missing"),
        ({"k": "4"}, "k must be a finite number"),
        ({"k": 65}, "k = 65 is larger than d_sae = 64"),
        ({"k": 0}, "k must be a finite number > 0"),
        ({"inference_mode": "fast"}, "inference_mode must be one of"),
        ({"capacity": "linear"}, "capacity must be one of"),
        ({"zipf_alpha": -1.0}, "zipf_alpha must be"),
        ({"rescale_acts_by_decoder_norm": "yes"}, "rescale_acts_by_decoder_norm must be"),
        ({"d_sae": 0}, "d_sae must be a positive integer"),
    ],
)
def test_invalid_config_fails_naming_the_field(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    path = _saved(tmp_path)
    _edit_cfg(path, **changes)
    with pytest.raises(ValueError, match=message):
        SAE.load_from_disk(path)


def test_missing_dimension_fails_naming_the_field(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    _edit_cfg(path, d_in=None)
    with pytest.raises(TypeError, match="d_in"):
        SAE.load_from_disk(path)


def test_invalid_mutual_choice_method_fails(tmp_path: Path) -> None:
    path = _saved(tmp_path, "mutual_choice")
    _edit_cfg(path, allocation_method="magic")
    with pytest.raises(ValueError, match="allocation_method must be one of"):
        SAE.load_from_disk(path)


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("threshold", (D_SAE - 1,), r"'threshold' has shape \(63,\).*needs \(64,\)"),
        ("W_enc", (D_IN, D_SAE + 1), r"'W_enc' has shape \(16, 65\).*needs \(16, 64\)"),
        ("b_dec", (D_IN, 1), r"'b_dec' has shape \(16, 1\)"),
        ("W_dec", None, r"missing tensor\(s\) \['W_dec'\]"),
        ("scaling_factor_extra", (3,), r"unexpected tensor\(s\) \['scaling_factor_extra'\]"),
    ],
)
def test_wrong_weights_fail_naming_the_tensor(
    tmp_path: Path, name: str, shape: tuple[int, ...] | None, message: str
) -> None:
    path = _saved(tmp_path)
    weights = load_file(path / "sae_weights.safetensors")
    if shape is None:
        del weights[name]
    else:
        weights[name] = torch.zeros(shape)
    save_file(weights, path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=message):
        SAE.load_from_disk(path)


def test_nan_threshold_is_rejected_and_scalar_mutual_threshold_expanded(tmp_path: Path) -> None:
    path = _saved(tmp_path, "mutual_choice")
    weights = load_file(path / "sae_weights.safetensors")
    weights["threshold"] = torch.tensor(0.25)
    save_file(weights, path / "sae_weights.safetensors")
    sae = SAE.load_from_disk(path)
    assert sae.threshold.shape == (D_SAE,) and (sae.threshold == 0.25).all()

    weights["threshold"] = torch.full((D_SAE,), float("nan"))
    save_file(weights, path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="'threshold' holds 64 NaN"):
        SAE.load_from_disk(path)


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ValueError, match="k is missing"):
        MutualChoiceSAEConfig(d_in=4, d_sae=8)
    with pytest.raises(ValueError, match="k = 9 is larger than d_sae = 8"):
        FeatureChoiceSAEConfig(d_in=4, d_sae=8, k=9)


# ---------------------------------------------------------------------------
# SAELens consumers: HookedSAETransformer and run_evals
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=D_IN, n_ctx=16, d_head=4, n_heads=4, d_vocab=64,
        act_fn="relu", seed=0, device="cpu",
    )  # fmt: skip
    return HookedSAETransformer(cfg).eval()


def _tokens(n_rows: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (n_rows, 16), generator=torch.Generator().manual_seed(seed))


def _calibrated_on_model(arch: str, model: Any) -> MutualChoiceSAE | FeatureChoiceSAE:
    sae = make_sae(arch, capacity="zipf", k=3, b_enc=1.0, hook_name=HOOK)
    _, cache = model.run_with_cache(_tokens(64, seed=20), names_filter=HOOK)
    calibrate_thresholds(sae, cache[HOOK], show_progress=False)
    return sae


@pytest.mark.parametrize("arch", BOTH)
@pytest.mark.parametrize("mode", ["threshold", "batch"])
def test_hooked_sae_transformer_runs_choice_saes(tiny_model: Any, arch: str, mode: str) -> None:
    model = tiny_model
    sae = _calibrated_on_model(arch, model)
    sae.cfg.inference_mode = mode  # type: ignore[assignment]
    tokens = _tokens(4, seed=21)
    with torch.no_grad():
        clean, clean_cache = model.run_with_cache(tokens, names_filter=HOOK)
        spliced = model.run_with_saes(tokens, saes=[sae])
        logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
        with_error = model.run_with_saes(tokens, saes=[sae], use_error_term=True)
    assert model.acts_to_saes == {}  # removed after each run
    assert spliced.shape == clean.shape and torch.isfinite(spliced).all()
    assert not torch.allclose(spliced, clean, atol=1e-3)  # the SAE is lossy
    torch.testing.assert_close(logits, spliced, rtol=1e-5, atol=1e-5)
    # the error term restores the clean model output exactly
    torch.testing.assert_close(with_error, clean, rtol=1e-5, atol=1e-5)
    acts = cache[f"{HOOK}.hook_sae_acts_post"]
    assert acts.shape == (4, 16, D_SAE)
    with torch.no_grad():
        expected = sae.encode(clean_cache[HOOK])
    torch.testing.assert_close(acts, expected, rtol=1e-5, atol=1e-5)
    assert 0 < l0(acts).mean().item() < D_SAE


@pytest.mark.parametrize("arch", BOTH)
def test_run_evals_with_an_activations_store(tiny_model: Any, arch: str) -> None:
    from datasets import Dataset
    from sae_lens import ActivationsStore
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    model = tiny_model
    dataset = Dataset.from_dict({"tokens": _tokens(64, seed=22).tolist()})
    store = ActivationsStore(
        model=model, dataset=dataset, streaming=False, hook_name=HOOK, hook_head_index=None,
        context_size=16, d_in=D_IN, n_batches_in_buffer=8, total_training_tokens=10**6,
        store_batch_size_prompts=4, train_batch_size_tokens=64, prepend_bos=False,
        normalize_activations="none", device=torch.device("cpu"), dtype="float32",
    )  # fmt: skip
    sae = make_sae(arch, capacity="zipf", k=3, b_enc=1.0, hook_name=HOOK)
    # calibrate straight from the store (it never ends: n_batches bounds it)
    calibrate_thresholds(sae, store, n_batches=8, show_progress=False)
    assert (sae.threshold > 0).any()
    eval_config = EvalConfig(
        batch_size_prompts=4,
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=2,
        compute_ce_loss=True,
        compute_variance_metrics=True,
        compute_sparsity_metrics=True,
    )
    metrics, _ = run_evals(
        sae, store, model, ActivationScaler(), eval_config, exclude_special_tokens=False
    )
    values = [
        metrics["model_performance_preservation"]["ce_loss_score"],
        metrics["reconstruction_quality"]["explained_variance"],
        metrics["sparsity"]["l0"],
    ]
    assert all(math.isfinite(v) for v in values), values
    assert 0 < metrics["sparsity"]["l0"] < D_SAE
