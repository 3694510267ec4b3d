"""Conversion to SAELens's jumprelu: ``to_jumprelu`` and ``export-jumprelu`` for 0.1.0 folders.

Training SAEs save as ``jumprelu`` themselves (``test_saving.py``);
``to_jumprelu`` gives the same JumpReLU in memory, and converts 0.1.0
inference SAEs. ``export_jumprelu_dir`` / ``sae-lens-choice export-jumprelu``
convert 0.1.0 folders, verifying before anything lands in place: a failed
export leaves nothing behind and never damages an existing output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, JumpReLUSAE
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import load_file, save_file

from sae_lens_choice import calibrate_thresholds, encode_batch, to_jumprelu
from sae_lens_choice import export as export_module
from sae_lens_choice.export import export_jumprelu_cli, export_jumprelu_dir
from tests.helpers import (
    ARCHS,
    make_calibrated_legacy_sae,
    make_trained_sae,
    run_python,
    save_legacy_folder,
    sparse_activations,
)

D_IN, D_SAE = 16, 64
METADATA = SAEMetadata(hook_name="blocks.3.hook_resid_post", model_name="tiny", context_size=16)


def legacy_kwargs(arch: str, rescale: bool, seed: int = 0) -> dict[str, Any]:
    """A 0.1.0 SAE far from unit decoder norms, calibrated on activations it fires on."""
    kwargs: dict[str, Any] = {
        "seed": seed,
        "b_enc": 0.5,
        "rescale_acts_by_decoder_norm": rescale,
        "metadata": METADATA,
    }
    if arch == "feature_choice":
        kwargs.update(capacity="zipf", zipf_alpha=0.8)
    return kwargs


def legacy(arch: str, rescale: bool, seed: int = 0) -> Any:
    return make_calibrated_legacy_sae(
        arch, data_seed=seed + 1, **legacy_kwargs(arch, rescale, seed)
    )


def assert_same_outputs(ours: SAE[Any], theirs: SAE[Any], x: torch.Tensor) -> None:
    with torch.no_grad():
        acts = ours.encode(x)
        torch.testing.assert_close(theirs.encode(x), acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(acts), ours.decode(acts), rtol=1e-5, atol=1e-5)
    assert (acts > 0).sum() > 0  # the comparison is not vacuous


def entries(folder: Path) -> list[str]:
    """Everything in ``folder``, hidden names included (temporary folders are hidden)."""
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------
# to_jumprelu
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rescale", [False, True])
def test_to_jumprelu_of_a_0_1_0_sae_gives_identical_outputs(arch: str, rescale: bool) -> None:
    sae = legacy(arch, rescale)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    jump = to_jumprelu(sae)
    assert type(jump) is JumpReLUSAE
    assert jump.cfg.architecture() == "jumprelu"
    assert_same_outputs(sae, jump, sparse_activations(1024, seed=5))
    for name, tensor in sae.state_dict().items():  # the source is untouched
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)
    if rescale:  # JumpReLU has no rescaling: the norms were folded in
        torch.testing.assert_close(jump.W_dec.norm(dim=-1), torch.ones(D_SAE))
    else:
        torch.testing.assert_close(jump.W_enc, sae.W_enc, rtol=0, atol=0)
        torch.testing.assert_close(jump.threshold, sae.threshold, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_to_jumprelu_keeps_metadata_and_training_settings(arch: str) -> None:
    sae = legacy(arch, rescale=True)
    sae.cfg.inference_mode = "batch"
    jump = to_jumprelu(sae)
    metadata = jump.cfg.metadata
    assert metadata.hook_name == "blocks.3.hook_resid_post"
    assert metadata.model_name == "tiny"
    # SAELens's own keys for what a trained SAE was trained as
    assert metadata["training_architecture"] == arch
    details = metadata["training_architecture_details"]
    expected = sae.cfg.to_dict()
    for key in ("metadata", "architecture"):
        expected.pop(key)
    assert details == json.loads(json.dumps(expected))
    assert details["k"] == 4
    assert details["inference_mode"] == "batch" and details["rescale_acts_by_decoder_norm"] is True
    if arch == "feature_choice":
        assert (details["capacity"], details["zipf_alpha"]) == ("zipf", 0.8)
    # the export is of threshold mode whatever the source's mode
    sae.cfg.inference_mode = "threshold"
    assert_same_outputs(sae, jump, sparse_activations(256, seed=6))


@pytest.mark.parametrize("arch", ARCHS)
def test_to_jumprelu_of_a_training_sae_is_what_it_saves(arch: str, tmp_path: Path) -> None:
    train_sae = make_trained_sae(arch, n_steps=10, rescale_acts_by_decoder_norm=True)
    jump = to_jumprelu(train_sae)
    assert type(jump) is JumpReLUSAE
    train_sae.save_inference_model(tmp_path)
    saved = SAE.load_from_disk(tmp_path)
    torch.testing.assert_close(jump.threshold, saved.threshold, rtol=0, atol=0)
    assert jump.cfg.metadata["training_architecture"] == arch
    assert_same_outputs(saved, jump, sparse_activations(512, seed=8))
    assert train_sae.training  # converting changed nothing


def test_to_jumprelu_rejects_other_architectures_and_non_finite_saes() -> None:
    jump = to_jumprelu(legacy("mutual_choice", False))
    with pytest.raises(TypeError, match="mutual_choice or feature_choice"):
        to_jumprelu(jump)
    sae = legacy("feature_choice", False)
    with torch.no_grad():
        sae.b_dec[3] = float("nan")
    with pytest.raises(ValueError, match="b_dec holds NaN or inf"):
        to_jumprelu(sae)


# ---------------------------------------------------------------------------
# export-jumprelu of 0.1.0 folders
# ---------------------------------------------------------------------------

_CHILD = """
import sys
from safetensors.torch import load_file, save_file
from sae_lens import SAE

out = {}
for name in sys.argv[2:]:
    sae = SAE.load_from_disk(f"{sys.argv[1]}/{name}")
    assert type(sae).__name__ == "JumpReLUSAE", type(sae)
    x = load_file(f"{sys.argv[1]}/inputs.safetensors")["x"]
    out[f"{name}.encode"] = sae.encode(x).detach()
    out[f"{name}.forward"] = sae(x).detach()
    out[f"{name}.k"] = sae.cfg.metadata["training_architecture_details"]["k"] * x.new_ones(())
assert "sae_lens_choice" not in sys.modules, "the plugin was imported"
save_file(out, f"{sys.argv[1]}/outputs.safetensors")
"""


def test_exported_0_1_0_folders_load_without_the_plugin(tmp_path: Path) -> None:
    x = sparse_activations(512, seed=9)
    save_file({"x": x}, tmp_path / "inputs.safetensors")
    sources: dict[str, SAE[Any]] = {}
    for arch in ARCHS:
        for rescale in (False, True):
            name = f"{arch}-{'rescale' if rescale else 'plain'}"
            src = tmp_path / "src" / name
            sae = save_legacy_folder(
                src, arch, calibrate_on=sparse_activations(2048, seed=1),
                **legacy_kwargs(arch, rescale),
            )  # fmt: skip
            if arch == "feature_choice":  # a sparsity file travels along
                save_file({"sparsity": torch.randn(D_SAE)}, src / "sparsity.safetensors")
            out = export_jumprelu_dir(src, tmp_path / name)
            assert out == tmp_path / name
            cfg = json.loads((out / "cfg.json").read_text())
            assert cfg["architecture"] == "jumprelu"
            assert cfg["metadata"]["training_architecture"] == arch
            assert set(load_file(out / "sae_weights.safetensors")) == {
                "W_enc", "b_enc", "W_dec", "b_dec", "threshold"
            }  # fmt: skip
            sources[name] = sae
    fc = "feature_choice-plain"
    assert (tmp_path / fc / "sparsity.safetensors").read_bytes() == (
        tmp_path / "src" / fc / "sparsity.safetensors"
    ).read_bytes()
    assert not (tmp_path / "mutual_choice-plain" / "sparsity.safetensors").exists()

    # A fresh interpreter that never imports sae_lens_choice.
    run_python(_CHILD, tmp_path, *sources, cwd=tmp_path)
    outputs = load_file(tmp_path / "outputs.safetensors")
    with torch.no_grad():
        for name, sae in sources.items():
            torch.testing.assert_close(
                outputs[f"{name}.encode"], sae.encode(x), rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(outputs[f"{name}.forward"], sae(x), rtol=1e-5, atol=1e-5)
            assert outputs[f"{name}.k"].item() == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_an_exported_folder_still_calibrates_and_encodes_in_batch_mode(
    arch: str, tmp_path: Path
) -> None:
    # The settings travel in the metadata: calibration and batch mode on the
    # export match those on the 0.1.0 source (hidden_pre is fold-invariant).
    sae = save_legacy_folder(tmp_path / "src", arch, **legacy_kwargs(arch, rescale=True))
    export_jumprelu_dir(tmp_path / "src", tmp_path / "out")
    jump = SAE.load_from_disk(tmp_path / "out")
    held_out = sparse_activations(4096, seed=10)
    calibrate_thresholds(sae, held_out, show_progress=False)
    calibrate_thresholds(jump, held_out, show_progress=False)
    torch.testing.assert_close(jump.threshold, sae.threshold, rtol=1e-5, atol=1e-6)
    x = sparse_activations(256, seed=11)
    with torch.no_grad():
        torch.testing.assert_close(
            encode_batch(jump, x), encode_batch(sae, x), rtol=1e-5, atol=1e-5
        )


def test_export_dir_errors_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_legacy_folder(src, "mutual_choice", **legacy_kwargs("mutual_choice", rescale=True))
    assert export_jumprelu_cli([str(src), str(dst)]) == 0
    assert "wrote JumpReLU SAE" in capsys.readouterr().out
    # refuses to overwrite unless asked
    with pytest.raises(FileExistsError, match="overwrite"):
        export_jumprelu_dir(src, dst)
    assert export_jumprelu_cli([str(src), str(dst)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert export_jumprelu_cli([str(src), str(dst), "--overwrite", "--no-verify"]) == 0
    # a JumpReLU folder is not ours to convert
    with pytest.raises(ValueError, match="already is a JumpReLU"):
        export_jumprelu_dir(dst, tmp_path / "again")
    with pytest.raises(FileNotFoundError, match=r"cfg\.json"):
        export_jumprelu_dir(tmp_path / "nowhere", tmp_path / "x")
    with pytest.raises(ValueError, match="differ"):
        export_jumprelu_dir(src, src)
    assert entries(tmp_path) == ["dst", "src"]


def test_bfloat16_export_without_rescaling_is_bit_exact(tmp_path: Path) -> None:
    sae = legacy("feature_choice", rescale=False).to(torch.bfloat16)
    sae.cfg.dtype = "bfloat16"
    jump = to_jumprelu(sae)
    assert jump.W_enc.dtype == torch.bfloat16
    x = sparse_activations(256, seed=12).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(jump.encode(x), sae.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(jump(x), sae(x), rtol=0, atol=0)
    sae.save_model(tmp_path / "src")
    export_jumprelu_dir(tmp_path / "src", tmp_path / "dst")  # verified on reload
    assert SAE.load_from_disk(tmp_path / "dst").W_enc.dtype == torch.bfloat16


# ---------------------------------------------------------------------------
# a failed export leaves nothing (issue 11, item 7)
# ---------------------------------------------------------------------------


def test_export_of_a_nan_source_writes_nothing_and_a_rerun_is_not_blocked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    sae = save_legacy_folder(src, "feature_choice", **legacy_kwargs("feature_choice", False))
    weights = load_file(src / "sae_weights.safetensors")
    good_W_enc = weights["W_enc"].clone()
    weights["W_enc"][2, 7] = float("nan")  # one NaN weight
    save_file(weights, src / "sae_weights.safetensors")

    assert export_jumprelu_cli([str(src), str(dst)]) == 1
    assert "W_enc holds NaN or inf" in capsys.readouterr().err
    assert entries(tmp_path) == ["src"]  # no output, no temporary folder

    # the source fixed, the same command runs: nothing was left to block it
    weights["W_enc"] = good_W_enc
    save_file(weights, src / "sae_weights.safetensors")
    assert export_jumprelu_cli([str(src), str(dst)]) == 0
    assert entries(tmp_path) == ["dst", "src"]
    assert_same_outputs(sae, SAE.load_from_disk(dst), sparse_activations(256, seed=13))


def _fail_on_call(
    monkeypatch: pytest.MonkeyPatch, failing_call: int, message: str = "injected mismatch"
) -> list[int]:
    """Make the ``failing_call``-th output comparison of the export fail (1: in memory,
    2: after reloading the written folder); returns the list of calls seen."""
    calls: list[int] = []
    real = export_module._check_same_outputs

    def check(ours: SAE[Any], jump: SAE[Any], n_tokens: int = 256) -> None:
        calls.append(len(calls) + 1)
        if len(calls) == failing_call:
            raise RuntimeError(f"exported JumpReLU encode differs from the source ({message})")
        real(ours, jump, n_tokens)

    monkeypatch.setattr(export_module, "_check_same_outputs", check)
    return calls


@pytest.mark.parametrize("failing_call", [1, 2], ids=["in-memory", "after-reload"])
def test_a_failed_verification_leaves_no_output_and_no_temporary_folder(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failing_call: int,
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_legacy_folder(src, "mutual_choice", **legacy_kwargs("mutual_choice", rescale=True))
    calls = _fail_on_call(monkeypatch, failing_call)
    assert export_jumprelu_cli([str(src), str(dst)]) == 1
    assert "differs from the source" in capsys.readouterr().err
    assert calls == list(range(1, failing_call + 1))
    assert entries(tmp_path) == ["src"]
    monkeypatch.undo()
    assert export_jumprelu_cli([str(src), str(dst)]) == 0  # and a re-run is not blocked


def test_overwrite_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old_src, new_src, dst = tmp_path / "old", tmp_path / "new", tmp_path / "dst"
    save_legacy_folder(old_src, "mutual_choice", **legacy_kwargs("mutual_choice", False, seed=1))
    new = save_legacy_folder(
        new_src, "feature_choice", **legacy_kwargs("feature_choice", False, seed=2)
    )
    export_jumprelu_dir(old_src, dst)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}

    # the new folder fails verification after it was written: the old one stays
    _fail_on_call(monkeypatch, failing_call=2)
    with pytest.raises(RuntimeError, match="differs"):
        export_jumprelu_dir(new_src, dst, overwrite=True)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert entries(tmp_path) == ["dst", "new", "old"]

    # writing itself fails (a full disk, say), half way through: the old one stays
    monkeypatch.undo()

    def save_half(self: JumpReLUSAE, path: str | Path) -> Any:
        Path(path, "cfg.json").write_text("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(JumpReLUSAE, "save_model", save_half)
    with pytest.raises(OSError, match="No space left"):
        export_jumprelu_dir(new_src, dst, overwrite=True)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert entries(tmp_path) == ["dst", "new", "old"]

    # a successful overwrite replaces the folder and leaves nothing beside it
    monkeypatch.undo()
    export_jumprelu_dir(new_src, dst, overwrite=True)
    assert entries(tmp_path) == ["dst", "new", "old"]
    assert json.loads((dst / "cfg.json").read_text())["metadata"]["training_architecture"] == (
        "feature_choice"
    )
    assert_same_outputs(new, SAE.load_from_disk(dst), sparse_activations(256, seed=14))


def test_overwrite_puts_the_old_folder_back_when_the_final_move_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_src, new_src, dst = tmp_path / "old", tmp_path / "new", tmp_path / "dst"
    save_legacy_folder(old_src, "mutual_choice", **legacy_kwargs("mutual_choice", False, seed=1))
    save_legacy_folder(new_src, "mutual_choice", **legacy_kwargs("mutual_choice", False, seed=2))
    export_jumprelu_dir(old_src, dst)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    real_rename = Path.rename

    def rename(self: Path, target: Any) -> Path:
        # the staging folder (".dst.<random>") moving onto dst fails
        if self.name.startswith(".dst.") and ".old." not in self.name and Path(target) == dst:
            raise OSError(5, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="Input/output"):
        export_jumprelu_dir(new_src, dst, overwrite=True)
    monkeypatch.undo()
    assert entries(tmp_path) == ["dst", "new", "old"]
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
