"""Export to SAELens's jumprelu architecture: equal outputs, loadable without the plugin."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, JumpReLUSAE
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
    to_jumprelu,
)
from sae_lens_choice.export import METADATA_KEY, export_jumprelu_cli, export_jumprelu_dir

D_IN, D_SAE = 16, 64
BOTH = ["mutual_choice", "feature_choice"]
REPO_ROOT = Path(__file__).resolve().parents[1]


def activations(n_tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(96, D_IN, generator=torch.Generator().manual_seed(99))
    codes = (torch.rand(n_tokens, 96, generator=g) < 0.06) * torch.rand(n_tokens, 96, generator=g)
    return 2 * codes @ dictionary + 0.05 * torch.randn(n_tokens, D_IN, generator=g)


def make_sae(arch: str, rescale: bool, seed: int = 0) -> MutualChoiceSAE | FeatureChoiceSAE:
    metadata = SAEMetadata(hook_name="blocks.3.hook_resid_post", model_name="tiny", context_size=16)
    common: dict[str, Any] = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "k": 4,
        "rescale_acts_by_decoder_norm": rescale,
        "metadata": metadata,
    }
    sae: Any = (
        MutualChoiceSAE(MutualChoiceSAEConfig(**common))
        if arch == "mutual_choice"
        else FeatureChoiceSAE(FeatureChoiceSAEConfig(**common, capacity="zipf", zipf_alpha=0.8))
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) / math.sqrt(D_IN))
        sae.b_enc.copy_(0.5 + 0.1 * torch.randn(D_SAE, generator=g))
        W_dec = torch.randn(D_SAE, D_IN, generator=g)
        norms = 0.3 + 2 * torch.rand(D_SAE, 1, generator=g)  # far from unit norm
        sae.W_dec.copy_(W_dec / W_dec.norm(dim=-1, keepdim=True) * norms)
        sae.b_dec.copy_(0.1 * torch.randn(D_IN, generator=g))
    calibrate_thresholds(sae, activations(2048, seed=seed + 1), show_progress=False)
    return sae


def assert_same_outputs(ours: SAE[Any], theirs: SAE[Any], x: torch.Tensor) -> None:
    with torch.no_grad():
        acts = ours.encode(x)
        torch.testing.assert_close(theirs.encode(x), acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(acts), ours.decode(acts), rtol=1e-5, atol=1e-5)
    assert (acts > 0).sum() > 0  # the comparison is not vacuous


@pytest.mark.parametrize("arch", BOTH)
@pytest.mark.parametrize("rescale", [False, True])
def test_to_jumprelu_gives_identical_outputs(arch: str, rescale: bool) -> None:
    sae = make_sae(arch, rescale)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    jump = to_jumprelu(sae)
    assert type(jump) is JumpReLUSAE
    assert jump.cfg.architecture() == "jumprelu"
    assert_same_outputs(sae, jump, activations(1024, seed=5))
    for name, tensor in sae.state_dict().items():  # the source is untouched
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)
    if rescale:  # JumpReLU has no rescaling: the norms were folded in
        torch.testing.assert_close(jump.W_dec.norm(dim=-1), torch.ones(D_SAE))
    else:
        torch.testing.assert_close(jump.W_enc, sae.W_enc, rtol=0, atol=0)
        torch.testing.assert_close(jump.threshold, sae.threshold, rtol=0, atol=0)


@pytest.mark.parametrize("arch", BOTH)
def test_to_jumprelu_keeps_metadata_and_our_config(arch: str) -> None:
    sae = make_sae(arch, rescale=True)
    sae.cfg.inference_mode = "batch"
    jump = to_jumprelu(sae)
    assert jump.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert jump.cfg.metadata.model_name == "tiny"
    kept = jump.cfg.metadata[METADATA_KEY]
    expected = sae.cfg.to_dict()
    expected.pop("metadata")
    assert kept == json.loads(json.dumps(expected))
    assert kept["architecture"] == arch and kept["k"] == 4
    assert kept["inference_mode"] == "batch" and kept["rescale_acts_by_decoder_norm"] is True
    # the export is of threshold mode whatever the source's mode
    sae.cfg.inference_mode = "threshold"
    assert_same_outputs(sae, jump, activations(256, seed=6))


@pytest.mark.parametrize("arch", BOTH)
def test_to_jumprelu_accepts_training_saes(arch: str, tmp_path: Path) -> None:
    common: dict[str, Any] = {"d_in": D_IN, "d_sae": D_SAE, "k": 4, "aux_loss": "none"}
    common["rescale_acts_by_decoder_norm"] = True
    train: Any = (
        MutualChoiceTrainingSAE(MutualChoiceTrainingSAEConfig(**common))
        if arch == "mutual_choice"
        else FeatureChoiceTrainingSAE(FeatureChoiceTrainingSAEConfig(**common))
    )
    with torch.no_grad():
        train.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None])
    calibrate_thresholds(train, activations(1024, seed=7), show_progress=False)
    jump = to_jumprelu(train)
    train.save_inference_model(tmp_path)
    assert_same_outputs(SAE.load_from_disk(tmp_path), jump, activations(512, seed=8))


def test_to_jumprelu_rejects_other_architectures() -> None:
    with pytest.raises(TypeError, match="mutual_choice or feature_choice"):
        to_jumprelu(to_jumprelu(make_sae("mutual_choice", False)))


_CHILD = textwrap.dedent(
    """
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
        out[f"{name}.k"] = sae.cfg.metadata["sae_lens_choice_config"]["k"] * x.new_ones(())
    assert "sae_lens_choice" not in sys.modules, "the plugin was imported"
    save_file(out, f"{sys.argv[1]}/outputs.safetensors")
    """
)


def test_exported_dirs_load_without_the_plugin(tmp_path: Path) -> None:
    x = activations(512, seed=9)
    save_file({"x": x}, tmp_path / "inputs.safetensors")
    sources: dict[str, SAE[Any]] = {}
    for arch in BOTH:
        for rescale in (False, True):
            name = f"{arch}-{'rescale' if rescale else 'plain'}"
            sae = make_sae(arch, rescale)
            sae.save_model(tmp_path / "src" / name)
            if arch == "feature_choice":  # a sparsity file travels along
                save_file(
                    {"sparsity": torch.randn(D_SAE)},
                    tmp_path / "src" / name / "sparsity.safetensors",
                )
            out = export_jumprelu_dir(tmp_path / "src" / name, tmp_path / name)
            assert out == tmp_path / name
            cfg = json.loads((out / "cfg.json").read_text())
            assert cfg["architecture"] == "jumprelu"
            assert cfg["metadata"][METADATA_KEY]["architecture"] == arch
            assert set(load_file(out / "sae_weights.safetensors")) == {
                "W_enc", "b_enc", "W_dec", "b_dec", "threshold"
            }  # fmt: skip
            sources[name] = sae
    fc = "feature_choice-plain"
    assert (tmp_path / fc / "sparsity.safetensors").read_bytes() == (
        tmp_path / "src" / fc / "sparsity.safetensors"
    ).read_bytes()
    assert not (tmp_path / "mutual_choice-plain" / "sparsity.safetensors").exists()

    # A fresh interpreter that never imports sae_lens_choice (run from a
    # directory where the package is not importable by accident either).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), *sources],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = load_file(tmp_path / "outputs.safetensors")
    with torch.no_grad():
        for name, sae in sources.items():
            torch.testing.assert_close(
                outputs[f"{name}.encode"], sae.encode(x), rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(outputs[f"{name}.forward"], sae(x), rtol=1e-5, atol=1e-5)
            assert outputs[f"{name}.k"].item() == 4


def test_export_dir_errors_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_sae("mutual_choice", rescale=True).save_model(src)
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


def test_bfloat16_export_without_rescaling_is_bit_exact(tmp_path: Path) -> None:
    sae = make_sae("feature_choice", rescale=False).to(torch.bfloat16)
    sae.cfg.dtype = "bfloat16"
    jump = to_jumprelu(sae)
    assert jump.W_enc.dtype == torch.bfloat16
    x = activations(256, seed=10).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(jump.encode(x), sae.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(jump(x), sae(x), rtol=0, atol=0)
    sae.save_model(tmp_path / "src")
    export_jumprelu_dir(tmp_path / "src", tmp_path / "dst")  # verified on reload
    assert SAE.load_from_disk(tmp_path / "dst").W_enc.dtype == torch.bfloat16
