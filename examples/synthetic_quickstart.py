"""Quickstart: Mutual Choice and Feature Choice SAEs on synthetic data, in Python.

Trains TopK, BatchTopK, Mutual Choice and Feature Choice (uniform and Zipf
capacities) SAEs with SAELens's trainer on SAELens synthetic activations whose
true features are known, saves them, evaluates them per token as saved and
after recalibrating their thresholds on held-out data, and loads one back with
plain SAELens. The same as ``sae-lens-choice demo``.

    python examples/synthetic_quickstart.py          # ~2 minutes on 2 CPU cores
"""

from __future__ import annotations

from pathlib import Path

import torch
from sae_lens import SAE, JumpReLUSAE

from sae_lens_choice.demo import DemoConfig, DemoResults, run_demo


def build_config(**overrides: object) -> DemoConfig:
    """The demo's settings; pass any DemoConfig field to change it (e.g. k=8)."""
    return DemoConfig(**{"output_dir": "quickstart_output", **overrides})  # type: ignore[arg-type]


def main(**overrides: object) -> DemoResults:
    results = run_demo(build_config(**overrides))
    for m in results.models:
        print(
            f"{m.name:>36}: EV {m.explained_variance:.3f}, L0 {m.l0_mean:.2f} ± {m.l0_std:.2f}, "
            f"dead {m.dead_latents}, MCC {m.mcc:.3f}"
        )

    # Every SAE is saved in SAELens's format: Mutual and Feature Choice as SAELens's
    # own JumpReLU, which loads without this package. Load one back and encode per token.
    sae = SAE.load_from_disk(Path(results.output_dir) / "saes" / "mutual_choice")
    assert isinstance(sae, JumpReLUSAE)
    x = torch.randn(4, sae.cfg.d_in)
    acts = sae.encode(x)  # threshold mode: each token on its own
    print("per-token L0 of 4 random inputs:", (acts > 0).sum(-1).tolist())
    return results


if __name__ == "__main__":
    main()
