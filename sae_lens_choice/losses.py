"""Auxiliary reconstruction losses: aux_k (dead latents) and aux_zipf (dead + under-used).

Pure torch; nothing here imports SAELens. Both losses follow SAELens's TopK
``calculate_topk_aux_loss`` (Gao et al. 2024, appendix B.1): each token's top
``k_aux = d_in // 2`` candidate latents, by pre-activation, reconstruct the
detached residual ``x - x_hat`` through ``W_dec`` without bias, and the loss is
scaled by ``min(n_candidates / k_aux, 1)``. The training SAEs decode the
candidates (densely, or sparsely from the returned indices) and reshape the
reconstruction with SAELens's own ``act_times_W_dec`` and ``reshape_fn_out``.

Unlike SAELens's version, nothing here reads the candidate count back from the
device: the top-k has a fixed width ``min(k_aux, F)`` and slots that did not
land on a candidate carry the value 0, which reconstructs nothing.
"""

from __future__ import annotations

import torch

from sae_lens_choice.zipf import ZipfFit, underused_mask

__all__ = [
    "aux_candidate_mask",
    "aux_reconstruction_loss",
    "aux_topk",
    "default_k_aux",
]


def default_k_aux(d_in: int) -> int:
    """Gao et al.'s heuristic: half the input dimension."""
    return max(d_in // 2, 1)


def aux_candidate_mask(
    dead_neuron_mask: torch.Tensor | None,
    densities: torch.Tensor | None = None,
    fit: ZipfFit | None = None,
    gamma: float = 0.0,
) -> torch.Tensor | None:
    """The candidate set ``U = dead ∪ {j : rho_j < gamma * p(rank_j)}``.

    With ``densities`` or ``fit`` missing, or ``gamma == 0``, this is the dead
    set alone (the aux_k loss).
    """
    if densities is None or fit is None or gamma == 0.0:
        return dead_neuron_mask
    under = underused_mask(densities, fit, gamma)
    if dead_neuron_mask is None:
        return under
    return dead_neuron_mask.to(torch.bool) | under


def aux_topk(
    hidden_pre: torch.Tensor, candidate_mask: torch.Tensor, k_aux: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``k_aux`` largest pre-activations among the candidate latents.

    The values are raw pre-activations (not relu'd), as SAELens's
    ``calculate_topk_aux_acts`` takes them. A fixed-width top-k over
    candidates-or-``-inf``: slots that had to fall on a non-candidate (fewer
    than ``k_aux`` candidates) get the value 0, so this equals a
    top-``min(k_aux, n_candidates)`` over the candidates without reading
    ``n_candidates`` back.

    Args:
        hidden_pre: (..., F) pre-activations.
        candidate_mask: (F,) bool.
        k_aux: slots per token.

    Returns:
        ``(values, indices)``, each (..., min(k_aux, F)); differentiable in
        ``hidden_pre`` through ``values``.
    """
    d_sae = hidden_pre.shape[-1]
    if candidate_mask.shape != (d_sae,):
        raise ValueError(
            f"candidate_mask must have shape ({d_sae},), got {tuple(candidate_mask.shape)}"
        )
    mask = candidate_mask.to(torch.bool)
    masked = torch.where(mask, hidden_pre, hidden_pre.new_tensor(float("-inf")))
    values, indices = masked.topk(min(k_aux, d_sae), dim=-1, sorted=False)
    values = torch.where(torch.isfinite(values), values, values.new_zeros(()))
    return values, indices


def aux_reconstruction_loss(
    recons: torch.Tensor,
    residual: torch.Tensor,
    candidate_mask: torch.Tensor,
    k_aux: int,
    coefficient: float = 1.0,
) -> torch.Tensor:
    """``coefficient * min(n_candidates / k_aux, 1) * mean_token ||recons - residual||^2``.

    Args:
        recons: (..., d) the candidates' reconstruction (no bias).
        residual: (..., d) what the kept latents left unexplained (detached here).
        candidate_mask: (F,) bool; its count sets the scale (fewer candidates,
            smaller loss), as in SAELens's TopK aux loss.
        k_aux: the ``k_aux`` the candidates were chosen with.
        coefficient: multiplies the loss.

    Returns:
        0-d tensor. With ``recons`` built from :func:`aux_topk` and reshaped as
        the SAE's output, equal in value and gradients to SAELens's
        ``TopKTrainingSAE.calculate_topk_aux_loss`` with the candidate mask as
        its ``dead_neuron_mask``.
    """
    n_candidates = candidate_mask.to(torch.bool).sum()
    scale = (n_candidates.to(torch.float32) / k_aux).clamp(max=1.0)
    loss = (recons - residual.detach()).pow(2).sum(dim=-1).mean()
    return coefficient * scale.to(loss.dtype) * loss
