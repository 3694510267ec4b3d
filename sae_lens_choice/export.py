"""Export to SAELens's own ``jumprelu`` architecture, loadable without this plugin.

A Mutual or Feature Choice SAE in threshold mode *is* a JumpReLU SAE
(``relu(h) * (h > threshold)``) except that its ``hidden_pre`` may be rescaled
by the decoder row norms (``rescale_acts_by_decoder_norm``), which SAELens's
``JumpReLUSAE`` does not do. Folding the norms into the encoder first
(``W_enc * |W_dec|``, ``b_enc * |W_dec|``, ``W_dec / |W_dec|``) leaves
``hidden_pre``, the thresholds and the reconstruction unchanged, so the export
encodes and decodes identically (up to float rounding of the fold).

The exported config keeps our full original config in
``metadata["sae_lens_choice_config"]`` (``k``, capacities, ``inference_mode``,
...), so nothing is lost and :func:`sae_lens_choice.calibrate_thresholds` or
batch mode can be recovered from it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import (
    RUNNER_CFG_FILENAME,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
)
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAE, SAEMetadata, TrainingSAE

from sae_lens_choice.inference import FeatureChoiceSAE, MutualChoiceSAE

__all__ = [
    "METADATA_KEY",
    "export_jumprelu_cli",
    "export_jumprelu_dir",
    "to_jumprelu",
]

#: Metadata key under which the exported JumpReLU keeps our original config.
METADATA_KEY = "sae_lens_choice_config"

_ARCHITECTURES = ("mutual_choice", "feature_choice")


def _as_inference_sae(sae: SAE[Any]) -> MutualChoiceSAE | FeatureChoiceSAE:
    """The inference SAE itself, or the one a training SAE would save."""
    if isinstance(sae, (MutualChoiceSAE, FeatureChoiceSAE)):
        return sae
    arch = sae.cfg.architecture()
    if isinstance(sae, TrainingSAE) and arch in _ARCHITECTURES:
        # Exactly what save_inference_model writes, without the disk round trip.
        state_dict = {k: v.detach().clone() for k, v in sae.state_dict().items()}
        sae.process_state_dict_for_saving_inference(state_dict)
        cfg_dict = sae.cfg.get_inference_sae_cfg_dict()
        inference = SAE.from_dict(cfg_dict)
        inference.process_state_dict_for_loading(state_dict)
        inference.load_state_dict(state_dict)
        return inference.to(sae.W_enc.device)  # type: ignore[return-value]
    raise TypeError(
        "to_jumprelu needs a mutual_choice or feature_choice SAE, got "
        f"{type(sae).__name__} (architecture {arch!r})"
    )


def _choice_config_dict(sae: MutualChoiceSAE | FeatureChoiceSAE) -> dict[str, Any]:
    cfg = sae.cfg.to_dict()
    cfg.pop("metadata", None)
    return cfg


@torch.no_grad()
def to_jumprelu(sae: SAE[Any]) -> JumpReLUSAE:
    """SAELens ``JumpReLUSAE`` equal to ``sae`` in threshold mode.

    Works for ``MutualChoiceSAE`` and ``FeatureChoiceSAE`` (and their training
    SAEs, converted as ``save_inference_model`` would). Copies ``W_enc``,
    ``b_enc``, ``W_dec``, ``b_dec`` and ``threshold``, folding decoder norms
    into the encoder first when ``rescale_acts_by_decoder_norm`` (JumpReLU does
    not rescale; the fold leaves ``hidden_pre`` and the thresholds unchanged).
    The config keeps ``d_in``, ``d_sae``, ``dtype``, ``device``,
    ``apply_b_dec_to_input``, ``normalize_activations``,
    ``reshape_activations`` and the metadata, with our full config added as
    ``metadata["sae_lens_choice_config"]``. ``sae`` is not modified.

    Batch mode has no JumpReLU equivalent: the export is of threshold mode
    whatever ``cfg.inference_mode`` says.
    """
    src = _as_inference_sae(sae)
    cfg = src.cfg
    metadata = cfg.metadata.to_dict()
    metadata[METADATA_KEY] = _choice_config_dict(src)
    jump_cfg = JumpReLUSAEConfig(
        d_in=cfg.d_in,
        d_sae=cfg.d_sae,
        dtype=cfg.dtype,
        device=cfg.device,
        apply_b_dec_to_input=cfg.apply_b_dec_to_input,
        normalize_activations=cfg.normalize_activations,
        reshape_activations=cfg.reshape_activations,
        metadata=SAEMetadata(**json.loads(json.dumps(metadata))),
    )
    W_enc = src.W_enc.detach().clone()
    b_enc = src.b_enc.detach().clone()
    W_dec = src.W_dec.detach().clone()
    if cfg.rescale_acts_by_decoder_norm:
        # Fold in at least float32 (bf16 weights round once, at the end). Same
        # clamp as SAE.get_W_dec_norm, so a zero decoder row stays finite.
        dtype = W_enc.dtype
        wide = torch.promote_types(dtype, torch.float32)
        norms = W_dec.to(wide).norm(dim=-1).clamp(min=1e-8)  # (d_sae,)
        W_enc = (W_enc.to(wide) * norms[None, :]).to(dtype)
        b_enc = (b_enc.to(wide) * norms).to(dtype)
        W_dec = (W_dec.to(wide) / norms[:, None]).to(dtype)
    jump = JumpReLUSAE(jump_cfg)
    state = {
        "W_enc": W_enc,
        "b_enc": b_enc,
        "W_dec": W_dec,
        "b_dec": src.b_dec.detach().clone(),
        "threshold": src.threshold.detach().clone().to(W_enc.dtype),
    }
    jump.load_state_dict(state)
    return jump.to(device=src.W_enc.device, dtype=src.W_enc.dtype)


def _read_architecture(in_dir: Path) -> str:
    cfg_path = in_dir / SAE_CFG_FILENAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no SAE config at {cfg_path}")
    if not (in_dir / SAE_WEIGHTS_FILENAME).is_file():
        raise FileNotFoundError(f"no SAE weights at {in_dir / SAE_WEIGHTS_FILENAME}")
    with open(cfg_path) as f:
        arch = json.load(f).get("architecture")
    if arch not in _ARCHITECTURES:
        hint = " (it already is a JumpReLU SAE)" if arch == "jumprelu" else ""
        raise ValueError(
            f"{cfg_path} has architecture {arch!r}{hint}; export_jumprelu_dir converts "
            f"{' or '.join(_ARCHITECTURES)} SAEs"
        )
    return arch


@torch.no_grad()
def _check_same_outputs(ours: SAE[Any], jump: SAE[Any], n_tokens: int = 256) -> None:
    """Compare encode and forward on inputs at the scale of the decoder's outputs."""
    ours.cfg.inference_mode = "threshold"  # a fresh load: the export is of threshold mode
    generator = torch.Generator().manual_seed(0)
    device, dtype = ours.W_enc.device, ours.W_enc.dtype
    # Random sparse codes decoded by the SAE itself: inputs in its own range.
    codes = torch.rand(n_tokens, ours.cfg.d_sae, generator=generator)
    codes = codes * (torch.rand(n_tokens, ours.cfg.d_sae, generator=generator) < 0.05)
    x = (codes.to(device, dtype) @ ours.W_dec + ours.b_dec).to(dtype)
    for name in ("encode", "forward"):
        a = getattr(ours, name)(x).float()
        b = getattr(jump, name)(x).float()
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + float(x.abs().max()))):
            err = (a - b).abs().max().item()
            raise RuntimeError(f"exported JumpReLU {name} differs from the source (max {err})")


def export_jumprelu_dir(
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Convert a saved Mutual/Feature Choice SAE folder into a SAELens JumpReLU folder.

    Reads ``in_dir`` as SAELens writes it (``cfg.json``,
    ``sae_weights.safetensors``, optional ``sparsity.safetensors`` and
    ``runner_cfg.json``) and writes ``out_dir`` in the same format with
    ``architecture: "jumprelu"``, copying the optional files as they are. The
    result loads with ``SAE.load_from_disk(out_dir)`` or
    ``SAE.from_pretrained`` without ``sae_lens_choice`` installed; our original
    config is kept in ``metadata["sae_lens_choice_config"]``.

    Args:
        in_dir: folder of the source SAE.
        out_dir: folder to write; created if needed.
        overwrite: replace an existing SAE in ``out_dir`` (else
            ``FileExistsError``).
        verify: reload the written folder and check it encodes and decodes
            like the source on synthetic inputs (``RuntimeError`` if not).
            Skipped for 16-bit SAEs with ``rescale_acts_by_decoder_norm``,
            whose decoder-norm fold rounds.

    Returns:
        ``Path(out_dir)``.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    _read_architecture(in_dir)
    if out_dir.resolve() == in_dir.resolve():
        raise ValueError(f"out_dir must differ from in_dir ({in_dir})")
    if (out_dir / SAE_CFG_FILENAME).exists() and not overwrite:
        raise FileExistsError(
            f"{out_dir / SAE_CFG_FILENAME} already exists; pass overwrite=True to replace it"
        )
    src = SAE.load_from_disk(in_dir)
    jump = to_jumprelu(src)
    out_dir.mkdir(parents=True, exist_ok=True)
    jump.save_model(out_dir)
    for name in (SPARSITY_FILENAME, RUNNER_CFG_FILENAME):
        if (in_dir / name).is_file():
            shutil.copyfile(in_dir / name, out_dir / name)
        elif (out_dir / name).exists() and overwrite:
            (out_dir / name).unlink()  # stale file of the SAE we replaced
    # With 16-bit weights the decoder-norm fold rounds, so a pre-activation at a
    # threshold may flip: compare only where the export is exact up to float32 noise.
    exact = src.W_enc.dtype in (torch.float32, torch.float64) or not (
        src.cfg.rescale_acts_by_decoder_norm
    )
    if verify and exact:
        _check_same_outputs(src, SAE.load_from_disk(out_dir))
    return out_dir


def export_jumprelu_cli(args: list[str]) -> int:
    """``sae-lens-choice export-jumprelu IN_DIR OUT_DIR [--overwrite] [--no-verify]``.

    Returns the process exit status (0 on success, 1 on an error, which is
    printed to stderr).
    """
    parser = argparse.ArgumentParser(
        prog="sae-lens-choice export-jumprelu",
        description=(
            "Convert a saved mutual_choice / feature_choice SAE folder into SAELens's "
            "jumprelu format (identical outputs in threshold mode; loads without "
            "sae_lens_choice)."
        ),
    )
    parser.add_argument("in_dir", type=Path, help="folder with cfg.json + sae_weights.safetensors")
    parser.add_argument("out_dir", type=Path, help="folder to write the JumpReLU SAE to")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing SAE")
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip reloading the export and comparing its outputs with the source",
    )
    opts = parser.parse_args(args)
    try:
        out = export_jumprelu_dir(
            opts.in_dir, opts.out_dir, overwrite=opts.overwrite, verify=opts.verify
        )
    except (FileNotFoundError, FileExistsError, ValueError, TypeError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote JumpReLU SAE to {out}")
    return 0
