"""Benchmarks and studies of sae-lens-choice (not installed with the package).

Run from the repository root, e.g. ``python -m benchmarks.step_time``. The
real-language-model loaders (SmolLM2-135M from its PyPI wheel, Debian
``fortunes``) live here, not in the library.
"""
