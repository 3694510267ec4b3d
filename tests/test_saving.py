"""Saving and loading training SAEs: SAELens's own jumprelu, exact thresholds, no lost state.

- ``save_inference_model`` writes SAELens's ``jumprelu`` with our training
  settings in the metadata, and thresholds calibrated exactly on the most
  recent training tokens under the final weights;
- a SAE that went non-finite is never saved;
- checkpoints keep every buffer at its own dtype through SAELens's loader,
  which casts every stored tensor to the config's dtype;
- checkpoints written by 0.1.0 still load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, JumpReLUSAE
from sae_lens.saes.sae import TrainingSAE
from safetensors.torch import load_file, save_file

from sae_lens_choice import (
    calibrate_thresholds,
    choice_settings,
    compute_thresholds,
    encode_batch,
)
from tests.helpers import (
    ARCHS,
    l0,
    make_training_sae,
    sparse_activations,
    train,
)

D_IN, D_SAE = 16, 64


def trained(arch: str, *, n_steps: int = 30, batch: int = 256, **overrides: Any) -> Any:
    sae = make_training_sae(arch, d_in=D_IN, d_sae=D_SAE, k=4, **overrides)
    batches = [sparse_activations(batch, seed=i, d_in=D_IN) for i in range(n_steps)]
    return train(sae, batches, lr=3e-3)


# ---------------------------------------------------------------------------
# the saved artifact
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescale"])
@pytest.mark.parametrize("arch", ARCHS)
def test_saved_sae_is_sae_lens_jumprelu_with_thresholds_exact_on_recent_tokens(
    arch: str, rescale: bool, tmp_path: Path
) -> None:
    sae = trained(arch, rescale_acts_by_decoder_norm=rescale, threshold_calibration_tokens=2048)
    sae.save_inference_model(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    assert cfg["metadata"]["training_architecture"] == arch
    assert cfg["metadata"]["training_architecture_details"]["k"] == 4
    assert set(load_file(tmp_path / "sae" / "sae_weights.safetensors")) == {
        "W_enc", "b_enc", "W_dec", "b_dec", "threshold"
    }  # fmt: skip

    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert isinstance(loaded, JumpReLUSAE)
    # the thresholds are the exact calibration on the last 2048 training tokens
    recent = torch.cat([sparse_activations(256, seed=i, d_in=D_IN) for i in range(22, 30)])
    expected = compute_thresholds(sae, recent, show_progress=False)
    torch.testing.assert_close(loaded.threshold.double(), expected, rtol=1e-6, atol=1e-6)
    # and the JumpReLU encodes exactly as our per-token threshold encoder
    x = sparse_activations(512, seed=99, d_in=D_IN)
    with torch.no_grad():
        hidden_pre = sae.compute_hidden_pre(sae.process_sae_in(x))
        ours = hidden_pre.relu() * (hidden_pre > expected.float())
        torch.testing.assert_close(loaded.encode(x), ours, rtol=1e-5, atol=1e-5)
    # the training SAE itself is left as it was (saving changes nothing)
    assert sae.training


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_thresholds_hit_k_on_held_out_data(arch: str, tmp_path: Path) -> None:
    sae = trained(arch, n_steps=60, capacity="zipf") if arch == "feature_choice" else trained(arch)
    sae.save_inference_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    held_out = sparse_activations(20_000, seed=10_000, d_in=D_IN)
    with torch.no_grad():
        acts = loaded.encode(held_out)
    mean_l0 = float(l0(acts).mean())
    assert abs(mean_l0 - 4) / 4 < 0.05, mean_l0
    if arch == "feature_choice":
        # every latent fires, near its target density
        density = (acts > 0).double().mean(0)
        target = sae.calibration_target().densities
        assert int((density == 0).sum()) == 0
        assert float((density.sum() - target.sum()).abs() / target.sum()) < 0.05


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_sae_loads_and_encodes_without_this_package(arch: str, tmp_path: Path) -> None:
    sae = trained(arch)
    sae.save_inference_model(tmp_path / "sae")
    x = sparse_activations(128, seed=5, d_in=D_IN)
    save_file({"x": x}, tmp_path / "x.safetensors")
    child = textwrap.dedent(
        """
        import sys
        from sae_lens import SAE
        from safetensors.torch import load_file, save_file
        sae = SAE.load_from_disk(sys.argv[1] + "/sae")
        x = load_file(sys.argv[1] + "/x.safetensors")["x"]
        save_file({"acts": sae.encode(x).detach(), "out": sae(x).detach()},
                  sys.argv[1] + "/out.safetensors")
        assert "sae_lens_choice" not in sys.modules
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = load_file(tmp_path / "out.safetensors")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    with torch.no_grad():
        torch.testing.assert_close(out["acts"], loaded.encode(x))
        torch.testing.assert_close(out["out"], loaded(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_batch_on_the_saved_sae_reproduces_the_training_allocation(
    arch: str, tmp_path: Path
) -> None:
    sae = trained(arch)
    sae.eval()
    sae.save_inference_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert choice_settings(loaded)["architecture"] == arch  # type: ignore[index]
    x = sparse_activations(300, seed=7, d_in=D_IN)
    with torch.no_grad():
        batch_acts = encode_batch(loaded, x)
        ours = encode_batch(sae, x)
    # exactly round(k * N) pairs for Mutual Choice; each latent its capacity for FC
    torch.testing.assert_close(batch_acts, ours, rtol=1e-5, atol=1e-5)
    if arch == "mutual_choice":
        assert int((batch_acts > 0).sum()) <= 4 * 300
        assert float(l0(batch_acts).mean()) == pytest.approx(4.0, abs=0.01)


def test_threshold_calibration_tokens_zero_saves_the_ema_with_a_warning(tmp_path: Path) -> None:
    sae = trained("mutual_choice", threshold_calibration_tokens=0)
    with pytest.warns(UserWarning, match="threshold EMA"):
        sae.save_inference_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    torch.testing.assert_close(
        loaded.threshold.double(), sae.threshold.expand(D_SAE), rtol=1e-6, atol=1e-7
    )


def test_calibration_tokens_follow_the_activation_scaling_fold() -> None:
    # SAELens folds its activation scaling factor into the weights at the end
    # of training; the kept tokens must move to raw units with them, so the
    # thresholds computed at saving time match the folded SAE.
    sae = trained("feature_choice", threshold_calibration_tokens=512)
    before = sae.inference_thresholds()
    kept = sae.calibration_inputs().clone()
    sae.fold_activation_norm_scaling_factor(4.0)
    torch.testing.assert_close(sae.calibration_inputs(), kept / 4.0)
    after = sae.inference_thresholds()
    # Before the decoder-norm rescaling, hidden_pre of the folded SAE on raw
    # inputs equals the old one on scaled inputs; the rescaling by |W_dec|,
    # which the fold divided by s, then shrinks it by s (TopK's default
    # rescale_acts_by_decoder_norm=True), and the thresholds with it.
    assert sae.cfg.rescale_acts_by_decoder_norm
    torch.testing.assert_close(after, before / 4.0, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# no non-finite SAE is ever saved (issue 11, item 2)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_a_sae_that_went_nan_is_never_saved(arch: str, tmp_path: Path) -> None:
    sae = make_training_sae(arch, d_in=D_IN, d_sae=D_SAE, k=4, check_finite_every=0)
    batches = [sparse_activations(64, seed=i, d_in=D_IN) for i in range(4)]
    batches[2][5, 1] = float("nan")
    train(sae, batches)
    for save in (sae.save_inference_model, sae.save_model):
        target = tmp_path / save.__name__
        with pytest.raises(RuntimeError, match=r"refusing to save.*training step 2"):
            save(target)
        assert not target.exists()


def test_a_nan_weight_without_a_nan_loss_is_refused_too(tmp_path: Path) -> None:
    sae = trained("mutual_choice", n_steps=2)
    with torch.no_grad():
        sae.W_dec[3, 4] = float("inf")
    with pytest.raises(RuntimeError, match=r"refusing to save.*W_dec holds 1 NaN/inf"):
        sae.save_inference_model(tmp_path / "sae")


# ---------------------------------------------------------------------------
# loading keeps our state at its own dtype (issue 11, item 4)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_load_from_disk_keeps_every_buffer_at_its_dtype_in_bfloat16(
    arch: str, tmp_path: Path
) -> None:
    sae = trained(arch, n_steps=5, dtype="bfloat16", threshold_calibration_tokens=64)
    with torch.no_grad():
        # values a bfloat16 cast would round or freeze
        sae.threshold.add_(1e-9)
        sae.threshold_updates.fill_(1000)
        sae.latent_density_ema.add_(1e-6)
    sae.save_model(tmp_path / "ckpt")
    loaded = TrainingSAE.load_from_disk(tmp_path / "ckpt")
    assert loaded.W_enc.dtype == torch.bfloat16
    for name, buffer in sae.named_buffers():
        restored = getattr(loaded, name)
        assert restored.dtype == buffer.dtype, name
        assert torch.equal(
            restored.view(-1).view(torch.uint8), buffer.view(-1).view(torch.uint8)
        ), (
            name  # bit for bit, NaN included
        )
    # and moving the SAE around keeps them too
    loaded.to(torch.float32)
    assert loaded.threshold.dtype == torch.float64
    assert loaded.threshold_updates.dtype == torch.int64
    assert loaded.latent_density_ema.dtype == torch.float32
    assert loaded.W_enc.dtype == torch.float32
    assert loaded.calibration_acts.dtype == torch.float32  # inputs follow the SAE


def test_a_0_1_0_training_checkpoint_still_loads(tmp_path: Path) -> None:
    # 0.1.0 stored its buffers plainly and had no step counter, flag or kept tokens
    sae = trained("feature_choice", n_steps=3)
    sae.save_model(tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "sae_weights.safetensors")
    old = {name: weights[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    for name in ("latent_density_ema", "threshold", "threshold_updates", "zipf_fit"):
        old[name] = getattr(sae, name).detach().clone()
    save_file(old, tmp_path / "ckpt" / "sae_weights.safetensors")
    with pytest.warns(UserWarning, match="lacks"):
        loaded = TrainingSAE.load_from_disk(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.threshold, sae.threshold)
    assert int(loaded.training_steps) == 0 and int(loaded.nonfinite_step) == -1


@pytest.mark.parametrize("arch", ARCHS)
def test_a_checkpoint_saved_before_aux_loss_units_keeps_its_normalised_aux_loss(
    arch: str, tmp_path: Path
) -> None:
    # the field's default became "input"; a checkpoint written before the field
    # existed trained its aux loss in the normalised space and must resume so
    sae = make_training_sae(
        arch, d_in=D_IN, d_sae=D_SAE, k=4, aux_loss="aux_k", normalize_activations="layer_norm"
    )
    assert sae.cfg.aux_loss_units == "input"
    sae.save_model(tmp_path / "new")
    assert TrainingSAE.load_from_disk(tmp_path / "new").cfg.aux_loss_units == "input"
    sae.save_model(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "cfg.json").read_text())
    del cfg["aux_loss_units"]
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(cfg))
    assert TrainingSAE.load_from_disk(tmp_path / "old").cfg.aux_loss_units == "normalised"


def test_unknown_cfg_fields_are_ignored_as_sae_lens_does(tmp_path: Path) -> None:
    # SAELens filters a cfg.json to the config's fields (it enriches configs
    # with runner fields itself); this package follows it for its own configs.
    sae = trained("mutual_choice", n_steps=2)
    sae.save_model(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "cfg.json").read_text())
    cfg["some_future_field"] = 3
    (tmp_path / "ckpt" / "cfg.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = TrainingSAE.load_from_disk(tmp_path / "ckpt")
    assert loaded.cfg.k == 4


@pytest.mark.parametrize(
    ("arch", "other"), [("mutual_choice", "feature_choice"), ("feature_choice", "mutual_choice")]
)
def test_a_checkpoint_renamed_to_the_other_choice_architecture_is_refused(
    arch: str, other: str, tmp_path: Path
) -> None:
    # Unknown fields are dropped as SAELens drops them, but a field that belongs
    # to the other Choice architecture means the name was edited by hand: loading
    # used to fail later with a shape error that named nothing.
    path = tmp_path / "ckpt"
    make_training_sae(arch, d_in=D_IN, d_sae=D_SAE, k=4).save_model(path)
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["architecture"] = other
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"architecture '{other}'.*'{arch}'.*cfg\.json"):
        TrainingSAE.load_from_disk(path)


def test_calibrate_thresholds_on_the_saved_jumprelu_uses_the_metadata(tmp_path: Path) -> None:
    sae = trained("feature_choice", n_steps=10, capacity="uniform")
    sae.save_inference_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    held_out = sparse_activations(8192, seed=500, d_in=D_IN)
    calibrate_thresholds(loaded, held_out, show_progress=False)
    with torch.no_grad():
        acts = loaded.encode(held_out)
    # uniform capacities: each latent fires on round(8192 * 4 / 64) = 512 tokens
    counts = (acts > 0).sum(0)
    assert counts.tolist() == [512] * D_SAE


def test_uniform_is_the_default_capacity_and_a_saved_zipf_sae_keeps_zipf(tmp_path: Path) -> None:
    from sae_lens_choice.feature_choice_sae import target_densities

    default = trained("feature_choice", n_steps=2)
    assert default.cfg.capacity == "uniform"
    sae = trained("feature_choice", n_steps=5, capacity="zipf")
    sae.save_inference_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    # the saved settings name the capacity, so a later default cannot change it
    assert choice_settings(loaded)["capacity"] == "zipf"  # type: ignore[index]
    zipf = target_densities(D_SAE, 4, "zipf", 1.0, 0.0)
    torch.testing.assert_close(sae.calibration_target().densities, zipf)
    held_out = sparse_activations(8192, seed=5, d_in=D_IN)
    calibrate_thresholds(loaded, held_out, show_progress=False)
    with torch.no_grad():
        fired = (loaded.encode(held_out) > 0).sum(0).double()
    # Zipf targets: latent 0 aims at many more tokens than the last latent
    assert float(fired[:4].mean()) > 4 * float(fired[-16:].mean())


def test_density_rank_feature_choice_saves_its_ranking_for_calibration(tmp_path: Path) -> None:
    sae = trained("feature_choice", n_steps=20, capacity="zipf", capacity_order="density_rank")
    ranking = sae.capacity_ranking()
    assert not torch.equal(ranking, torch.arange(D_SAE))  # training reordered the latents
    sae.save_inference_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert loaded.cfg.metadata.capacity_ranking == ranking.tolist()
    # recalibrating the saved SAE aims each latent at the capacity of its rank
    held_out = sparse_activations(8192, seed=321, d_in=D_IN)
    calibrate_thresholds(loaded, held_out, show_progress=False)
    with torch.no_grad():
        fired = (loaded.encode(held_out) > 0).sum(0).double()
        positives = ((loaded.process_sae_in(held_out) @ loaded.W_enc + loaded.b_enc) > 0).sum(0)
    target = sae.calibration_target().densities * 8192
    # latents with more positive pre-activations than their target can meet it
    # exactly; the others fire on every positive value
    enough = positives > target
    assert int(enough.sum()) > D_SAE // 2
    torch.testing.assert_close(fired[~enough], positives[~enough].double())
    assert torch.corrcoef(torch.stack([fired, target]))[0, 1] > 0.95
    assert float((fired[enough] - target[enough].round()).abs().max()) <= 1


def test_thresholds_calibrated_by_the_user_are_what_gets_saved(tmp_path: Path) -> None:
    sae = trained("mutual_choice")
    held_out = sparse_activations(4096, seed=77, d_in=D_IN)
    calibrate_thresholds(sae, held_out, show_progress=False)
    expected = sae.threshold.detach().clone()
    sae.save_inference_model(tmp_path / "sae")
    saved = SAE.load_from_disk(tmp_path / "sae").threshold.double()
    torch.testing.assert_close(saved, expected.expand(D_SAE), rtol=1e-6, atol=1e-7)
    # a training step afterwards makes the kept recent tokens the source again
    train(sae, [sparse_activations(256, seed=1234, d_in=D_IN)])
    assert not torch.equal(sae.inference_thresholds(), expected.expand(D_SAE))


def test_loading_a_training_checkpoint_as_a_saved_sae_says_what_it_is(tmp_path: Path) -> None:
    sae = trained("feature_choice", n_steps=2)
    sae.save_model(tmp_path / "ckpt")  # what SAELens's trainer writes as a checkpoint
    with pytest.raises(ValueError, match=r"training checkpoint.*TrainingSAE\.load_from_disk"):
        SAE.load_from_disk(tmp_path / "ckpt")


def test_a_jumprelu_exported_by_0_1_0_keeps_its_settings(tmp_path: Path) -> None:
    # 0.1.0's export kept our config under metadata["sae_lens_choice_config"]
    sae = trained("mutual_choice", n_steps=3)
    sae.save_inference_model(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    metadata = cfg["metadata"]
    details = metadata.pop("training_architecture_details")
    metadata.pop("training_architecture")
    metadata["sae_lens_choice_config"] = {"architecture": "mutual_choice", "k": details["k"]}
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert choice_settings(loaded) == {"architecture": "mutual_choice", "k": 4}
    with torch.no_grad():
        acts = encode_batch(loaded, sparse_activations(100, seed=3, d_in=D_IN))
    assert int((acts > 0).sum()) <= 400


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("mutual_choice", {"allocation_score": "hidden_pre_over_input_norm"}),
        ("feature_choice", {"allocation_score": "hidden_pre_over_input_norm"}),
        ("feature_choice", {"capacity": "zipf", "capacity_order": "density_rank"}),
    ],
)
def test_encode_batch_follows_the_training_options(
    arch: str, options: dict[str, Any], tmp_path: Path
) -> None:
    from sae_lens_choice.allocation import rounding_offset

    sae = trained(arch, n_steps=12, **options)
    sae.eval()
    sae.save_inference_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    x = sparse_activations(300, seed=8, d_in=D_IN) * torch.linspace(0.2, 5, 300)[:, None]
    with torch.no_grad():
        expected = sae.encode(x)  # the training allocation, with this SAE's step's offset
        actual = encode_batch(loaded, x, offset=float(rounding_offset(int(sae.training_steps))))
    torch.testing.assert_close(actual > 0, expected > 0)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
