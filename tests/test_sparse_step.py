"""The sparse training step equals the dense one: outputs, losses, gradients and state.

Two SAEs built from the same seed, one with ``step_implementation="dense"``
(every tensor (N, F), as SAELens's TopK), one with ``"sparse"`` (decode and
backward from the kept pairs, :mod:`sae_lens_choice.sparse`), take the same
training step; everything must agree: float64 tightly, float32 and bfloat16
autocast within tolerance, with and without decoder-norm rescaling, with every
aux loss, 2-D and 3-D inputs, per-token normalisation, and under torch.compile.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from sae_lens_choice.choice_base import sparse_step_pays
from tests.helpers import ARCHS, make_training_sae, step_input

D_IN, D_SAE = 12, 48


def pair(arch: str, dtype: str = "float64", **overrides: Any) -> tuple[Any, Any]:
    kwargs: dict[str, Any] = {"d_in": D_IN, "d_sae": D_SAE, "k": 3, "dtype": dtype, **overrides}
    dense = make_training_sae(arch, step_implementation="dense", **kwargs)
    sparse = make_training_sae(arch, step_implementation="sparse", **kwargs)
    sparse.load_state_dict(dense.state_dict())
    assert not dense.use_sparse_step() and sparse.use_sparse_step()
    return dense, sparse


def dead_mask(n_dead: int) -> torch.Tensor:
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(5))[:n_dead]] = True
    return mask


def run(sae: Any, x: torch.Tensor, *, step: int = 0, dead: torch.Tensor, **kwargs: Any) -> Any:
    out = sae.training_forward_pass(
        step_input(sae, x, n_training_steps=step, dead_neuron_mask=dead, **kwargs)
    )
    out.loss.backward()
    return out


def assert_same_step(
    dense: Any, sparse: Any, out_d: Any, out_s: Any, *, rtol: float, atol: float
) -> None:
    assert set(out_d.losses) == set(out_s.losses)
    for name in out_d.losses:
        torch.testing.assert_close(out_s.losses[name], out_d.losses[name], rtol=rtol, atol=atol)
    torch.testing.assert_close(out_s.sae_out, out_d.sae_out, rtol=rtol, atol=atol)
    assert out_s.feature_acts.is_sparse
    torch.testing.assert_close(
        out_s.feature_acts.to_dense().reshape(out_d.feature_acts.shape),
        out_d.feature_acts.detach(),
        rtol=rtol,
        atol=atol,
    )
    for (name, p_d), p_s in zip(dense.named_parameters(), sparse.parameters()):
        assert p_d.grad is not None and p_s.grad is not None, name
        torch.testing.assert_close(p_s.grad, p_d.grad, rtol=rtol, atol=atol, msg=name)
    for name, b_d in dense.named_buffers():
        b_s = dict(sparse.named_buffers())[name]
        if b_d.is_floating_point():
            torch.testing.assert_close(b_s, b_d, rtol=rtol, atol=atol, equal_nan=True, msg=name)
        else:
            assert torch.equal(b_s, b_d), name


@pytest.mark.parametrize(("d_sae", "sparse"), [(128, False), (256, True), (1024, True)])
@pytest.mark.parametrize("arch", ARCHS)
def test_auto_takes_the_sparse_step_from_the_measured_crossover(
    arch: str, d_sae: int, sparse: bool
) -> None:
    # docs/step_time_crossover.json: sparse is faster from 256 latents on, at every d_in
    sae = make_training_sae(arch, d_in=16, d_sae=d_sae, k=3)
    assert sae.cfg.step_implementation == "auto"
    assert sae.use_sparse_step() is sparse


def test_auto_takes_the_dense_step_off_the_cpu() -> None:
    # docs/step_time_cuda.json: on an H200 the sparse step was up to 59x slower than
    # the dense one (Mutual Choice), so "auto" is dense on every device but the CPU
    assert sparse_step_pays(768, 16384, "cpu")
    for device_type in ("cuda", "mps", "xpu"):
        assert not sparse_step_pays(768, 16384, device_type)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available here")
@pytest.mark.parametrize("arch", ARCHS)
def test_auto_is_dense_on_cuda(arch: str) -> None:
    sae = make_training_sae(arch, d_in=16, d_sae=1024, k=3, device="cuda")
    assert sae.cfg.step_implementation == "auto" and not sae.use_sparse_step()


@pytest.mark.parametrize("aux_loss", ["none", "aux_k", "aux_zipf"])
@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescale"])
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_step_equals_dense_step_in_float64(arch: str, rescale: bool, aux_loss: str) -> None:
    dense, sparse = pair(
        arch, rescale_acts_by_decoder_norm=rescale, aux_loss=aux_loss, zipf_refit_every=1
    )
    x = torch.randn(64, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dead = dead_mask(7)
    for step in range(3):  # a few steps, so the EMAs and the refit take part
        out_d = run(dense, x + step, step=step, dead=dead)
        out_s = run(sparse, x + step, step=step, dead=dead)
        assert_same_step(dense, sparse, out_d, out_s, rtol=1e-9, atol=1e-10)
        for model in (dense, sparse):
            model.zero_grad()


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_step_equals_dense_step_on_3d_inputs(arch: str) -> None:
    dense, sparse = pair(arch, aux_loss="aux_k")
    x = torch.randn(4, 16, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out_d = run(dense, x, dead=dead_mask(5))
    out_s = run(sparse, x, dead=dead_mask(5))
    assert out_s.sae_out.shape == x.shape
    assert_same_step(dense, sparse, out_d, out_s, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "options",
    [
        {
            "normalize_activations": "layer_norm",
            "aux_loss": "aux_k",
            "aux_loss_units": "normalised",
        },
        {"normalize_activations": "layer_norm", "aux_loss": "aux_k", "aux_loss_units": "input"},
        {"allocation_score": "hidden_pre_over_input_norm"},
        {"apply_b_dec_to_input": False},
    ],
    ids=["layer_norm", "layer_norm_input_aux", "norm_score", "no_b_dec_in"],
)
@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_step_equals_dense_step_with_options(arch: str, options: dict[str, Any]) -> None:
    dense, sparse = pair(arch, **options)
    x = 5 * torch.randn(64, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out_d = run(dense, x, dead=dead_mask(6))
    out_s = run(sparse, x, dead=dead_mask(6))
    assert_same_step(dense, sparse, out_d, out_s, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("aux_loss", ["none", "aux_k"])
def test_sparse_step_equals_dense_step_with_a_latent_floor(aux_loss: str) -> None:
    dense, sparse = pair("mutual_choice", latent_floor=0.5, aux_loss=aux_loss)
    with torch.no_grad():
        for sae in (dense, sparse):
            sae.b_enc[:10] = -1.0  # starved latents that only the floor keeps
    x = 5 * torch.randn(64, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out_d = run(dense, x, dead=dead_mask(6))
    out_s = run(sparse, x, dead=dead_mask(6))
    assert_same_step(dense, sparse, out_d, out_s, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_step_equals_dense_step_in_float32_and_bf16_autocast(arch: str) -> None:
    x = torch.randn(128, D_IN, generator=torch.Generator().manual_seed(4))
    dense, sparse = pair(arch, dtype="float32", aux_loss="aux_zipf", zipf_refit_every=1)
    out_d = run(dense, x, dead=dead_mask(6))
    out_s = run(sparse, x, dead=dead_mask(6))
    assert_same_step(dense, sparse, out_d, out_s, rtol=1e-4, atol=1e-5)

    dense, sparse = pair(arch, dtype="float32", aux_loss="aux_k")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_d = run(dense, x, dead=dead_mask(6))
        out_s = run(sparse, x, dead=dead_mask(6))
    # both select on the same bf16 encoder product; the sparse decode runs in float32
    # where the dense one runs in bf16, so they agree to bf16's precision
    torch.testing.assert_close(out_s.loss.float(), out_d.loss.float(), rtol=0.02, atol=1e-3)
    torch.testing.assert_close(
        sparse.W_enc.grad,
        dense.W_enc.grad,
        rtol=0.05,
        atol=0.02 * float(dense.W_enc.grad.abs().max()),
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_step_holds_no_n_by_f_tensor_for_backward(arch: str) -> None:
    _, sparse = pair(arch, dtype="float32", aux_loss="none")
    n_tokens = 256
    x = torch.randn(n_tokens, D_IN)
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sparse.training_forward_pass(step_input(sparse, x))
    out.loss.backward()
    assert saved and all(n_tokens * D_SAE > _numel(shape) for shape in saved), saved


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@pytest.mark.parametrize("arch", ARCHS)
def test_hooks_on_the_activations_fall_back_to_the_dense_step(arch: str) -> None:
    _, sparse = pair(arch, dtype="float32")
    seen: list[torch.Size] = []
    sparse.hook_sae_acts_post.add_hook(lambda t, hook: seen.append(t.shape))
    assert not sparse.use_sparse_step()
    out = sparse.training_forward_pass(step_input(sparse, torch.randn(32, D_IN)))
    assert not out.feature_acts.is_sparse and seen == [torch.Size([32, D_SAE])]
    sparse.hook_sae_acts_post.remove_hooks()
    assert sparse.use_sparse_step()


def test_use_sparse_activations_selects_the_sparse_step() -> None:
    sae = make_training_sae("mutual_choice", d_in=D_IN, d_sae=D_SAE, use_sparse_activations=True)
    assert sae.cfg.step_implementation == "sparse" and sae.use_sparse_step()
    with pytest.raises(ValueError, match="use_sparse_activations"):
        make_training_sae(
            "mutual_choice",
            d_in=D_IN,
            d_sae=D_SAE,
            use_sparse_activations=True,
            step_implementation="dense",
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_sparse_step_matches_eager(arch: str) -> None:
    overrides: dict[str, Any] = {"aux_loss": "aux_zipf", "zipf_refit_every": 1}
    if arch == "feature_choice":
        overrides["capacity"] = "uniform"
    _, sparse = pair(arch, dtype="float32", **overrides)
    eager = copy.deepcopy(sparse)
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(6))
    dead = dead_mask(6)
    out_eager = run(eager, x, dead=dead, is_logging_step=False)
    compiled = torch.compile(sparse.training_forward_pass, fullgraph=False, backend="aot_eager")
    out = compiled(step_input(sparse, x, dead_neuron_mask=dead, is_logging_step=False))
    out.loss.backward()
    torch.testing.assert_close(out.loss, out_eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.W_enc.grad, eager.W_enc.grad, rtol=1e-4, atol=1e-6)
    for name in ("threshold", "latent_density_ema", "training_steps"):
        torch.testing.assert_close(getattr(sparse, name), getattr(eager, name), msg=name)
