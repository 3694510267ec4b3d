"""Encoding with saved Choice SAEs, calibrating them, and SAELens's consumers.

- Folders saved by 0.1.0 (``"architecture": "mutual_choice"`` /
  ``"feature_choice"``) load and encode exactly as before: threshold mode (a
  JumpReLU), batch mode (the training allocation), folding, loading errors.
- ``encode_batch`` reproduces the training allocation on a 0.1.0 SAE, its
  JumpReLU conversion and a ``batchtopk``-trained JumpReLU.
- ``calibrate_thresholds`` is exact, streams, and warns on too few tokens.
- HookedSAETransformer and ``run_evals`` run a SAE trained and saved by this
  package (SAELens's ``jumprelu``, what users get) and 0.1.0 SAEs.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, JumpReLUSAE
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import load_file, save_file

from sae_lens_choice import (
    FeatureChoiceSAEConfig,
    MutualChoiceSAEConfig,
    calibrate_thresholds,
    choice_settings,
    encode_batch,
    to_jumprelu,
)
from sae_lens_choice.calibration import MIN_TARGET_COUNT
from sae_lens_choice.choice_base import choice_hidden_pre, jumprelu
from sae_lens_choice.feature_choice_sae import expected_capacities, target_densities
from tests.helpers import (
    ARCHS,
    l0,
    make_legacy_sae,
    make_training_sae,
    randomize_weights,
    save_legacy_folder,
    sparse_activations,
    tiny_model,
    token_rows,
    train,
)

D_IN = 16
D_SAE = 64
HOOK = "blocks.0.hook_resid_post"


def legacy(arch: str, *, capacity: str = "uniform", rescale: bool = False, **kwargs: Any) -> Any:
    """A random 0.1.0 inference SAE; Feature Choice with ``capacity`` capacities."""
    if arch == "feature_choice":
        kwargs["capacity"] = capacity
    return make_legacy_sae(arch, rescale_acts_by_decoder_norm=rescale, **kwargs)


# ---------------------------------------------------------------------------
# 0.1.0 threshold mode: JumpReLU semantics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rescale", [False, True])
def test_threshold_mode_is_relu_times_strict_step(arch: str, rescale: bool) -> None:
    sae = legacy(arch, rescale=rescale)
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
    assert jumprelu(h, torch.tensor(1.0)).tolist() == [[0.0, 0.0, 1.5, 0.0]]
    # threshold 0 is plain relu
    assert jumprelu(h, torch.tensor(0.0)).tolist() == [[0.5, 1.0, 1.5, 0.0]]


@pytest.mark.parametrize("arch", ARCHS)
def test_threshold_mode_is_per_token(arch: str) -> None:
    # Encoding a token alone or inside a batch gives the same code.
    sae = legacy(arch)
    x = sparse_activations(32, seed=2)
    with torch.no_grad():
        batch = sae.encode(x)
        alone = torch.cat([sae.encode(x[i : i + 1]) for i in range(32)])
    torch.testing.assert_close(batch, alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "home"),
    [
        ("MutualChoiceSAE", "sae_lens_choice.mutual_choice_sae"),
        ("MutualChoiceSAEConfig", "sae_lens_choice.mutual_choice_sae"),
        ("MutualChoice", "sae_lens_choice.mutual_choice_sae"),
        ("FeatureChoiceSAE", "sae_lens_choice.feature_choice_sae"),
        ("FeatureChoiceSAEConfig", "sae_lens_choice.feature_choice_sae"),
        ("jumprelu", "sae_lens_choice.choice_base"),
    ],
)
def test_names_moved_out_of_inference_resolve_with_a_deprecation_warning(
    name: str, home: str
) -> None:
    inference = importlib.import_module("sae_lens_choice.inference")
    with pytest.warns(DeprecationWarning, match=f"moved to {re.escape(home)}.{name}"):
        moved = getattr(inference, name)
    assert moved is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        getattr(inference, "NoSuchName")  # noqa: B009


# ---------------------------------------------------------------------------
# 0.1.0 batch mode and calibration
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rescale", [False, True])
def test_batch_mode_encode_batch_and_threshold_mode_calibrated_on_the_batch_agree(
    arch: str, rescale: bool
) -> None:
    # N = 512 tokens, k = 4, F = 64: Mutual Choice keeps T = 2048 entries;
    # uniform Feature Choice gives each latent c_j = 4 * 512 / 64 = 32 tokens,
    # an integer, so batch mode's m_j = 32 exactly, whatever the rounding
    # offset (encode_batch's fixed one, or batch mode's seeded draw).
    # Calibrating on the same batch puts each threshold between the T-th
    # (m_j-th) and next value, so threshold mode keeps exactly the same entries
    # (continuous data: no ties).
    sae = legacy(arch, rescale=rescale, b_enc=1.0)
    x = sparse_activations(512, seed=3)
    calibrate_thresholds(sae, x, show_progress=False)
    with torch.no_grad():
        by_threshold = sae.encode(x)
        sae.cfg.inference_mode = "batch"
        by_batch = sae.encode(x)
        by_encode_batch = encode_batch(sae, x)
        # leading dimensions are the batch: one allocation over all 512 tokens
        by_encode_batch_3d = encode_batch(sae, x.reshape(4, 128, D_IN)).reshape(512, -1)
        # the JumpReLU conversion keeps the training settings in its metadata
        jump = to_jumprelu(sae)
        assert choice_settings(jump)["architecture"] == arch  # type: ignore[index]
        by_converted = encode_batch(jump, x)
    assert l0(by_batch).mean().item() == 4.0
    torch.testing.assert_close(by_threshold, by_batch, rtol=0, atol=0)
    torch.testing.assert_close(by_encode_batch, by_batch, rtol=0, atol=0)
    torch.testing.assert_close(by_encode_batch_3d, by_batch, rtol=0, atol=0)
    torch.testing.assert_close(by_converted > 0, by_batch > 0)
    torch.testing.assert_close(by_converted, by_batch, rtol=1e-5, atol=1e-5)
    if arch == "feature_choice":
        assert ((by_batch > 0).sum(0) == 32).all()


def test_zipf_feature_choice_counts_agree_with_batch_mode_within_rounding() -> None:
    # Zipf capacities are fractional: batch mode rounds each c_j to floor or
    # ceil at random, calibration to the nearest integer, so per-latent counts
    # differ by at most one.
    sae = legacy("feature_choice", capacity="zipf", k=3, b_enc=2.0)
    x = sparse_activations(1024, seed=4)
    calibrate_thresholds(sae, x, show_progress=False)
    with torch.no_grad():
        thr_counts = (sae.encode(x) > 0).sum(0)
        sae.cfg.inference_mode = "batch"
        batch_counts = (sae.encode(x) > 0).sum(0)
    c = expected_capacities(1024, D_SAE, 3, "zipf")
    assert (thr_counts - torch.floor(c + 0.5).long()).abs().max() == 0
    assert (thr_counts - batch_counts).abs().max() <= 1


def test_mutual_choice_calibration_generalises_to_held_out_tokens() -> None:
    sae = legacy("mutual_choice", k=4, rescale=True)
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
    sae = legacy("feature_choice", k=3, capacity=capacity, b_enc=2.0)
    n = 16384
    calibrate_thresholds(
        sae,
        (sparse_activations(2048, seed=200 + i) for i in range(8)),
        n_batches=8,
        show_progress=False,
    )
    target = target_densities(D_SAE, 3, capacity)
    with torch.no_grad():
        density = (sae.encode(sparse_activations(n, seed=8)) > 0).to(torch.float64).mean(0)
    assert (density > 0).all(), "a latent is dead at inference"
    # Binomial error of the held-out count plus that of the calibrated quantile:
    # tolerance 5 standard deviations, plus one token of rounding.
    sd = torch.sqrt(target * (1 - target) * (2 / n))
    assert ((density - target).abs() <= 5 * sd + 1 / n).all(), (density - target).abs().max()
    assert abs(density.sum().item() - 3.0) / 3.0 < 0.05  # mean L0 ~ k


def test_target_densities_do_not_depend_on_the_batch_size() -> None:
    # k = 20 of 64 latents: Zipf water-filling clips the head at density 1;
    # clipping at N scales with N, so c_j / N does not depend on N.
    densities = target_densities(D_SAE, 20, "zipf")
    for n in (100, 100_000):
        torch.testing.assert_close(
            expected_capacities(n, D_SAE, 20, "zipf") / n, densities, rtol=1e-9, atol=1e-12
        )
    assert densities[0] == 1.0
    assert abs(densities.sum().item() - 20) < 1e-9


@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_streaming_equals_one_shot(arch: str) -> None:
    # Batches of uneven sizes, as a list (exact token count known up front),
    # give the same thresholds as one batch holding all tokens.
    def fresh() -> Any:
        return legacy(arch, capacity="zipf", b_enc=1.0)

    x = sparse_activations(1500, seed=9)
    parts = list(torch.split(x, [100, 700, 1, 399, 300]))
    one = calibrate_thresholds(fresh(), x, show_progress=False)
    many = calibrate_thresholds(fresh(), parts, show_progress=False)
    torch.testing.assert_close(many.threshold, one.threshold, rtol=0, atol=0)
    # max_tokens cuts the stream: same as calibrating on the first 1000 tokens.
    cut = calibrate_thresholds(fresh(), iter(parts), max_tokens=1000, show_progress=False)
    ref = calibrate_thresholds(fresh(), x[:1000], show_progress=False)
    torch.testing.assert_close(cut.threshold, ref.threshold, rtol=0, atol=0)
    assert not torch.equal(ref.threshold, one.threshold)  # the cut mattered


def test_calibration_accepts_leading_dims_and_reports_bad_streams() -> None:
    sae = legacy("mutual_choice")
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


@pytest.mark.parametrize("capacity", ["uniform", "zipf"])
@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_on_too_few_tokens_warns_with_the_count_that_suffices(
    arch: str, capacity: str
) -> None:
    # One token: Mutual Choice's threshold would rest on round(4 * 1) = 4 < 5
    # values, and every Feature Choice latent on round(rho_j) <= 1 token (0 for
    # most, which then fire on nothing there and get threshold 0).
    sae = legacy(arch, capacity=capacity, b_enc=1.0)
    x = sparse_activations(4096, seed=11)
    with pytest.warns(UserWarning, match=r"calibrat.* on 1 token\(s\)") as record:
        calibrate_thresholds(sae, x[:1], show_progress=False)
    message = str(record[0].message)
    needed = int(re.findall(r"at least (\d+) tokens", message)[-1])
    assert needed > 1
    # The count the warning names is enough: calibrating on it is quiet.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate_thresholds(sae, x[:needed], show_progress=False)
    if arch == "feature_choice":
        # every latent's count rounds to >= 5 there, and the count asked for is
        # not much more than the rarest latent needs
        densities = target_densities(D_SAE, 4, capacity)
        assert (torch.floor(densities * needed + 0.5) >= MIN_TARGET_COUNT).all()
        assert needed <= MIN_TARGET_COUNT / float(densities.min()) + 1


@pytest.mark.parametrize("arch", ARCHS)
def test_calibrating_a_training_sae_carries_over_to_the_saved_sae(
    arch: str, tmp_path: Path
) -> None:
    # calibrate_thresholds on a training SAE, then save: the saved thresholds
    # are the calibrated ones (no EMA warning), kept tokens or not.
    overrides: dict[str, Any] = {"capacity": "uniform"} if arch == "feature_choice" else {}
    train_sae = make_training_sae(
        arch, d_in=D_IN, d_sae=D_SAE, k=4, threshold_calibration_tokens=0, **overrides
    )
    assert train_sae.threshold.shape == (() if arch == "mutual_choice" else (D_SAE,))
    x = sparse_activations(512, seed=12)
    calibrate_thresholds(train_sae, x, show_progress=False)
    assert (train_sae.threshold_updates >= 1).all()
    assert (train_sae.threshold > 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_sae.save_inference_model(tmp_path)
    sae = SAE.load_from_disk(tmp_path)
    assert isinstance(sae, JumpReLUSAE)
    torch.testing.assert_close(
        sae.threshold, train_sae.threshold.expand(D_SAE).to(torch.float32), rtol=0, atol=0
    )
    with torch.no_grad():
        acts = sae.encode(x)
        # the training SAE's own allocation over the batch keeps the same set
        batch_acts = train_sae.encode(x)
        torch.testing.assert_close(encode_batch(sae, x) > 0, batch_acts > 0)
    assert l0(acts).mean().item() == 4.0
    torch.testing.assert_close(acts > 0, batch_acts > 0)


# ---------------------------------------------------------------------------
# encode_batch: the training allocation on any saved form
# ---------------------------------------------------------------------------


def test_encode_batch_rejects_a_sae_without_choice_settings() -> None:
    plain = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    assert choice_settings(plain) is None
    with pytest.raises(TypeError, match="mutual_choice, feature_choice or batchtopk"):
        encode_batch(plain, sparse_activations(8, seed=0))
    with pytest.raises(TypeError, match="Mutual Choice, Feature Choice or BatchTopK"):
        calibrate_thresholds(plain, sparse_activations(8, seed=0), show_progress=False)


def test_a_batchtopk_trained_jumprelu_calibrates_and_encodes_in_batch_mode(
    tmp_path: Path,
) -> None:
    # SAELens's own batchtopk saves a jumprelu with training_architecture
    # "batchtopk" and k in its metadata: the same global rule as Mutual Choice.
    torch.manual_seed(0)
    batchtopk = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    randomize_weights(batchtopk, seed=14, b_enc=1.0)
    batchtopk.save_inference_model(tmp_path)
    sae = SAE.load_from_disk(tmp_path)
    assert isinstance(sae, JumpReLUSAE)
    settings = choice_settings(sae)
    assert settings is not None
    assert (settings["architecture"], settings["k"]) == ("batchtopk", 4)

    x = sparse_activations(512, seed=15)
    calibrate_thresholds(sae, x, show_progress=False)
    with torch.no_grad():
        assert l0(sae.encode(x)).mean().item() == 4.0
        # encode_batch keeps the batch's 4 * 512 largest, as BatchTopK trains
        batch_acts = encode_batch(sae, x)
        trained_acts = batchtopk.encode(x)
    torch.testing.assert_close(batch_acts > 0, trained_acts > 0)
    torch.testing.assert_close(batch_acts, trained_acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch_acts > 0, sae.encode(x) > 0)


# ---------------------------------------------------------------------------
# 0.1.0 folders: loading, batch-mode details, round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_mode_rejects_non_finite_input(arch: str) -> None:
    sae = legacy(arch)
    sae.cfg.inference_mode = "batch"
    x = sparse_activations(64, seed=16)
    x[5, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        sae.encode(x)
    x[5, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        sae(x)


def test_batch_mode_follows_config_edits_after_loading(tmp_path: Path) -> None:
    save_legacy_folder(tmp_path, "mutual_choice", k=4)
    loaded = SAE.load_from_disk(tmp_path)
    x = sparse_activations(128, seed=17)
    loaded.cfg.inference_mode = "batch"
    assert l0(loaded.encode(x)).mean().item() == 4.0
    loaded.cfg.k = 2
    assert l0(loaded.encode(x)).mean().item() == 2.0
    loaded.cfg.inference_mode = "fast"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="inference_mode"):
        loaded.encode(x)


@pytest.mark.parametrize("arch", ARCHS)
def test_0_1_0_folder_round_trip_keeps_class_thresholds_and_mode(arch: str, tmp_path: Path) -> None:
    sae = legacy(arch, rescale=True, capacity="zipf")
    calibrate_thresholds(sae, sparse_activations(512, seed=18), show_progress=False)
    sae.cfg.inference_mode = "batch"
    sae.save_model(tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == arch
    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded) is type(sae)
    assert loaded.cfg.to_dict() == sae.cfg.to_dict()
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    x = sparse_activations(256, seed=19)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x), rtol=0, atol=0)  # batch mode
        loaded.cfg.inference_mode = sae.cfg.inference_mode = "threshold"
        torch.testing.assert_close(loaded(x), sae(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# folding (0.1.0 SAEs)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rescale", [False, True])
def test_fold_W_dec_norm_keeps_outputs(arch: str, rescale: bool) -> None:
    sae = legacy(arch, rescale=rescale, capacity="zipf")
    x = sparse_activations(512, seed=20)
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


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rescale", [False, True])
def test_fold_activation_norm_scaling_factor_keeps_outputs(arch: str, rescale: bool) -> None:
    # The SAE was trained on x * s; after folding s it takes raw x and returns
    # the raw-scale reconstruction: fold(x) == original(x * s) / s, same firing.
    s = 3.7
    sae = legacy(arch, rescale=rescale, capacity="zipf")
    x = sparse_activations(512, seed=21)
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


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_activation_whitening_with_rescale_keeps_outputs(arch: str) -> None:
    sae = legacy(arch, rescale=True, capacity="zipf")
    x = sparse_activations(512, seed=22)
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
# 0.1.0 folders: loading errors
# ---------------------------------------------------------------------------


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
        ({"d_sae": 0}, "d_sae must be an integer > 0"),
    ],
)
def test_invalid_config_fails_naming_the_field(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    save_legacy_folder(tmp_path, "feature_choice")
    _edit_cfg(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        SAE.load_from_disk(tmp_path)


def test_missing_dimension_fails_naming_the_field(tmp_path: Path) -> None:
    save_legacy_folder(tmp_path, "feature_choice")
    _edit_cfg(tmp_path, d_in=None)
    with pytest.raises(TypeError, match="d_in"):
        SAE.load_from_disk(tmp_path)


def test_invalid_mutual_choice_method_fails(tmp_path: Path) -> None:
    save_legacy_folder(tmp_path, "mutual_choice")
    _edit_cfg(tmp_path, allocation_method="magic")
    with pytest.raises(ValueError, match="allocation_method must be one of"):
        SAE.load_from_disk(tmp_path)


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
    save_legacy_folder(tmp_path, "feature_choice")
    weights = load_file(tmp_path / "sae_weights.safetensors")
    if shape is None:
        del weights[name]
    else:
        weights[name] = torch.zeros(shape)
    save_file(weights, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=message):
        SAE.load_from_disk(tmp_path)


def test_nan_threshold_is_rejected_and_scalar_mutual_threshold_expanded(tmp_path: Path) -> None:
    save_legacy_folder(tmp_path, "mutual_choice")
    weights = load_file(tmp_path / "sae_weights.safetensors")
    weights["threshold"] = torch.tensor(0.25)
    save_file(weights, tmp_path / "sae_weights.safetensors")
    sae: Any = SAE.load_from_disk(tmp_path)
    assert torch.equal(sae.threshold, torch.full((D_SAE,), 0.25))

    weights["threshold"] = torch.full((D_SAE,), float("nan"))
    save_file(weights, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="'threshold' holds 64 NaN"):
        SAE.load_from_disk(tmp_path)


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ValueError, match="k is missing"):
        MutualChoiceSAEConfig(d_in=4, d_sae=8)
    with pytest.raises(ValueError, match="k = 9 is larger than d_sae = 8"):
        FeatureChoiceSAEConfig(d_in=4, d_sae=8, k=9)


# ---------------------------------------------------------------------------
# SAELens consumers: HookedSAETransformer and run_evals
# ---------------------------------------------------------------------------

#: What a SAE spliced into the model is: trained by this package and saved (a
#: JumpReLU, what users get), or a 0.1.0 SAE in either mode.
SAE_KINDS = ["trained-jumprelu", "0.1.0-threshold", "0.1.0-batch"]


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_model(d_model=D_IN, n_layers=2, hooked_sae=True)


@pytest.fixture(scope="module")
def saved_on_model(model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per architecture, a folder saved by a training SAE trained on the model's activations."""
    with torch.no_grad():
        _, cache = model.run_with_cache(token_rows(768, seed=30), names_filter=HOOK)
    batches = list(cache[HOOK].reshape(-1, D_IN).split(256))  # 48 steps of 256 tokens
    folders = {}
    for arch in ARCHS:
        sae = make_training_sae(
            arch, d_in=D_IN, d_sae=D_SAE, k=3, aux_loss="aux_k",
            metadata=SAEMetadata(hook_name=HOOK, context_size=16, prepend_bos=False),
        )  # fmt: skip
        train(sae, batches, lr=3e-3)
        folders[arch] = tmp_path_factory.mktemp(arch)
        sae.save_inference_model(folders[arch])
    return folders


def sae_on_model(kind: str, arch: str, model: Any, saved: dict[str, Path]) -> Any:
    if kind == "trained-jumprelu":
        sae = SAE.load_from_disk(saved[arch])
        assert isinstance(sae, JumpReLUSAE)
        assert sae.cfg.metadata.hook_name == HOOK
        return sae
    sae = legacy(
        arch, capacity="zipf", k=3, b_enc=1.0,
        metadata=SAEMetadata(hook_name=HOOK, context_size=16, prepend_bos=False),
    )  # fmt: skip
    with torch.no_grad():
        _, cache = model.run_with_cache(token_rows(64, seed=20), names_filter=HOOK)
    calibrate_thresholds(sae, cache[HOOK], show_progress=False)
    sae.cfg.inference_mode = kind.removeprefix("0.1.0-")
    return sae


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", SAE_KINDS)
def test_hooked_sae_transformer_runs_choice_saes(
    model: Any, saved_on_model: dict[str, Path], arch: str, kind: str
) -> None:
    sae = sae_on_model(kind, arch, model, saved_on_model)
    tokens = token_rows(4, seed=21)
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


@pytest.mark.parametrize("arch", ARCHS)
def test_trained_jumprelu_hits_k_on_held_out_model_tokens(
    model: Any, saved_on_model: dict[str, Path], arch: str
) -> None:
    # The saved thresholds were calibrated on the most recent training tokens:
    # tokens the SAE never saw, from the same model, fire about k = 3 latents.
    sae = SAE.load_from_disk(saved_on_model[arch])
    with torch.no_grad():
        _, cache = model.run_with_cache(token_rows(256, seed=31), names_filter=HOOK)
        acts = sae.encode(cache[HOOK])
    mean_l0 = l0(acts).mean().item()
    assert abs(mean_l0 - 3) / 3 < 0.1, mean_l0


def _activations_store(model: Any) -> Any:
    from datasets import Dataset
    from sae_lens import ActivationsStore

    dataset = Dataset.from_dict({"tokens": token_rows(64, seed=22).tolist()})
    return ActivationsStore(
        model=model, dataset=dataset, streaming=False, hook_name=HOOK, hook_head_index=None,
        context_size=16, d_in=D_IN, n_batches_in_buffer=8, total_training_tokens=10**6,
        store_batch_size_prompts=4, train_batch_size_tokens=64, prepend_bos=False,
        normalize_activations="none", device=torch.device("cpu"), dtype="float32",
    )  # fmt: skip


# SAELens's ActivationsStore warns about the tiny dataset and its own tensor copies
@pytest.mark.filterwarnings("ignore:The training dataset contains fewer samples:UserWarning")
@pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["trained-jumprelu", "0.1.0-threshold"])
def test_run_evals_with_an_activations_store(
    model: Any, saved_on_model: dict[str, Path], arch: str, kind: str
) -> None:
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    store = _activations_store(model)
    sae = sae_on_model(kind, arch, model, saved_on_model)
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
