"""Data-parallel training (``sae_lens_choice.distributed_training``) in real processes.

Ranks are real processes (``multiprocessing`` spawn) in a gloo process group
on 127.0.0.1. Start-up (importing SAELens) dominates the cost, so one group
per world size runs every stage in turn and writes each stage's result to a
file; the parent computes the single-process references meanwhile and
compares:

- a few training steps of SAELens's own trainer (forward, the exact
  selection, backward, gradient averaging, norm clipping, Adam, the trainer's
  firing statistics, the activation-norm estimate) on each rank's shard equal
  SAELens's trainer run in one process on the concatenated batches, for
  ``mutual_choice``, ``feature_choice`` and SAELens's ``topk`` (float64, so the
  tolerance is tight); every rank ends with the same weights and buffers, the
  density / threshold EMAs and step counter equal the single-process ones,
  and the gathered calibration ring is the single-process ring. The ranks
  start from different random inits: rank 0's is broadcast. ``batchtopk``
  (per-rank selection) ends identical on every rank;
- a full run through the runner glue (tiny HookedTransformer, local token
  dataset sharded per rank) where only rank 0 saves, then a run resumed from
  its mid-run checkpoint that ends bit for bit where it ended;
- a rank that raises (2 ranks) or calls ``os._exit`` (3 ranks) in the middle
  of training: the others fail with an error instead of hanging (the parent
  waits with a generous deadline; no timing is asserted).

One more test launches ``python -m torch.distributed.run`` on the ``train``
command with 2 workers (the model and dataset swapped for local ones, as in
``tests/test_cli.py``): rank 0 writes the SAE, which loads as SAELens's
``jumprelu``.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import textwrap
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from sae_lens import SAE, JumpReLUSAE, LanguageModelSAERunnerConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file

from sae_lens_choice.distributed_training import (
    MANIFEST_FILENAME,
    DistributedLanguageModelSAETrainingRunner,
    DistributedSAETrainer,
    gather_calibration_window,
    rank_state_dir,
)
from tests.helpers import (
    REPO_ROOT,
    TINY_HOOK,
    TRAINING_CLASSES,
    checkpoint_dirs,
    runner_config,
    sparse_activations,
    tiny_model,
    token_dataset,
)
from tests.process_groups import free_port, join_local_group

os.environ.setdefault("WANDB_MODE", "disabled")

# a group that has not finished by then is hung: the test fails instead of blocking
DEADLINE_S = 240.0
# collectives wait this long for a peer (start-up skew included) before failing
GROUP_TIMEOUT_S = 60.0

D_IN, D_SAE, K = 16, 64, 4
GLOBAL_BATCH = 96  # tokens per step over all ranks: 48 on 2 ranks, 32 on 3
STEPS = 6
NORM_BATCHES = 2  # batches SAELens's trainer reads to estimate the activation norm
RING = 80  # calibration tokens: the last step of some ranks, part of another's


# ---------------------------------------------------------------------------
# trainer steps: cases and the single-process reference
# ---------------------------------------------------------------------------


@dataclass
class StepCase:
    """One SAE trained for ``STEPS`` steps of ``GLOBAL_BATCH`` tokens."""

    name: str
    arch: str
    overrides: dict[str, Any] = field(default_factory=dict)
    compare: bool = True  # False: per-rank selection, only compared across ranks
    # SAELens sums activation norms in float32 (then .item()): split over ranks,
    # the scaling factor differs in its 8th digit, and so does everything after
    rtol: float = 1e-9


def _step_cases(world: int) -> list[StepCase]:
    choice = {"threshold_calibration_tokens": RING, "dtype": "float64"}
    cases = [
        StepCase(
            "mutual_choice",
            "mutual_choice",
            {
                **choice,
                "aux_loss": "aux_zipf",
                "zipf_refit_every": 1,
                "density_ema_decay": 0.8,
                "normalize_activations": "expected_average_only_in",
            },
            rtol=1e-6,
        ),
        StepCase("feature_choice", "feature_choice", {**choice, "aux_loss": "aux_k"}),
    ]
    if world == 2:
        cases += [
            StepCase(
                "feature_choice_density_rank",
                "feature_choice",
                {
                    **choice,
                    "capacity": "zipf",
                    "capacity_order": "density_rank",
                    "density_ema_decay": 0.5,
                },
            ),
            StepCase("topk", "topk", {"dtype": "float64"}),
            StepCase("batchtopk", "batchtopk", {"dtype": "float64"}, compare=False),
        ]
    return cases


def _make_sae(case: StepCase, seed: int) -> Any:
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"d_in": D_IN, "d_sae": D_SAE, "k": K, **case.overrides}
    if case.arch == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(**kwargs))
    if case.arch == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**kwargs))
    sae_class, cfg_class = TRAINING_CLASSES[case.arch]
    return sae_class(cfg_class(**kwargs))


def _global_batches() -> list[torch.Tensor]:
    n = NORM_BATCHES + STEPS
    return [sparse_activations(GLOBAL_BATCH, seed=100 + i, d_in=D_IN).double() for i in range(n)]


def _trainer_config(world: int) -> SAETrainerConfig:
    batch = GLOBAL_BATCH // world
    return SAETrainerConfig(
        total_training_samples=STEPS * batch,
        train_batch_size_samples=batch,
        lr=3e-3,
        lr_end=3e-4,  # SAETrainerConfig leaves it to the runner config to fill in
        dead_feature_window=1,  # latents quiet for 2 steps are dead: the aux losses run
        feature_sampling_window=1000,
        n_batches_for_norm_estimate=NORM_BATCHES,
        device="cpu",
    )


def _numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy().copy() for name, t in module.state_dict().items()}


def _trainer_result(trainer: SAETrainer[Any, Any]) -> dict[str, Any]:
    return {
        "state": _numpy_state(trainer.sae),
        "act_freq_scores": trainer.act_freq_scores.numpy().copy(),
        "since_fired": trainer.n_forward_passes_since_fired.numpy().copy(),
        "n_frac_active_samples": trainer.n_frac_active_samples,
        "dead": int(trainer.dead_neurons.sum()),
    }


@functools.cache
def _cached_reference(name: str, world: int) -> dict[str, Any]:
    (case,) = [c for c in _step_cases(world) if c.name == name]
    return _reference(case)


def _reference(case: StepCase) -> dict[str, Any]:
    """SAELens's trainer in this process on the concatenated batches."""
    sae = _make_sae(case, seed=0)
    trainer = SAETrainer(_trainer_config(1), sae, iter(_global_batches()))
    trainer.fit()
    return _trainer_result(trainer)


# ---------------------------------------------------------------------------
# stages run on every rank
# ---------------------------------------------------------------------------


def _stage_steps(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for case in _step_cases(world):
        # a different init on every rank: the trainer broadcasts rank 0's
        sae = _make_sae(case, seed=rank)
        n = GLOBAL_BATCH // world
        local = [b[rank * n : (rank + 1) * n] for b in _global_batches()]
        trainer = DistributedSAETrainer(_trainer_config(world), sae, iter(local))
        trainer.fit()
        result = _trainer_result(trainer)
        window = gather_calibration_window(sae, n)
        if window is not None:
            result["window"] = (window[0].numpy().copy(), int(window[1]))
        out[case.name] = result
    return out


def _runner_config(tmp: Path, **overrides: Any) -> LanguageModelSAERunnerConfig[Any]:
    from sae_lens_choice import FeatureChoiceTrainingSAEConfig

    sae_cfg = FeatureChoiceTrainingSAEConfig(
        d_in=16, d_sae=64, k=4, aux_loss="aux_zipf", zipf_refit_every=3,
        threshold_calibration_tokens=96,
    )  # fmt: skip
    data_parallel: dict[str, Any] = {
        # one LLM batch of 4 x 16 tokens fills the buffer and is one rank's batch:
        # SAELens checkpoints the dataset position, not a half-served buffer, so
        # this makes every step a point to resume from exactly
        "n_batches_in_buffer": 4,
        "store_batch_size_prompts": 4,
        "train_batch_size_tokens": 128,  # 64 per rank
        "training_tokens": 128 * 12,
        "n_checkpoints": 1,
        # an unmixed stream resumes exactly (SAELens does not checkpoint the mixing buffer)
        "activations_mixing_fraction": 0.0,
    }
    return runner_config(sae_cfg, tmp, **{**data_parallel, **overrides})


class _RecordingRunner(DistributedLanguageModelSAETrainingRunner):
    """The real runner, counting the saves this rank makes."""

    saves: dict[str, int]

    def __init__(self, cfg: Any) -> None:
        super().__init__(
            cfg,
            override_model=tiny_model(),
            override_dataset=token_dataset(),
        )
        self.saves = {"save_final_sae": 0, "save_model": 0, "save_inference_model": 0}
        for name in ("save_model", "save_inference_model"):
            setattr(self.sae, name, self._counting(name, getattr(self.sae, name)))

    def _counting(self, name: str, method: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.saves[name] += 1
            return method(*args, **kwargs)

        return wrapper

    def save_final_sae(self, *args: Any, **kwargs: Any) -> None:
        self.saves["save_final_sae"] += 1
        super().save_final_sae(*args, **kwargs)


def _stage_runner(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    # each rank works in its own empty folder: anything relative it wrote would show
    cwd = tmp / f"cwd_{rank}"
    cwd.mkdir()
    os.chdir(cwd)
    runner = _RecordingRunner(_runner_config(tmp))
    sae = runner.run()
    first = {"state": _numpy_state(sae), "saves": runner.saves}
    (checkpoint,) = checkpoint_dirs(tmp / "checkpoints")
    resumed_runner = _RecordingRunner(
        _runner_config(
            tmp,
            n_checkpoints=0,
            resume_from_checkpoint=str(checkpoint),
            output_path=str(tmp / "resumed"),
        )
    )
    resumed = resumed_runner.run()
    return {
        "first": first,
        "resumed": {"state": _numpy_state(resumed), "saves": resumed_runner.saves},
        "checkpoint": str(checkpoint),
        "cwd_files": sorted(str(p) for p in cwd.rglob("*")),
    }


class _FailingProvider:
    """Yields the batches, then fails on the given rank at batch ``at``."""

    def __init__(self, batches: list[torch.Tensor], rank: int, world: int, at: int, how: str):
        self.batches, self.rank, self.world, self.at, self.how = iter(batches), rank, world, at, how
        self.served = 0

    def __iter__(self) -> _FailingProvider:
        return self

    def __next__(self) -> torch.Tensor:
        if self.rank == self.world - 1 and self.served == self.at:
            if self.how == "exit":
                os._exit(7)
            raise RuntimeError(f"rank {self.rank} failed on purpose")
        self.served += 1
        return next(self.batches)


def _stage_failure(rank: int, world: int, tmp: Path, how: str) -> str:
    case = _step_cases(world)[0]
    n = GLOBAL_BATCH // world
    local = [b[rank * n : (rank + 1) * n] for b in _global_batches()]
    provider = _FailingProvider(local, rank, world, at=NORM_BATCHES + 2, how=how)
    trainer = DistributedSAETrainer(_trainer_config(world), _make_sae(case, 0), provider)
    try:
        trainer.fit()
        return "finished"
    except Exception as err:
        return "\n".join([f"{type(err).__name__}: {err}", *getattr(err, "__notes__", [])])


STAGES = {
    "steps": _stage_steps,
    "runner": _stage_runner,
    "raise": lambda rank, world, tmp: _stage_failure(rank, world, tmp, "raise"),
    "exit": lambda rank, world, tmp: _stage_failure(rank, world, tmp, "exit"),
}


def _worker(rank: int, world: int, port: int, stages: list[str], tmp: Path) -> None:
    torch.set_num_threads(1)
    os.environ["WANDB_MODE"] = "disabled"
    try:
        join_local_group(rank, world, port, GROUP_TIMEOUT_S)
        for stage in stages:
            try:
                answer = ("ok", STAGES[stage](rank, world, tmp))
            except BaseException as err:
                answer = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
            # written whole, then renamed: the parent never reads half a file
            part = tmp / f"{stage}_{rank}.part"
            part.write_bytes(pickle.dumps(answer))
            part.rename(tmp / f"{stage}_{rank}.pkl")
            if answer[0] == "error":
                break
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Group:
    """``world`` spawned ranks running ``stages``; results read back by stage and rank."""

    def __init__(self, world: int, stages: list[str], tmp: Path):
        self.world, self.tmp = world, tmp
        ctx = mp.get_context("spawn")
        port = free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world, port, stages, tmp)) for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self._joined = False

    def join(self) -> list[int | None]:
        """Wait for every rank; fail the test (killing them) if one hangs."""
        if not self._joined:
            deadline = time.monotonic() + DEADLINE_S
            for p in self.procs:
                p.join(timeout=max(deadline - time.monotonic(), 0.1))
            hung = [r for r, p in enumerate(self.procs) if p.is_alive()]
            for p in self.procs:
                if p.is_alive():
                    p.kill()
                    p.join()
            self._joined = True
            if hung:
                pytest.fail(f"ranks {hung} hung")
        return [p.exitcode for p in self.procs]

    def result(self, stage: str, rank: int) -> tuple[str, Any] | None:
        self.join()
        path = self.tmp / f"{stage}_{rank}.pkl"
        return pickle.loads(path.read_bytes()) if path.exists() else None

    def ok(self, stage: str, rank: int) -> Any:
        answer = self.result(stage, rank)
        assert answer is not None, f"rank {rank} wrote no result for {stage}"
        status, value = answer
        assert status == "ok", value
        return value


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Group:
    return Group(2, ["steps", "runner", "raise"], tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory: pytest.TempPathFactory) -> Group:
    return Group(3, ["steps", "exit"], tmp_path_factory.mktemp("three_ranks"))


# ---------------------------------------------------------------------------
# distributed steps equal single-process steps
# ---------------------------------------------------------------------------

LOCAL_STATE = ("calibration_acts", "calibration_tokens_seen")  # each rank's own ring


def _assert_same_states(states: list[dict[str, np.ndarray]], what: str) -> None:
    """Every rank's weights and buffers bit for bit equal (each rank's own ring aside)."""
    for rank, state in enumerate(states[1:], start=1):
        assert state.keys() == states[0].keys()
        for name, value in states[0].items():
            if name not in LOCAL_STATE:
                np.testing.assert_array_equal(state[name], value, err_msg=f"{what} {rank} {name}")


def _assert_same_across_ranks(results: list[dict[str, Any]], what: str) -> None:
    _assert_same_states([result["state"] for result in results], what)
    for result in results[1:]:
        for name in ("act_freq_scores", "since_fired", "n_frac_active_samples"):
            np.testing.assert_array_equal(result[name], results[0][name], err_msg=name)


def _assert_close(actual: np.ndarray, expected: np.ndarray, name: str, rtol: float = 1e-9) -> None:
    assert actual.dtype == expected.dtype, name
    if np.issubdtype(expected.dtype, np.floating):
        # float64 weights; the float32 density EMA sums exact integer counts
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * 1e-3, err_msg=name)
    else:
        np.testing.assert_array_equal(actual, expected, err_msg=name)


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_steps_equal_single_process_steps(
    world: int, two_ranks: Group, three_ranks: Group
) -> None:
    group = two_ranks if world == 2 else three_ranks
    cases = _step_cases(world)
    references = {c.name: _cached_reference(c.name, world) for c in cases if c.compare}
    answers = [group.ok("steps", r) for r in range(world)]
    for case in cases:
        results = [answer[case.name] for answer in answers]
        _assert_same_across_ranks(results, case.name)
        if not case.compare:
            continue
        expected, actual = references[case.name], results[0]
        for name, value in expected["state"].items():
            if name not in LOCAL_STATE:
                _assert_close(actual["state"][name], value, f"{case.name} {name}", case.rtol)
        # the trainer's firing statistics are those of the whole batch, exactly
        for name in ("act_freq_scores", "since_fired", "n_frac_active_samples"):
            np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
        if "window" in actual:
            # rank 0 gathers exactly the single-process calibration ring
            acts, seen = actual["window"]
            assert seen == int(expected["state"]["calibration_tokens_seen"]) == STEPS * 96
            _assert_close(acts, expected["state"]["calibration_acts"], "ring", case.rtol)
        else:
            assert case.arch == "topk"
    # the aux losses were exercised: dead latents existed
    assert references["mutual_choice"]["dead"] > 0


def test_distributed_state_buffers_are_global(two_ranks: Group) -> None:
    """Density EMA, threshold EMA, Zipf fit and step counter: the same on every rank."""
    answers = [two_ranks.ok("steps", r) for r in range(2)]
    reference = _cached_reference("mutual_choice", 2)["state"]  # with aux_zipf
    for answer in answers:
        state = answer["mutual_choice"]["state"]
        assert int(state["training_steps"]) == int(state["threshold_updates"]) == STEPS
        assert np.isfinite(state["zipf_fit"]).all()
        for name in ("latent_density_ema", "threshold", "zipf_fit", "training_steps"):
            _assert_close(state[name], reference[name], name, rtol=1e-6)
    # the density EMA moved away from its start value k / d_sae
    assert not np.allclose(answers[0]["mutual_choice"]["state"]["latent_density_ema"], K / D_SAE)


# ---------------------------------------------------------------------------
# runner glue: only rank 0 writes; resume from a distributed checkpoint
# ---------------------------------------------------------------------------


def test_runner_trains_saves_once_and_resumes_exactly(two_ranks: Group) -> None:
    answers = [two_ranks.ok("runner", r) for r in range(2)]
    tmp = two_ranks.tmp
    # only rank 0 saved: one checkpoint and one final SAE
    assert answers[0]["first"]["saves"] == {
        "save_final_sae": 1,
        "save_model": 1,
        "save_inference_model": 1,
    }
    assert answers[1]["first"]["saves"] == dict.fromkeys(answers[1]["first"]["saves"], 0)
    assert answers[1]["resumed"]["saves"] == dict.fromkeys(answers[1]["resumed"]["saves"], 0)
    assert answers[0]["cwd_files"] == answers[1]["cwd_files"] == []
    # every rank ends with the same SAE
    for run in ("first", "resumed"):
        _assert_same_states([answer[run]["state"] for answer in answers], run)

    # the checkpoint: named by the run's token count, with every rank's state
    checkpoint = Path(answers[0]["checkpoint"])
    assert 0 < int(checkpoint.name) < 128 * 12 and int(checkpoint.name) % 128 == 0
    assert (checkpoint / MANIFEST_FILENAME).exists()
    for rank in range(2):
        files = {p.name for p in rank_state_dir(checkpoint, rank).iterdir()}
        assert files == {"activations_store_state.safetensors", "calibration_state.safetensors"}
    # the SAE in the checkpoint holds the single-process ring: the latest 96
    # tokens of the whole stream (both ranks' rings hold 96 tokens of their own)
    rank_rings = [
        load_file(rank_state_dir(checkpoint, r) / "calibration_state.safetensors") for r in range(2)
    ]
    seen = int(rank_rings[0]["calibration_tokens_seen"])
    assert seen == int(rank_rings[1]["calibration_tokens_seen"]) == int(checkpoint.name) // 2
    # the global ring's last 96 tokens: the last step's 64 of rank 1, the last 32 of rank 0
    expected = torch.zeros(96, 16)
    for r, local in ((0, range(seen - 32, seen)), (1, range(seen - 64, seen))):
        for p in local:
            g = (p // 64) * 128 + r * 64 + p % 64
            expected[g % 96] = rank_rings[r]["calibration_acts"][p % 96]
    saved = load_file(checkpoint / "sae_weights.safetensors")
    assert torch.equal(saved["calibration_acts"], expected)

    # the final SAE: SAELens's jumprelu, written once with the run's config
    output = tmp / "output"
    loaded = SAE.load_from_disk(output)
    assert type(loaded) is JumpReLUSAE
    runner_cfg = (output / "runner_cfg.json").read_text()
    assert (
        '"training_tokens": 1536' in runner_cfg and '"train_batch_size_tokens": 128' in runner_cfg
    )

    # resumed from the checkpoint: the same SAE, bit for bit
    for rank in range(2):
        first, resumed = answers[rank]["first"]["state"], answers[rank]["resumed"]["state"]
        for name, value in first.items():
            assert np.array_equal(resumed[name], value, equal_nan=True), (rank, name)
    saved_first = load_file(output / "sae_weights.safetensors")
    saved_resumed = load_file(tmp / "resumed" / "sae_weights.safetensors")
    assert saved_first.keys() == saved_resumed.keys()
    for name, value in saved_first.items():
        assert torch.equal(saved_resumed[name], value), name


# ---------------------------------------------------------------------------
# a rank that dies stops the others
# ---------------------------------------------------------------------------


def test_a_rank_that_raises_stops_the_others(two_ranks: Group) -> None:
    assert two_ranks.join() == [0, 0]
    failing = two_ranks.ok("raise", 1)
    assert failing.startswith("RuntimeError: rank 1 failed on purpose")
    # rank 0 was waiting in a collective: it fails too, with the collective's
    # error and a note naming the rank and step
    survivor = two_ranks.ok("raise", 0)
    assert survivor != "finished" and "failed on purpose" not in survivor
    if sys.version_info >= (3, 11):
        assert "rank 0 of 2 stopped training at step" in survivor


def test_a_rank_that_exits_stops_the_others(three_ranks: Group) -> None:
    exitcodes = three_ranks.join()
    assert exitcodes[2] == 7  # os._exit(7): no result, no cleanup
    assert three_ranks.result("exit", 2) is None
    for rank in (0, 1):
        survivor = three_ranks.ok("exit", rank)
        assert survivor != "finished"
        if sys.version_info >= (3, 11):
            assert f"rank {rank} of 3 stopped training" in survivor


# ---------------------------------------------------------------------------
# torchrun and the train command
# ---------------------------------------------------------------------------

# Put on PYTHONPATH as sitecustomize.py, it runs first in every Python process
# of the launch; in torchrun's workers (RANK is set) it swaps the Hub model and
# dataset for local ones (there is no network), as tests/test_cli.py swaps the
# runner. The launcher and torchrun's agent run unchanged.
_OFFLINE_WORKERS = textwrap.dedent(
    """
    import os, sys
    if "RANK" in os.environ:
        sys.path.insert(0, {repo!r})
        from sae_lens_choice import distributed_training
        from tests.helpers import tiny_model, token_dataset

        class OfflineRunner(distributed_training.DistributedLanguageModelSAETrainingRunner):
            def __init__(self, cfg, **kwargs):
                model, dataset = tiny_model(), token_dataset()
                super().__init__(cfg, override_model=model, override_dataset=dataset)

        distributed_training.DistributedLanguageModelSAETrainingRunner = OfflineRunner
    """
)


def test_train_command_launches_itself_under_torchrun(tmp_path: Path) -> None:
    """``python -m sae_lens_choice train --nproc-per-node 2``: re-executed under torchrun."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_OFFLINE_WORKERS.format(repo=str(REPO_ROOT)))
    output = tmp_path / "output"
    args = [
        "--nproc-per-node", "2", "--dist-timeout", "60",
        "--architecture", "mutual_choice", "--d_in", "16", "--d_sae", "64", "--k", "4",
        "--model_name", "tiny-random", "--hook_name", TINY_HOOK, "--dataset_path", "local",
        "--is_dataset_tokenized", "true", "--streaming", "false", "--prepend_bos", "false",
        "--context_size", "16", "--store_batch_size_prompts", "4", "--n_batches_in_buffer", "8",
        "--train_batch_size_tokens", "128", "--training_tokens", "768",
        "--threshold_calibration_tokens", "64", "--log_to_wandb", "false", "--n_checkpoints", "1",
        "--checkpoint_path", str(tmp_path / "checkpoints"), "--output_path", str(output),
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-m", "sae_lens_choice", "train", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=DEADLINE_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = SAE.load_from_disk(output)
    assert type(loaded) is JumpReLUSAE
    assert loaded.cfg.metadata.training_architecture == "mutual_choice"
    runner_cfg = (output / "runner_cfg.json").read_text()
    assert '"training_tokens": 768' in runner_cfg
    # two ranks trained: the mid-run checkpoint holds both ranks' state
    manifest = next((tmp_path / "checkpoints").rglob(MANIFEST_FILENAME))
    assert '"world_size": 2' in manifest.read_text()
    assert sorted(p.name for p in (manifest.parent / "ranks").iterdir()) == ["rank_0", "rank_1"]
