"""Feature Choice and Mutual Choice sparse autoencoders for SAELens.

Reference implementation of Ayonrinde (2024), "Adaptive Sparse Allocation with
Mutual Choice & Feature Choice Sparse Autoencoders" (arXiv 2411.02124).
"""

from sae_lens_choice import allocation, losses, zipf

__version__ = "0.1.0"

__all__ = ["__version__", "allocation", "losses", "zipf"]
