"""Which learned latents match a true feature: the convergence study's synthetic SAEs.

MCC (:func:`sae_lens_choice.evaluate_sae`) is one number over all latents; this
splits it. For each run of the synthetic study that has a saved SAE (the
``saved/`` folder its last final evaluation wrote in ``--work-dir``), it
encodes the study's eval split as saved and reports, for the latents that
fire there (live) and those that do not (dead), the mean best |cos| of their
decoder rows with the true dictionary, and how many true features some
decoder row matches at |cos| >= ``--match`` (0.9).

Usage (after ``python -m benchmarks.convergence --sources synthetic ...``)::

    python -m benchmarks.alignment --archs topk mc_auxk fc_uniform --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import convergence


@dataclass(frozen=True)
class Alignment:
    """One saved SAE against the true dictionary."""

    run: str
    tokens: int
    live: int
    best_cos_live: float  # mean over live latents of the best |cos| with a true feature
    best_cos_dead: float  # the same over dead latents (nan when none)
    features_matched: int  # true features some decoder row matches at |cos| >= match
    match: float


@torch.no_grad()
def alignment(sae: Any, source: convergence.Source, match: float = 0.9, run: str = "") -> Alignment:
    """Split ``sae``'s decoder rows by whether they fire on ``source``'s eval split."""
    from sae_lens.synthetic.evals import cosine_similarities

    if source.feature_vectors is None:
        raise ValueError("the source has no known dictionary (synthetic sources only)")
    decoder = sae.W_dec.detach().float().cpu()
    cos = cosine_similarities(decoder, source.feature_vectors.float().cpu()).abs()  # (F, n)
    best = cos.max(dim=1).values  # (F,)
    fired = torch.zeros(decoder.shape[0], dtype=torch.long)
    for x in source.eval_batches:
        fired += (sae.encode(x.to(sae.W_dec.device)) != 0).reshape(-1, fired.shape[0]).sum(0).cpu()
    live = fired > 0
    return Alignment(
        run=run,
        tokens=0,
        live=int(live.sum()),
        best_cos_live=float(best[live].mean()) if live.any() else float("nan"),
        best_cos_dead=float(best[~live].mean()) if (~live).any() else float("nan"),
        features_matched=int((cos.max(dim=0).values >= match).sum()),
        match=match,
    )


def merge_rows(stored: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``stored`` with each row whose ``run`` is measured again replaced in place, the
    other new rows appended: a run whose saved SAE is gone keeps its measured row."""
    fresh = {r["run"]: r for r in new}
    merged = [fresh.pop(r["run"], r) for r in stored]
    return merged + list(fresh.values())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.alignment", description=__doc__)
    p.add_argument("--archs", nargs="+", default=["topk", "mc_auxk", "fc_uniform"])
    p.add_argument("--ks", nargs="+", type=int, default=[16])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--match", type=float, default=0.9)
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the rows here, merged into the file's rows (same run: replaced)",
    )
    args, study_args = p.parse_known_args(argv)
    # the study's own options name its settings (--work-dir, --synthetic-device, ...)
    study = convergence.parse_args(["--sources", "synthetic", *study_args])
    settings = convergence.study_settings(study)["synthetic"]
    source = convergence.load_source("synthetic", settings)
    from sae_lens.saes.sae import SAE

    import sae_lens_choice  # noqa: F401  (registers the Choice architectures)

    rows = []
    for arch in args.archs:
        for k in args.ks:
            for seed in args.seeds:
                spec = convergence.RunSpec(settings, arch, k, seed)
                saved = spec.folder(study.work_dir) / "saved"
                if not (saved / "tokens.json").is_file():
                    print(f"{spec.name}: no saved SAE in {saved}; skipped")
                    continue
                tokens = int(json.loads((saved / "tokens.json").read_text())["tokens"])
                sae = SAE.load_from_disk(saved, device=study.device)
                row = alignment(sae, source, args.match, spec.name)
                row = Alignment(**{**asdict(row), "tokens": tokens})
                rows.append(row)
                print(
                    f"{row.run} @ {tokens:,}: live {row.live}/{sae.cfg.d_sae}; mean best |cos| "
                    f"live {row.best_cos_live:.3f}, dead {row.best_cos_dead:.3f}; true "
                    f"features matched at >= {row.match:g}: {row.features_matched}",
                    flush=True,
                )
    if args.json is not None:
        stored = convergence._read_json(args.json) if args.json.is_file() else []
        # through a rename: the stored rows may be the only record of their runs
        convergence._atomic_json(args.json, merge_rows(stored, [asdict(r) for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
