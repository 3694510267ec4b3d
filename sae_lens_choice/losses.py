"""Auxiliary reconstruction losses: aux_k (dead latents) and aux_zipf (dead + under-used).

Pure torch; nothing here imports SAELens. Both losses follow SAELens's TopK
``calculate_topk_aux_loss`` (Gao et al. 2024, appendix B.1): the top
``k_aux = d_in // 2`` candidate latents of each token, by pre-activation,
reconstruct the detached residual ``x - x_hat`` through ``W_dec`` without bias,
and the loss is scaled by ``min(n_candidates / k_aux, 1)``. Unlike SAELens's
version, the candidate count stays a tensor, so the loss reads nothing back
from the device.
"""

from __future__ import annotations

import torch

from sae_lens_choice.zipf import ZipfFit, underused_mask

__all__ = ["aux_candidate_mask", "aux_reconstruction_loss", "default_k_aux"]


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


def aux_reconstruction_loss(
    sae_in: torch.Tensor,
    sae_out: torch.Tensor,
    hidden_pre: torch.Tensor,
    candidate_mask: torch.Tensor | None,
    W_dec: torch.Tensor,
    *,
    rescale_acts_by_decoder_norm: bool = False,
    k_aux: int | None = None,
    coefficient: float = 1.0,
) -> torch.Tensor:
    """Candidates reconstruct the residual the kept latents left behind.

    Args:
        sae_in: (..., d_in) SAE input (after any reshaping the SAE does).
        sae_out: (..., d_in) reconstruction; the residual is detached.
        hidden_pre: (..., F) pre-activations (raw, not relu'd, as SAELens uses).
        candidate_mask: (F,) bool, the latents allowed in the loss; ``None``
            or all-False gives 0.
        W_dec: (F, d_in) decoder.
        rescale_acts_by_decoder_norm: divide acts by decoder row norms first,
            as SAELens's TopK decode does.
        k_aux: latents per token (default ``d_in // 2``).
        coefficient: multiplies the loss.

    Returns:
        0-d tensor. Equal, value and gradients, to SAELens's
        ``TopKTrainingSAE.calculate_topk_aux_loss`` with the candidate mask as
        its ``dead_neuron_mask``.
    """
    if candidate_mask is None:
        return sae_out.new_zeros(())
    d_sae = hidden_pre.shape[-1]
    if candidate_mask.shape != (d_sae,):
        raise ValueError(
            f"candidate_mask must have shape ({d_sae},), got {tuple(candidate_mask.shape)}"
        )
    k_aux = default_k_aux(sae_in.shape[-1]) if k_aux is None else k_aux
    mask = candidate_mask.to(torch.bool)
    n_candidates = mask.sum()
    # min(n_candidates / k_aux, 1): fewer candidates, smaller loss.
    scale = (n_candidates.to(torch.float32) / k_aux).clamp(max=1.0)

    residual = (sae_in - sae_out).detach()
    # A fixed-size top-k over candidates-or--inf; entries that came from -inf
    # are non-candidates picked only because fewer than k_aux candidates exist,
    # and are zeroed. This equals a top-min(k_aux, n_candidates) over candidates.
    masked = torch.where(mask, hidden_pre, hidden_pre.new_tensor(float("-inf")))
    values, indices = masked.topk(min(k_aux, d_sae), dim=-1, sorted=False)
    values = torch.where(torch.isfinite(values), values, values.new_zeros(()))
    aux_acts = torch.zeros_like(hidden_pre).scatter(-1, indices, values)
    if rescale_acts_by_decoder_norm:
        aux_acts = aux_acts * (1 / W_dec.norm(dim=-1))
    recons = aux_acts @ W_dec
    loss = (recons - residual).pow(2).sum(dim=-1).mean()
    return coefficient * scale.to(loss.dtype) * loss
