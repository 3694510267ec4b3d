"""``sae-lens-choice demo``: TopK, BatchTopK, Mutual and Feature Choice on known ground truth.

The demo trains one SAE per row of the architecture table
(:mod:`~sae_lens_choice.demo.architectures`) on SAELens's synthetic data
(Zipfian firing probabilities, more true features than dimensions, so the
true dictionary is known) with SAELens's own ``SAETrainer``, at the same k,
initialisation seed, data order and learning-rate schedule:

- ``topk`` and ``batchtopk`` (SAELens's, with their default ``aux_k`` loss),
- ``mutual_choice`` (with ``aux_k``, the package default),
- ``feature_choice_uniform`` and ``feature_choice_zipf`` (capacities).

Each is saved in SAELens's format, loaded back with ``SAE.load_from_disk``
as users get it, and evaluated per token on a held-out split
(:func:`sae_lens_choice.evaluation.evaluate_sae`): first with the thresholds
it was saved with, then after ``calibrate_thresholds`` on a separate
calibration split (the ``_recalibrated`` rows).

Modules, one job each: ``config`` (settings and their checks), ``data``
(synthetic splits), ``architectures`` (the table), ``train`` (SAELens's
trainer), ``saved`` (SAELens's folder layout), ``run`` (the whole run),
``results`` / ``report`` / ``plots`` (what it returns and writes), ``cli``
(``demo_main``, ``zipf_fit_main``).
"""

from sae_lens_choice.demo.architectures import ARCHITECTURE_TABLE, ARCHITECTURES, Architecture
from sae_lens_choice.demo.cli import demo_main, zipf_fit_main
from sae_lens_choice.demo.config import DemoConfig, DemoError
from sae_lens_choice.demo.results import DemoResults, ModelResult
from sae_lens_choice.demo.run import run_demo
from sae_lens_choice.demo.saved import load_sparsity

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_TABLE",
    "Architecture",
    "DemoConfig",
    "DemoError",
    "DemoResults",
    "ModelResult",
    "demo_main",
    "load_sparsity",
    "run_demo",
    "zipf_fit_main",
]
