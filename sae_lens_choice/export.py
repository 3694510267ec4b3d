"""Conversion to SAELens's own ``jumprelu`` architecture.

Training SAEs of this package already save as ``jumprelu``
(``save_inference_model``). This module converts what 0.1.0 saved
(``"architecture": "mutual_choice"`` / ``"feature_choice"``) so it loads
without this package, and gives the JumpReLU of any Choice SAE in memory.

A Choice SAE in threshold mode *is* a JumpReLU SAE (``relu(h) * (h >
threshold)``) except that its ``hidden_pre`` may be rescaled by the decoder
row norms (``rescale_acts_by_decoder_norm``), which SAELens's ``JumpReLUSAE``
does not do. Folding the norms into the encoder first (``W_enc * |W_dec|``,
``b_enc * |W_dec|``, ``W_dec / |W_dec|``) leaves ``hidden_pre``, the thresholds
and the reconstruction unchanged, so the export encodes and decodes
identically (up to float rounding of the fold). The training settings go into
``metadata["training_architecture"]`` and
``metadata["training_architecture_details"]``, as SAELens writes them for every
trained SAE, so :func:`sae_lens_choice.calibrate_thresholds` and
:func:`sae_lens_choice.encode_batch` work on the result.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
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
from sae_lens.saes.sae import SAE, SAEMetadata

from sae_lens_choice.choice_base import CHOICE_ARCHITECTURES, ChoiceSAE, ChoiceTrainingSAE

__all__ = ["export_jumprelu_cli", "export_jumprelu_dir", "to_jumprelu"]


def _from_training_sae(sae: ChoiceTrainingSAE) -> JumpReLUSAE:
    # Exactly what save_inference_model writes, without the disk round trip.
    state_dict = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state_dict)
    jump = SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    assert isinstance(jump, JumpReLUSAE)
    jump.load_state_dict(state_dict)
    return jump.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)


def _from_legacy_sae(src: ChoiceSAE) -> JumpReLUSAE:
    cfg = src.cfg
    details = {k: v for k, v in cfg.to_dict().items() if k not in ("metadata", "architecture")}
    metadata = {
        **cfg.metadata.to_dict(),
        "training_architecture": cfg.architecture(),
        "training_architecture_details": details,
    }
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
    jump.load_state_dict(
        {
            "W_enc": W_enc,
            "b_enc": b_enc,
            "W_dec": W_dec,
            "b_dec": src.b_dec.detach().clone(),
            "threshold": src.threshold.detach().clone().to(W_enc.dtype),
        }
    )
    return jump.to(device=src.W_enc.device, dtype=src.W_enc.dtype)


@torch.no_grad()
def to_jumprelu(sae: SAE[Any]) -> JumpReLUSAE:
    """SAELens ``JumpReLUSAE`` equal to ``sae`` in threshold mode; ``sae`` is not modified.

    - A training SAE of this package: the JumpReLU ``save_inference_model``
      would write (thresholds calibrated on its recent training tokens).
    - A 0.1.0 inference SAE (``MutualChoiceSAE``/``FeatureChoiceSAE``): copies
      ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` and ``threshold``, folding the
      decoder norms into the encoder first when ``rescale_acts_by_decoder_norm``.
      Batch mode has no JumpReLU equivalent: the export is of threshold mode
      whatever ``cfg.inference_mode`` says.

    Raises:
        TypeError: any other SAE.
        ValueError: the SAE's weights or thresholds hold NaN or inf.
    """
    for name, tensor in sae.state_dict().items():
        if name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold") and not bool(
            torch.isfinite(tensor).all()
        ):
            raise ValueError(f"cannot export: {name} holds NaN or inf")
    if isinstance(sae, ChoiceTrainingSAE):
        return _from_training_sae(sae)
    if isinstance(sae, ChoiceSAE):
        return _from_legacy_sae(sae)
    raise TypeError(
        "to_jumprelu needs a mutual_choice or feature_choice SAE, got "
        f"{type(sae).__name__} (architecture {sae.cfg.architecture()!r})"
    )


def _read_architecture(in_dir: Path) -> str:
    cfg_path = in_dir / SAE_CFG_FILENAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no SAE config at {cfg_path}")
    if not (in_dir / SAE_WEIGHTS_FILENAME).is_file():
        raise FileNotFoundError(f"no SAE weights at {in_dir / SAE_WEIGHTS_FILENAME}")
    with open(cfg_path) as f:
        arch = json.load(f).get("architecture")
    if arch not in CHOICE_ARCHITECTURES:
        hint = " (it already is a JumpReLU SAE)" if arch == "jumprelu" else ""
        raise ValueError(
            f"{cfg_path} has architecture {arch!r}{hint}; export_jumprelu_dir converts "
            f"{' or '.join(CHOICE_ARCHITECTURES)} SAEs saved by sae-lens-choice 0.1.0"
        )
    return arch


@torch.no_grad()
def _check_same_outputs(ours: SAE[Any], jump: SAE[Any], n_tokens: int = 256) -> None:
    """Compare encode and forward on inputs at the scale of the decoder's outputs."""
    if isinstance(ours, ChoiceSAE):
        ours.cfg.inference_mode = "threshold"  # the export is of threshold mode
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
    """Convert a folder saved by 0.1.0 into a SAELens ``jumprelu`` folder.

    Reads ``in_dir`` as SAELens writes it (``cfg.json``,
    ``sae_weights.safetensors``, optional ``sparsity.safetensors`` and
    ``runner_cfg.json``) and writes ``out_dir`` in the same format with
    ``architecture: "jumprelu"``, copying the optional files as they are.
    ``in_dir`` is never modified.

    Nothing is written unless the export is right: the JumpReLU is compared
    with the source in memory first, written into a temporary folder beside
    ``out_dir``, reloaded from there and compared again, and only then moved
    into place. A failed export leaves ``out_dir`` as it was.

    Args:
        in_dir: folder of the source SAE.
        out_dir: folder to write.
        overwrite: replace an existing SAE in ``out_dir`` (else
            ``FileExistsError``).
        verify: compare outputs (``RuntimeError`` if they differ). Skipped
            for 16-bit SAEs with ``rescale_acts_by_decoder_norm``, whose
            decoder-norm fold rounds.

    Returns:
        ``Path(out_dir)``.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    _read_architecture(in_dir)
    if out_dir.resolve() == in_dir.resolve():
        raise ValueError(f"out_dir must differ from in_dir ({in_dir})")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    src = SAE.load_from_disk(in_dir)
    jump = to_jumprelu(src)
    # With 16-bit weights the decoder-norm fold rounds, so a pre-activation at a
    # threshold may flip: compare only where the export is exact up to float32 noise.
    exact = src.W_enc.dtype in (torch.float32, torch.float64) or not (
        getattr(src.cfg, "rescale_acts_by_decoder_norm", False)
    )
    verify = verify and exact
    if verify:
        _check_same_outputs(src, jump)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        jump.save_model(staging)
        for name in (SPARSITY_FILENAME, RUNNER_CFG_FILENAME):
            if (in_dir / name).is_file():
                shutil.copyfile(in_dir / name, staging / name)
        if verify:
            _check_same_outputs(src, SAE.load_from_disk(staging))
        if out_dir.exists():
            # replace: move the old folder aside first, so it survives a failed move
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            old.rmdir()
            out_dir.rename(old)
            try:
                staging.rename(out_dir)
            except BaseException:
                old.rename(out_dir)  # put the previous SAE back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def export_jumprelu_cli(args: list[str]) -> int:
    """``sae-lens-choice export-jumprelu IN_DIR OUT_DIR [--overwrite] [--no-verify]``.

    Returns the process exit status (0 on success, 1 on an error, which is
    printed to stderr).
    """
    parser = argparse.ArgumentParser(
        prog="sae-lens-choice export-jumprelu",
        description=(
            "Convert a mutual_choice / feature_choice SAE folder saved by sae-lens-choice "
            "0.1.0 into SAELens's jumprelu format (identical outputs in threshold mode; "
            "loads without sae_lens_choice). SAEs trained with 0.2 are saved as jumprelu "
            "already."
        ),
    )
    parser.add_argument("in_dir", type=Path, help="folder with cfg.json + sae_weights.safetensors")
    parser.add_argument("out_dir", type=Path, help="folder to write the JumpReLU SAE to")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing SAE")
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip comparing the export's outputs with the source",
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
