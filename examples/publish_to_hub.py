"""Publish Mutual / Feature Choice SAEs to the Hugging Face Hub with SAELens's uploader.

Each SAE is a folder as SAELens saves it (``cfg.json``,
``sae_weights.safetensors``, optionally ``sparsity.safetensors`` and
``runner_cfg.json``), e.g. the ``final_*`` checkpoint of a training run or the
output of ``sae.save_model(...)``. Log in first (``hf auth login`` or
``HF_TOKEN``), then::

    python examples/publish_to_hub.py --repo-id you/gpt2-choice-saes \\
        --sae blocks.6.hook_resid_post=checkpoints/mc/final_1000000 \\
        --sae blocks.6.hook_resid_post-fc=checkpoints/fc/final_1000000 \\
        --jumprelu

and load them back (with ``sae_lens_choice`` installed and imported)::

    import sae_lens_choice  # registers mutual_choice / feature_choice
    from sae_lens import SAE
    sae = SAE.from_pretrained("you/gpt2-choice-saes", "blocks.6.hook_resid_post")

``--jumprelu`` also uploads each SAE converted to SAELens's own ``jumprelu``
architecture under ``<sae_id>-jumprelu``, loadable by anyone with plain
SAELens (identical outputs in threshold mode).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from sae_lens import SAE, upload_saes_to_huggingface

import sae_lens_choice  # noqa: F401  (registers the architectures for the checks below)
from sae_lens_choice.export import export_jumprelu_dir


def parse_sae_spec(spec: str) -> tuple[str, Path]:
    """``SAE_ID=FOLDER`` -> (sae_id, folder)."""
    sae_id, sep, folder = spec.partition("=")
    if not sep or not sae_id or not folder:
        raise argparse.ArgumentTypeError(f"expected SAE_ID=FOLDER, got {spec!r}")
    return sae_id, Path(folder)


def build_saes_dict(
    specs: list[tuple[str, Path]], *, jumprelu: bool, workdir: Path
) -> dict[str, SAE[Any] | Path | str]:
    """Check every folder loads, and add JumpReLU exports when asked."""
    saes: dict[str, SAE[Any] | Path | str] = {}
    for sae_id, folder in specs:
        if sae_id in saes:
            raise ValueError(f"SAE id {sae_id!r} given twice")
        sae = SAE.load_from_disk(folder)  # fails early, with a clear message
        print(f"{sae_id}: {sae.cfg.architecture()} d_in={sae.cfg.d_in} d_sae={sae.cfg.d_sae}")
        saes[sae_id] = folder
        if jumprelu:
            saes[f"{sae_id}-jumprelu"] = export_jumprelu_dir(folder, workdir / sae_id)
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
        help="an SAE folder and the id (path in the repo) to publish it under; repeatable",
    )
    parser.add_argument("--revision", default="main", help="branch to upload to")
    parser.add_argument(
        "--jumprelu", action="store_true", help="also upload a JumpReLU export of each SAE"
    )
    parser.add_argument("--no-readme", action="store_true", help="do not add a default README")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as workdir:
        saes = build_saes_dict(args.saes, jumprelu=args.jumprelu, workdir=Path(workdir))
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
