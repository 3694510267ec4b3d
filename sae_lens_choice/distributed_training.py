"""Data-parallel training with SAELens's own runner and trainer (``torchrun``).

Launch::

    sae-lens-choice train --nproc-per-node 8 --architecture mutual_choice --device cuda ...
    torchrun --standalone --nproc-per-node 8 -m sae_lens_choice train --device cuda ...

Every rank runs SAELens's :class:`~sae_lens.LanguageModelSAETrainingRunner` and
:class:`~sae_lens.training.sae_trainer.SAETrainer` (through the subclasses
here; SAELens itself is unchanged) on its own shard of the activation stream,
and every rank ends each step with the same weights and the same state:

- **Data**: the dataset is split with ``datasets.distributed.split_dataset_by_node``
  (map-style: contiguous blocks; streaming: whole files per rank when their
  count divides the world size, else every R-th example), so each rank's
  ActivationsStore reads different text. The global ``train_batch_size_tokens``
  and ``training_tokens`` are divided by the world size R (both must divide):
  every rank takes the same number of steps, each global step sees
  ``train_batch_size_tokens`` tokens, and the run sees ``training_tokens`` in
  all, as the single-process run would. ``n_batches_in_buffer`` and
  ``store_batch_size_prompts`` stay per rank.
- **Selection**: Mutual and Feature Choice select exactly over the concatenated
  batch of all ranks (:mod:`sae_lens_choice.distributed`; the training SAEs do
  this themselves whenever ``torch.distributed`` is initialized). SAELens's
  ``topk`` is per token, so exact as it is. ``batchtopk`` keeps the top
  ``k * N / R`` of each rank's batch (a per-rank selection, as a DDP run of
  SAELens would): its threshold EMA is fed the smallest kept value over all
  ranks, so every rank holds the same threshold.
- **Gradients**: SAELens's trainer calls ``sae.training_forward_pass`` and
  ``loss.backward()`` itself, so DDP's wrapper (which hooks ``forward``) does
  not apply. Instead a post-accumulate-grad hook on each parameter counts the
  arrivals; when the last parameter's gradient has arrived, every gradient is
  all-reduced (summed, then divided by R) in a fixed parameter order, inside
  ``backward``, before SAELens clips the norm and Adam steps. Every loss here
  is a mean over tokens with batch-global coefficients, so with equal shards
  the average of the ranks' gradients is the gradient of the concatenated
  batch.
- **Trainer statistics**: SAELens's ``act_freq_scores``,
  ``n_forward_passes_since_fired`` (hence the dead-latent mask the auxiliary
  losses see) and ``n_frac_active_samples`` are made global after each step:
  the step's firing counts are all-reduced and the counters rebuilt from them,
  giving exactly what one process would count on the whole batch.
- **SAE state**: density and threshold EMAs, the Zipf fit and the step counter
  of the choice SAEs are reduced over ranks by the SAEs themselves; the
  activation-norm scaling factor is the mean norm over all ranks' estimation
  batches; a whitening transform (``covariance_whitening``) is rank 0's
  estimate, broadcast. Parameters and buffers are broadcast from rank 0 when
  the trainer is built, so every rank starts from the same initialisation.
- **Saving**: checkpoints and the final SAE are written by rank 0 alone. The
  calibration ring buffer of the choice SAEs (the latest training inputs, from
  which the saved thresholds are calibrated) is per rank; before each save the
  ranks' rings are gathered into exactly the ring one process would hold (the
  latest ``threshold_calibration_tokens`` tokens of the concatenated stream),
  so the saved thresholds are those of the single-process run.
- **Resume**: each rank also writes ``ranks/rank_<r>/`` into the checkpoint
  (its ActivationsStore position and its own calibration ring), and rank 0
  writes ``data_parallel.json``; a resumed run (same world size) restores
  each rank's data position and ring, so it continues as the uninterrupted run
  would: bit for bit where SAELens's single-process resume is (it restores
  the dataset position, not the activation buffer: ``activations_mixing_fraction=0``
  and no half-served buffer at the checkpoint).
- **Failures**: ``init_process_group`` gets a timeout (default
  :data:`DEFAULT_TIMEOUT_S`); a rank that raises or exits makes the others
  fail in their next collective (gloo: at once, when its sockets close; a rank
  that hangs: after the timeout; NCCL: through its watchdog), and torchrun's
  agent stops the remaining workers when one exits with an error. The trainer
  adds a note naming the rank and step to the error. A NaN loss is flagged by
  the rank whose batch produced it, but the averaged gradient carries it into
  every rank's weights, so every rank stops at the same finiteness check.

Logging (wandb, evals, the progress bar) happens on rank 0, with rank 0's
batch for the per-step metrics (loss, explained variance, L0); the sparsity
statistics are global. Not covered: ``compile_sae`` (the selection's
collectives inside a compiled graph), ``MultiSAETrainer``, several nodes
through the ``--nproc-per-node`` launcher (use ``torchrun`` directly), and
resuming with a different world size.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from datasets import Dataset, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from sae_lens.config import SAETrainerConfig
from sae_lens.constants import RUNNER_CFG_FILENAME
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput
from sae_lens.training.activation_scaler import ActivationScaler, ActivationWhitening
from sae_lens.training.prefetch import PrefetchingIterator
from sae_lens.training.sae_trainer import Evaluator, SAETrainer, SaveCheckpointFn
from sae_lens.training.types import DataProvider
from safetensors.torch import load_file, save_file
from torch import nn
from typing_extensions import override

from sae_lens_choice.choice_base import ChoiceTrainingSAE
from sae_lens_choice.distributed import check_same_across_ranks

#: Seconds a collective waits for the other ranks before failing. Long enough
#: for rank 0's saving and (wandb) evals while the others wait, short enough
#: that a hung rank ends the run; ``--dist-timeout`` changes it.
DEFAULT_TIMEOUT_S = 600.0
#: Per-rank state inside a checkpoint folder: ``ranks/rank_<r>/``.
RANKS_DIR = "ranks"
#: Written by rank 0 into each checkpoint: world size and per-rank batch.
MANIFEST_FILENAME = "data_parallel.json"
#: A rank's calibration ring buffer inside its rank folder.
CALIBRATION_FILENAME = "calibration_state.safetensors"

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistributedActivationScaler",
    "DistributedLanguageModelSAETrainingRunner",
    "DistributedSAETrainer",
    "GradientAverager",
    "RankInfo",
    "gather_calibration_window",
    "init_distributed",
    "rank_runner_config",
    "rank_state_dir",
    "shard_dataset",
    "train_distributed",
]


# ---------------------------------------------------------------------------
# process group
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RankInfo:
    """Where this process stands in the process group.

    Attributes:
        rank: global rank.
        world_size: number of ranks.
        local_rank: rank on this node (``LOCAL_RANK``); picks the GPU.
        backend: ``"nccl"`` or ``"gloo"``.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(
                f"{name} is not set: launch with `torchrun --nproc-per-node N -m sae_lens_choice "
                "train ...` or `sae-lens-choice train --nproc-per-node N ...`"
            )
        return default
    return int(value)


def init_distributed(device: str = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> RankInfo:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_*``).

    NCCL on CUDA (``device`` of type ``cuda``; this rank's GPU is
    ``cuda:LOCAL_RANK``, made the current device), gloo otherwise. A
    collective that waits longer than ``timeout_s`` fails, so a rank that hangs
    stops the run. Already initialized (e.g. by the caller): only reports.
    """
    if not dist.is_initialized():
        rank = _env_int("RANK")
        _env_int("WORLD_SIZE")  # init_process_group reads it; fail clearly without it
        local_rank = _env_int("LOCAL_RANK", rank)
        timeout = timedelta(seconds=timeout_s)
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(local_rank)
            dist.init_process_group(
                "nccl", timeout=timeout, device_id=torch.device("cuda", local_rank)
            )
        else:
            dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = str(dist.get_backend()).lower()
    return RankInfo(rank, dist.get_world_size(), local_rank, backend)


def _require_initialized() -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialized: call sae_lens_choice.distributed_training."
            "init_distributed() under torchrun first"
        )
    return dist.get_rank(), dist.get_world_size()


def _collective_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo CPU tensors
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def _broadcast_module_state(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (in place)."""
    device = _collective_device()
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.numel() == 0:
            continue
        if tensor.device == device:
            dist.broadcast(tensor.data, src=0)
        else:
            staged = tensor.data.to(device)
            dist.broadcast(staged, src=0)
            tensor.data.copy_(staged)


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------


class GradientAverager:
    """Average parameter gradients over ranks, inside ``backward``.

    A post-accumulate-grad hook on every trainable parameter counts arrivals;
    the last arrival all-reduces every gradient (sum, then ``/ world_size``) in
    the fixed order of ``params``, so all ranks issue the same collectives
    whatever order autograd finishes the parameters in. This runs before the
    caller's ``clip_grad_norm_`` and ``optimizer.step()``, which then see the
    global gradient. :attr:`reductions` counts completed averagings (a step
    whose backward left a parameter without gradient does not complete one).
    """

    def __init__(self, params: Iterable[nn.Parameter], world_size: int):
        self.params = [p for p in params if p.requires_grad]
        self.world_size = world_size
        self.reductions = 0
        self._arrived = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def begin_step(self) -> None:
        """Forget a previous backward that did not reach every parameter."""
        self._arrived = 0

    def _on_grad(self, _param: torch.Tensor) -> None:
        self._arrived += 1
        if self._arrived < len(self.params):
            return
        self._arrived = 0
        grads: list[torch.Tensor] = []
        for p in self.params:
            assert p.grad is not None  # it just arrived
            grads.append(p.grad)
        works = [dist.all_reduce(g, async_op=True) for g in grads]
        for work in works:
            assert work is not None
            work.wait()
        for g in grads:
            g.div_(self.world_size)
        self.reductions += 1

    def remove(self) -> None:
        """Remove the hooks (the parameters train single-process again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ---------------------------------------------------------------------------
# activation normalisation
# ---------------------------------------------------------------------------


class _CountingProvider:
    """Passes batches through, counting their tokens."""

    def __init__(self, provider: DataProvider):
        self.provider = provider
        self.tokens = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self.provider)
        self.tokens += batch.reshape(-1, batch.shape[-1]).shape[0]
        return batch


class DistributedActivationScaler(ActivationScaler):
    """SAELens's :class:`ActivationScaler`, with estimates identical on every rank.

    ``expected_average_only_in``: the mean activation norm over every rank's
    ``n_batches_for_norm_estimate`` batches (the sums and counts are
    all-reduced), i.e. over as many tokens as the single-process estimate.
    ``covariance_whitening``: rank 0's estimate, broadcast.
    """

    @override
    @torch.no_grad()
    def _calculate_mean_norm(
        self, data_provider: DataProvider, n_batches_for_norm_estimate: int = int(1e3)
    ) -> float:
        counting = _CountingProvider(data_provider)
        local_mean = super()._calculate_mean_norm(counting, n_batches_for_norm_estimate)
        totals = torch.tensor(
            [local_mean * counting.tokens, float(counting.tokens)],
            dtype=torch.float64,
            device=_collective_device(),
        )
        dist.all_reduce(totals)
        return float(totals[0] / totals[1])

    @override
    @torch.no_grad()
    def estimate_whitening(
        self,
        d_in: int,
        data_provider: DataProvider,
        n_batches_for_norm_estimate: int = int(1e3),
        eps: float = 1e-3,
    ) -> None:
        # every rank consumes its estimation batches, so the streams stay aligned
        super().estimate_whitening(d_in, data_provider, n_batches_for_norm_estimate, eps)
        assert self.whitening is not None
        device = _collective_device()
        parts = [
            self.whitening.mean.to(device).contiguous(),
            self.whitening.matrix.to(device).contiguous(),
            self.whitening.inverse_matrix.to(device).contiguous(),
        ]
        for part in parts:
            dist.broadcast(part, src=0)
        self.whitening = ActivationWhitening(
            mean=parts[0], matrix=parts[1], inverse_matrix=parts[2]
        )


# ---------------------------------------------------------------------------
# the calibration ring buffer across ranks
# ---------------------------------------------------------------------------


def _window_positions(
    seen: int, capacity: int, tokens_per_rank: int, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s local positions among the latest ``capacity`` global tokens.

    The global stream is step by step, rank 0's batch first: local token ``p``
    of rank ``r`` is global token ``(p // b) * R * b + r * b + p % b``. Returns
    (local positions, global positions), both ascending.
    """
    b = tokens_per_rank
    local = torch.arange(max(seen - capacity, 0), seen)  # (<= capacity,)
    global_pos = (local // b) * (world * b) + rank * b + local % b
    keep = global_pos >= seen * world - capacity
    return local[keep], global_pos[keep]


@torch.no_grad()
def gather_calibration_window(
    sae: TrainingSAE[Any], tokens_per_rank: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The calibration ring one process would hold, gathered on rank 0 (a collective).

    Each rank's choice SAE keeps the latest training inputs it saw itself
    (``calibration_acts``, a ring buffer indexed by its own token count). Rank 0
    gets ``(calibration_acts, calibration_tokens_seen)`` exactly as a single
    process that trained on the concatenated batches (rank 0's tokens first in
    every step) would hold them: the latest ``threshold_calibration_tokens``
    tokens of the whole stream, at the same ring positions. Other ranks get
    ``None``; so does every rank for SAEs without a ring. Every rank must call
    it, with the same per-rank batch size. Reads the token count back.
    """
    _, world = _require_initialized()
    rank = dist.get_rank()
    if not isinstance(sae, ChoiceTrainingSAE) or sae.calibration_acts.shape[0] == 0:
        return None
    capacity, d_in = sae.calibration_acts.shape
    seen = int(sae.calibration_tokens_seen)
    check_same_across_ranks(seen, "calibration_tokens_seen")
    if seen % tokens_per_rank != 0:
        raise ValueError(
            f"calibration_tokens_seen = {seen} is not a multiple of the per-rank batch "
            f"({tokens_per_rank} tokens): the ring cannot be mapped to global positions"
        )
    positions = [_window_positions(seen, capacity, tokens_per_rank, r, world) for r in range(world)]
    width = max(local.numel() for local, _ in positions)
    acts = sae.calibration_acts
    device = _collective_device()
    mine = positions[rank][0]
    send = acts.new_zeros((width, d_in), device=device)  # (w, d_in), padded
    send[: mine.numel()] = acts[(mine % capacity).to(acts.device)].to(device)
    received = [torch.empty_like(send) for _ in range(world)] if rank == 0 else None
    dist.gather(send, received, dst=0)
    if received is None:
        return None
    window = torch.zeros_like(acts)  # (M, d_in) ring layout
    for (local, global_pos), part in zip(positions, received):
        window[(global_pos % capacity).to(acts.device)] = part[: local.numel()].to(acts.device)
    total = torch.tensor(seen * world, dtype=sae.calibration_tokens_seen.dtype)
    return window, total.to(sae.calibration_tokens_seen.device)


@contextmanager
def _calibration_window(
    sae: TrainingSAE[Any], window: tuple[torch.Tensor, torch.Tensor] | None
) -> Iterator[None]:
    """Temporarily give ``sae`` the single-process ring (for saving)."""
    if window is None or not isinstance(sae, ChoiceTrainingSAE):
        yield
        return
    saved = sae.calibration_acts.clone(), sae.calibration_tokens_seen.clone()
    sae.calibration_acts.copy_(window[0])
    sae.calibration_tokens_seen.copy_(window[1])
    try:
        yield
    finally:
        sae.calibration_acts.copy_(saved[0])
        sae.calibration_tokens_seen.copy_(saved[1])


def rank_state_dir(checkpoint_path: str | Path, rank: int) -> Path:
    """``<checkpoint>/ranks/rank_<rank>``: one rank's own state in a checkpoint."""
    return Path(checkpoint_path) / RANKS_DIR / f"rank_{rank}"


def _check_manifest(checkpoint_path: str | Path, world: int) -> None:
    manifest = Path(checkpoint_path) / MANIFEST_FILENAME
    if not manifest.exists():
        raise ValueError(
            f"{checkpoint_path} was not written by a data-parallel run (no {MANIFEST_FILENAME}): "
            "resume it single-process, or restart the data-parallel run"
        )
    saved = json.loads(manifest.read_text())["world_size"]
    if saved != world:
        raise ValueError(
            f"{checkpoint_path} was written by {saved} ranks but this run has {world}: each "
            "rank resumes its own data shard, so resume with the same number of ranks"
        )


# ---------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------


@torch.no_grad()
def _update_topk_threshold_globally(sae: BatchTopKTrainingSAE, acts_topk: torch.Tensor) -> None:
    """BatchTopK's threshold EMA fed the smallest kept value over all ranks.

    The same update as ``BatchTopKTrainingSAE.update_topk_threshold``, with the
    batch minimum all-reduced (``inf`` where a rank kept nothing), so every rank
    holds the same threshold.
    """
    lr = sae.cfg.topk_threshold_lr
    threshold = sae.topk_threshold
    with torch.autocast(threshold.device.type, enabled=False):
        positive = acts_topk > 0
        smallest = acts_topk.masked_fill(~positive, float("inf")).amin().to(threshold.dtype)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        blended = (1 - lr) * threshold + lr * smallest
        sae.topk_threshold = torch.where(torch.isfinite(smallest), blended, threshold)


def _trainer_fingerprint(cfg: SAETrainerConfig, sae: TrainingSAE[Any]) -> str:
    """What must agree across ranks (devices, paths and logging may differ)."""
    trainer = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("device", "logger", "checkpoint_path")
    }
    sae_cfg = {k: v for k, v in sae.cfg.to_dict().items() if k not in ("device", "metadata")}
    return repr(sorted(trainer.items())) + repr(sorted(sae_cfg.items())) + type(sae).__name__


class DistributedSAETrainer(SAETrainer[Any, Any]):
    """SAELens's :class:`SAETrainer` for one rank of a data-parallel run.

    Each rank passes its own data provider (its shard) and a config whose
    ``train_batch_size_samples`` / ``total_training_samples`` are the global
    ones divided by the world size (the same on every rank). See the module
    docstring for what is made global and how. ``torch.distributed`` must be
    initialized; the default process group is used.

    On construction: the trainer and SAE configs are checked to agree across
    ranks, and rank 0's parameters and buffers are broadcast. The gradient
    hooks are removed when :meth:`fit` returns.
    """

    def __init__(
        self,
        cfg: SAETrainerConfig,
        sae: TrainingSAE[Any],
        data_provider: DataProvider,
        evaluator: Evaluator[Any] | None = None,
        save_checkpoint_fn: SaveCheckpointFn | None = None,
    ) -> None:
        self.rank, self.world_size = _require_initialized()
        super().__init__(cfg, sae, data_provider, evaluator, save_checkpoint_fn)
        self.activation_scaler = DistributedActivationScaler()
        check_same_across_ranks(_trainer_fingerprint(cfg, sae), "the trainer or SAE config")
        sae.to(cfg.device)
        _broadcast_module_state(sae)
        # Logging steps follow rank 0's logger on every rank, so the SAE's
        # training step takes the same branches everywhere.
        self._log_to_wandb = bool(_broadcast_object(cfg.logger.log_to_wandb))
        self.gradient_averager = GradientAverager(sae.parameters(), self.world_size)
        if isinstance(sae, BatchTopKTrainingSAE):
            # instance attribute: this SAE only; SAELens's class is untouched
            sae.update_topk_threshold = partial(_update_topk_threshold_globally, sae)  # type: ignore[method-assign]

    @override
    def fit(self) -> Any:
        try:
            return super().fit()
        except BaseException as err:
            add_note = getattr(err, "add_note", None)  # Python >= 3.11
            if add_note is not None:
                # A collective's own error (gloo: "Connection reset by peer") does
                # not say which run or rank; this note does.
                add_note(
                    f"sae-lens-choice: rank {self.rank} of {self.world_size} stopped training "
                    f"at step {self.n_training_steps}; if another rank failed or exited "
                    "first, its log names the cause"
                )
            raise
        finally:
            self.gradient_averager.remove()

    @override
    def _train_step(self, sae: Any, sae_in: torch.Tensor) -> TrainStepOutput:
        act_freq = self.act_freq_scores.clone()
        since_fired = self.n_forward_passes_since_fired.clone()
        n_frac = self.n_frac_active_samples
        reductions = self.gradient_averager.reductions
        self.gradient_averager.begin_step()
        output = super()._train_step(sae, sae_in)
        if self.gradient_averager.reductions == reductions:
            missing = [
                name for name, p in sae.named_parameters() if p.requires_grad and p.grad is None
            ]
            raise RuntimeError(
                f"rank {self.rank}: gradients were not averaged this step (parameters without "
                f"a gradient: {missing or 'unknown'}); every trainable parameter must take "
                "part in the loss"
            )
        self._globalize_firing_stats(act_freq, since_fired, n_frac)
        return output

    @torch.no_grad()
    def _globalize_firing_stats(
        self, act_freq: torch.Tensor, since_fired: torch.Tensor, n_frac: int
    ) -> None:
        # SAELens added this rank's firing counts; rebuild the counters from the
        # counts of the whole batch. Counts are integers in float32, so the
        # differences and sums are exact (below 2^24 per sparsity window).
        fired = self.act_freq_scores - act_freq  # (F,) this rank's counts this step
        dist.all_reduce(fired)
        self.act_freq_scores = act_freq + fired
        self.n_forward_passes_since_fired = torch.where(
            fired > 0, torch.zeros_like(since_fired), since_fired + 1
        )
        self.n_frac_active_samples = (
            n_frac + (self.n_frac_active_samples - n_frac) * self.world_size
        )

    @override
    def _is_logging_step(self) -> bool:
        return (
            self._log_to_wandb
            and (self.n_training_steps + 1) % self.cfg.logger.wandb_log_frequency == 0
        )

    @override
    @torch.no_grad()
    def build_train_step_log_dict(
        self, output: TrainStepOutput, n_training_samples: int
    ) -> dict[str, Any]:
        # samples of the whole run, not of this rank
        return super().build_train_step_log_dict(output, n_training_samples * self.world_size)

    def _global_checkpoint_name(self, name: str) -> str:
        # SAELens names checkpoints by this rank's sample count; name them by the run's
        prefix, _, count = name.rpartition("_")
        if count.isdigit() and prefix in ("", "final"):
            return f"{prefix}{'_' if prefix else ''}{int(count) * self.world_size}"
        return name

    @override
    def save_checkpoint(
        self,
        checkpoint_name: str,
        base_path: Path | str | None = None,
        wandb_aliases: list[str] | None = None,
    ) -> None:
        """Rank 0 writes SAELens's checkpoint; every rank adds its own state.

        A collective: every rank calls it (SAELens's schedule is the same on
        every rank). The SAE in the checkpoint holds the single-process
        calibration ring; ``ranks/rank_<r>/`` holds each rank's own ring and
        (through the runner) its data position.
        """
        name = self._global_checkpoint_name(checkpoint_name)
        window = gather_calibration_window(self.sae, self.cfg.train_batch_size_samples)
        base = base_path if base_path is not None else self.cfg.checkpoint_path
        if self.rank == 0:
            with _calibration_window(self.sae, window):
                super().save_checkpoint(name, base_path, wandb_aliases)
        elif base is not None and self.save_checkpoint_fn is not None:
            self.save_checkpoint_fn(checkpoint_path=Path(base) / name)
        if base is not None:
            self.save_rank_state(Path(base) / name)
        dist.barrier()

    def save_rank_state(self, checkpoint_path: Path) -> None:
        """Write this rank's calibration ring (and, on rank 0, the manifest)."""
        rank_dir = rank_state_dir(checkpoint_path, self.rank)
        rank_dir.mkdir(parents=True, exist_ok=True)
        sae = self.sae
        if isinstance(sae, ChoiceTrainingSAE):
            save_file(
                {
                    "calibration_acts": sae.calibration_acts.detach().contiguous(),
                    "calibration_tokens_seen": sae.calibration_tokens_seen.reshape(1).clone(),
                },
                str(rank_dir / CALIBRATION_FILENAME),
            )
        if self.rank == 0:
            manifest = {
                "world_size": self.world_size,
                "train_batch_size_tokens_per_rank": self.cfg.train_batch_size_samples,
                "training_tokens_per_rank": self.cfg.total_training_samples,
            }
            (checkpoint_path / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2))

    @torch.no_grad()
    def load_rank_state(self, checkpoint_path: str | Path) -> None:
        """Restore this rank's calibration ring (after the SAE's weights are loaded)."""
        _check_manifest(checkpoint_path, self.world_size)
        sae = self.sae
        path = rank_state_dir(checkpoint_path, self.rank) / CALIBRATION_FILENAME
        if isinstance(sae, ChoiceTrainingSAE) and path.exists():
            state = load_file(str(path))
            sae.calibration_acts.copy_(state["calibration_acts"])
            sae.calibration_tokens_seen.copy_(state["calibration_tokens_seen"].reshape(()))


# ---------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------


def _rank_device(device: str | None, local_rank: int) -> str | None:
    if device is None or torch.device(device).type != "cuda":
        return device
    return f"cuda:{local_rank}"


def rank_runner_config(
    cfg: LanguageModelSAERunnerConfig[Any], info: RankInfo, checkpoint_path: str | None
) -> LanguageModelSAERunnerConfig[Any]:
    """This rank's copy of the run's config.

    ``train_batch_size_tokens`` and ``training_tokens`` divided by the world
    size (``ValueError`` unless both divide); CUDA devices replaced by
    ``cuda:LOCAL_RANK``; wandb logging and verbose output on rank 0 only;
    ``checkpoint_path`` the same on every rank (pass rank 0's).
    """
    world = info.world_size
    for name in ("train_batch_size_tokens", "training_tokens"):
        value = getattr(cfg, name)
        if value % world != 0:
            raise ValueError(
                f"{name} = {value} must be divisible by the number of ranks ({world}): each "
                "rank takes an equal share of every batch and of the token budget"
            )
    device = _rank_device(cfg.device, info.local_rank)
    logger = cfg.logger
    if info.rank != 0:
        logger = dataclasses.replace(cfg.logger, log_to_wandb=False)
    local = dataclasses.replace(
        cfg,
        sae=dataclasses.replace(cfg.sae, device=device),
        train_batch_size_tokens=cfg.train_batch_size_tokens // world,
        training_tokens=cfg.training_tokens // world,
        device=device,
        llm_device=_rank_device(cfg.llm_device, info.local_rank),
        act_store_device=_rank_device(cfg.act_store_device, info.local_rank),
        logger=logger,
        verbose=cfg.verbose and info.rank == 0,
    )
    # __post_init__ appended a fresh run id to the path again
    local.checkpoint_path = checkpoint_path
    return local


def shard_dataset(dataset: Any, rank: int, world_size: int) -> Dataset | IterableDataset:
    """This rank's part of ``dataset`` (``datasets.distributed.split_dataset_by_node``)."""
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise TypeError(
            f"data-parallel training needs a datasets.Dataset or IterableDataset, got "
            f"{type(dataset).__name__} (pick a split, e.g. dataset['train'])"
        )
    if isinstance(dataset, Dataset):
        return split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


class DistributedLanguageModelSAETrainingRunner(LanguageModelSAETrainingRunner):
    """SAELens's :class:`LanguageModelSAETrainingRunner` for one rank of a data-parallel run.

    Takes the run's (global) config, the same on every rank; builds this
    rank's config (:func:`rank_runner_config`) and data shard
    (:func:`shard_dataset`, of ``override_dataset`` or of the dataset at
    ``cfg.dataset_path``) and trains with :class:`DistributedSAETrainer`. Rank
    0 writes the checkpoints (plus every rank's ``ranks/rank_<r>/``) and the
    final SAE, with the run's config in ``runner_cfg.json``. Every rank
    returns the same trained SAE from :meth:`run`. ``torch.distributed`` must
    be initialized (:func:`init_distributed`).
    """

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig[Any],
        override_dataset: Any = None,
        override_model: Any = None,
        override_sae: TrainingSAE[Any] | None = None,
    ):
        rank, world = _require_initialized()
        self.rank_info = RankInfo(
            rank, world, int(os.environ.get("LOCAL_RANK", rank)), str(dist.get_backend())
        )
        self.run_cfg = cfg
        local_cfg = rank_runner_config(cfg, self.rank_info, _broadcast_object(cfg.checkpoint_path))
        dataset = override_dataset
        if dataset is None and not cfg.use_cached_activations:
            dataset = load_dataset(
                cfg.dataset_path,
                split="train",
                streaming=cfg.streaming,
                trust_remote_code=cfg.dataset_trust_remote_code,  # type: ignore[arg-type]
            )
        if dataset is not None:
            dataset = shard_dataset(dataset, rank, world)
        super().__init__(
            local_cfg,
            override_dataset=dataset,
            override_model=override_model,
            override_sae=override_sae,
        )
        store = self.activations_store
        if store.cached_activation_dataset is not None:
            store.cached_activation_dataset = shard_dataset(
                store.cached_activation_dataset, rank, world
            )  # type: ignore[assignment]

    @contextmanager
    def _run_config(self) -> Iterator[None]:
        # SAELens writes self.cfg next to saved SAEs: write the run's config
        local, self.cfg = self.cfg, self.run_cfg
        try:
            yield
        finally:
            self.cfg = local

    @override
    def run(self) -> Any:
        """Train on this rank's shard; rank 0 saves. Every rank must call it."""
        import wandb

        rank = self.rank_info.rank
        self._set_sae_metadata()
        if self.cfg.logger.log_to_wandb:
            wandb.init(
                project=self.cfg.logger.wandb_project,
                entity=self.cfg.logger.wandb_entity,
                config=self.run_cfg.to_dict(),
                name=self.cfg.logger.run_name,
                id=self.cfg.logger.wandb_id,
            )
        data_provider: DataProvider = self.activations_store
        if self.cfg.prefetch_llm_batches:
            prefetch = (
                1
                if isinstance(self.cfg.prefetch_llm_batches, bool)
                else self.cfg.prefetch_llm_batches
            )
            data_provider = PrefetchingIterator(iter(self.activations_store), prefetch=prefetch)
        try:
            trainer = DistributedSAETrainer(
                cfg=self.cfg.to_sae_trainer_config(),
                sae=self.sae,
                data_provider=data_provider,
                evaluator=self.evaluator,
                save_checkpoint_fn=self.save_checkpoint,
            )
            resume = self.cfg.resume_from_checkpoint
            if resume is not None:
                _check_manifest(resume, self.rank_info.world_size)
                trainer.load_trainer_state(resume)
                self.sae.load_weights_from_checkpoint(resume)
                trainer.load_rank_state(resume)
                self.activations_store.load_from_checkpoint(rank_state_dir(resume, rank))
            self._compile_sae_if_needed()
            sae = self.run_trainer_with_interruption_handling(trainer)  # type: ignore[arg-type]
            window = gather_calibration_window(sae, self.cfg.train_batch_size_tokens)
            if rank == 0 and self.cfg.output_path is not None:
                with _calibration_window(sae, window), self._run_config():
                    self.save_final_sae(
                        sae=sae,
                        output_path=self.cfg.output_path,
                        log_feature_sparsity=trainer.log_feature_sparsity,
                    )
            dist.barrier()
            if self.cfg.logger.log_to_wandb:
                wandb.finish()
            return sae
        finally:
            if isinstance(data_provider, PrefetchingIterator):
                data_provider.close()

    @override
    def save_checkpoint(self, checkpoint_path: Path | None) -> None:
        """This rank's data position into ``ranks/rank_<r>/``; rank 0 also SAELens's files."""
        if checkpoint_path is None:
            return
        rank_dir = rank_state_dir(checkpoint_path, self.rank_info.rank)
        rank_dir.mkdir(parents=True, exist_ok=True)
        self.activations_store.save_to_checkpoint(rank_dir)
        if self.rank_info.rank == 0:
            self.activations_store.save_to_checkpoint(checkpoint_path)
            with open(Path(checkpoint_path) / RUNNER_CFG_FILENAME, "w") as f:
                json.dump(self.run_cfg.to_dict(), f)


def train_distributed(
    cfg: LanguageModelSAERunnerConfig[Any], *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> TrainingSAE[Any]:
    """Run ``cfg`` as one rank of a torchrun job (what ``sae-lens-choice train`` does there).

    Joins the process group (:func:`init_distributed`), trains with
    :class:`DistributedLanguageModelSAETrainingRunner` and leaves the group,
    also on failure (so the other ranks fail at once instead of waiting out
    the timeout). Ranks other than 0 show no progress bars.
    """
    info = init_distributed(cfg.device, timeout_s=timeout_s)
    if info.rank != 0:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return DistributedLanguageModelSAETrainingRunner(cfg).run()
    finally:
        dist.destroy_process_group()
