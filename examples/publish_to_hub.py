"""Publish Mutual / Feature Choice SAEs to the Hugging Face Hub with SAELens's uploader.

A SAE trained with sae-lens-choice is saved as SAELens's own ``jumprelu``
architecture (the runner's ``output_path`` folder, or
``sae.save_inference_model(path)``), so it loads with plain SAELens and is
published as SAELens publishes any SAE. This script checks each folder first
(it loads, its weights are finite), converts folders saved by
sae-lens-choice 0.1.0 (``"architecture": "mutual_choice"`` /
``"feature_choice"``) to ``jumprelu`` on the way so they load anywhere too,
and uploads. Log in first (``hf auth login`` or ``HF_TOKEN``), then::

    python examples/publish_to_hub.py --repo-id you/gpt2-choice-saes \\
        --sae blocks.6.hook_resid_post-mc=output/mc \\
        --sae blocks.6.hook_resid_post-fc=output/fc

Anyone can load them back, with or without this package::

    from sae_lens import SAE
    sae = SAE.from_pretrained("you/gpt2-choice-saes", "blocks.6.hook_resid_post-mc")

The training settings travel in ``sae.cfg.metadata``, so with
``sae_lens_choice`` installed ``encode_batch(sae, x)`` gives the exact
training allocation over a batch and ``calibrate_thresholds(sae, batches)``
recalibrates the thresholds on your own activations.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, upload_saes_to_huggingface

# registers mutual_choice / feature_choice, which loading a 0.1.0 folder needs
from sae_lens_choice.export import export_jumprelu_dir

#: Architectures sae-lens-choice 0.1.0 saved; converted to jumprelu before upload.
LEGACY_ARCHITECTURES = ("mutual_choice", "feature_choice")


def parse_sae_spec(spec: str) -> tuple[str, Path]:
    """``SAE_ID=FOLDER`` -> (sae_id, folder)."""
    sae_id, sep, folder = spec.partition("=")
    if not sep or not sae_id or not folder:
        raise argparse.ArgumentTypeError(f"expected SAE_ID=FOLDER, got {spec!r}")
    return sae_id, Path(folder)


def check_and_convert(
    specs: list[tuple[str, Path]], workdir: Path
) -> dict[str, SAE[Any] | Path | str]:
    """The folders to upload, by SAE id: each checked; 0.1.0 folders converted into ``workdir``.

    Raises ``ValueError`` (nothing is uploaded) for a repeated id, a folder
    that does not load, or one with NaN/inf weights.
    """
    saes: dict[str, SAE[Any] | Path | str] = {}
    for sae_id, folder in specs:
        if sae_id in saes:
            raise ValueError(f"SAE id {sae_id!r} given twice")
        try:
            sae = SAE.load_from_disk(folder)
        except ValueError as e:
            raise ValueError(
                f"{folder} does not load as a SAE ({e}). A training checkpoint cannot be "
                "published: publish the folder save_inference_model writes (the runner's "
                "output_path)"
            ) from e
        for name, tensor in sae.state_dict().items():
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{folder}: {name} holds NaN or inf; not publishing it")
        arch = sae.cfg.architecture()
        if arch in LEGACY_ARCHITECTURES:
            # verified before it is written; loads without sae_lens_choice
            folder = export_jumprelu_dir(folder, workdir / sae_id)
            print(f"{sae_id}: converted a 0.1.0 {arch} folder to jumprelu")
        print(f"{sae_id}: d_in={sae.cfg.d_in} d_sae={sae.cfg.d_sae} from {folder}")
        saes[sae_id] = folder
    return saes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repo-id", required=True, help="Hub repository, e.g. you/my-saes")
    parser.add_argument(
        "--sae",
        dest="saes",
        action="append",
        type=parse_sae_spec,
        required=True,
        metavar="SAE_ID=FOLDER",
        help="a saved SAE folder and the id (path in the repo) to publish it under; repeatable",
    )
    parser.add_argument("--revision", default="main", help="branch to upload to")
    parser.add_argument("--no-readme", action="store_true", help="do not add a default README")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as workdir:
        try:
            saes = check_and_convert(args.saes, Path(workdir))
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        upload_saes_to_huggingface(
            saes,
            hf_repo_id=args.repo_id,
            hf_revision=args.revision,
            add_default_readme=not args.no_readme,
        )
    print(f"uploaded {len(saes)} SAE(s) to https://huggingface.co/{args.repo_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
