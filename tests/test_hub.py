"""Publishing with SAELens's upload_saes_to_huggingface and loading back with from_pretrained.

The Hub is unreachable here, so the test stops at the network boundary: only
the ``HfApi`` calls (and the module-level ``create_repo`` /
``get_hf_file_metadata`` helpers the uploader imported) are replaced, by fakes
that record what would be sent and apply ``allow_patterns`` with
huggingface_hub's own ``filter_repo_objects``. The recorded files are then laid
out as a real Hugging Face cache (``models--org--repo/snapshots/<commit>/...``,
``refs/main``) and ``SAE.from_pretrained`` runs against it in a fresh
interpreter with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects
from sae_lens import SAE, JumpReLUSAE, upload_saes_to_huggingface
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training import upload_saes_to_huggingface as upload_module
from safetensors.torch import load_file, save_file

from tests.helpers import (
    make_calibrated_legacy_sae,
    make_trained_sae,
    run_python,
    save_legacy_folder,
    sparse_activations,
)

D_SAE = 64
REPO = "choice-org/tiny-choice-saes"
REPO_ROOT = Path(__file__).resolve().parents[1]
METADATA = SAEMetadata(hook_name="blocks.0.hook_resid_post", model_name="tiny")


def save_trained(path: Path, arch: str, seed: int) -> JumpReLUSAE:
    """What users publish: a SAE trained by this package and saved (SAELens's jumprelu)."""
    sae = make_trained_sae(arch, n_steps=8, seed=seed, metadata=METADATA)
    sae.save_inference_model(path)
    loaded = SAE.load_from_disk(path)
    assert isinstance(loaded, JumpReLUSAE)
    return loaded


#: A 0.1.0 SAE (``mutual_choice``/``feature_choice`` architecture) as published.
LEGACY: dict[str, Any] = {"b_enc": 0.5, "rescale_acts_by_decoder_norm": True, "metadata": METADATA}


# ---------------------------------------------------------------------------
# the network boundary
# ---------------------------------------------------------------------------


@dataclass
class FakeHub:
    """What would have been sent to the Hub."""

    repos_created: list[str] = field(default_factory=list)
    repo_exists: bool = False
    files: dict[str, bytes] = field(default_factory=dict)  # path in repo -> content
    folder_uploads: list[dict[str, Any]] = field(default_factory=list)
    file_uploads: list[dict[str, Any]] = field(default_factory=list)

    def write_hf_cache(self, hub_cache: Path, repo_id: str) -> str:
        """Lay the uploaded files out as huggingface_hub's cache does after a download."""
        commit = hashlib.sha1(json.dumps(sorted(self.files)).encode()).hexdigest()
        repo_dir = hub_cache / f"models--{repo_id.replace('/', '--')}"
        for path, content in self.files.items():
            blob = hashlib.sha256(content).hexdigest()
            (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
            (repo_dir / "blobs" / blob).write_bytes(content)
            target = repo_dir / "snapshots" / commit / path
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(repo_dir / "blobs" / blob, target.parent), target)
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(commit)
        return commit


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    hub = FakeHub()

    def repo_info(self: HfApi, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        if not hub.repo_exists:
            response = SimpleNamespace(headers={}, request=None, status_code=404)
            raise RepositoryNotFoundError(f"{repo_id} not found", response=response)  # type: ignore[arg-type]
        return SimpleNamespace(id=repo_id)

    def create_repo(repo_id: str, *args: Any, **kwargs: Any) -> None:
        hub.repos_created.append(repo_id)
        hub.repo_exists = True

    def upload_folder(self: HfApi, **kwargs: Any) -> None:
        assert kwargs["repo_id"] == REPO and hub.repo_exists
        hub.folder_uploads.append(kwargs)
        folder = Path(kwargs["folder_path"])
        local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        for rel in filter_repo_objects(local, allow_patterns=kwargs.get("allow_patterns")):
            hub.files[f"{kwargs['path_in_repo']}/{rel}"] = (folder / rel).read_bytes()

    def get_hf_file_metadata(url: str, *args: Any, **kwargs: Any) -> Any:
        name = url.rsplit("/", 1)[-1]
        if not any(path == name for path in hub.files):
            raise EntryNotFoundError(f"{url} not found")
        return SimpleNamespace(url=url)

    def upload_file(self: HfApi, **kwargs: Any) -> None:
        hub.file_uploads.append(kwargs)
        content = kwargs["path_or_fileobj"].read()
        hub.files[kwargs["path_in_repo"]] = content

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "upload_file", upload_file)
    monkeypatch.setattr(upload_module, "create_repo", create_repo)
    monkeypatch.setattr(upload_module, "get_hf_file_metadata", get_hf_file_metadata)
    return hub


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


def test_upload_sends_exactly_the_saelens_files(fake_hub: FakeHub, tmp_path: Path) -> None:
    # A saved folder (as the runner's output_path holds it), a loaded SAE
    # object, and a 0.1.0 SAE object, which the uploader saves with save_model.
    mc_dir = tmp_path / "mc"
    save_trained(mc_dir, "mutual_choice", seed=0)
    save_file({"sparsity": torch.randn(D_SAE)}, mc_dir / "sparsity.safetensors")
    (mc_dir / "runner_cfg.json").write_text("{}")
    (mc_dir / "notes.txt").write_text("not for upload")  # filtered by allow_patterns
    fc = save_trained(tmp_path / "fc", "feature_choice", seed=1)

    upload_saes_to_huggingface(
        {
            "blocks.0/mutual_choice": mc_dir,
            "blocks.0/feature_choice": fc,
            "blocks.0/legacy": make_calibrated_legacy_sae("mutual_choice", seed=2, **LEGACY),
        },
        hf_repo_id=REPO,
        show_progress=False,
    )

    assert fake_hub.repos_created == [REPO]
    assert [u["path_in_repo"] for u in fake_hub.folder_uploads] == [
        "blocks.0/mutual_choice",
        "blocks.0/feature_choice",
        "blocks.0/legacy",
    ]
    assert all(u["revision"] == "main" for u in fake_hub.folder_uploads)
    assert sorted(fake_hub.files) == [
        "README.md",
        "blocks.0/feature_choice/cfg.json",
        "blocks.0/feature_choice/sae_weights.safetensors",
        "blocks.0/legacy/cfg.json",
        "blocks.0/legacy/sae_weights.safetensors",
        "blocks.0/mutual_choice/cfg.json",
        "blocks.0/mutual_choice/runner_cfg.json",
        "blocks.0/mutual_choice/sae_weights.safetensors",
        "blocks.0/mutual_choice/sparsity.safetensors",
    ]
    for sae_id, arch in [("mutual_choice", "mutual_choice"), ("feature_choice", "feature_choice")]:
        cfg = json.loads(fake_hub.files[f"blocks.0/{sae_id}/cfg.json"])
        assert cfg["architecture"] == "jumprelu"
        assert cfg["metadata"]["training_architecture"] == arch
        assert cfg["metadata"]["training_architecture_details"]["k"] == 4
    legacy_cfg = json.loads(fake_hub.files["blocks.0/legacy/cfg.json"])
    assert legacy_cfg["architecture"] == "mutual_choice" and legacy_cfg["k"] == 4
    assert legacy_cfg["inference_mode"] == "threshold"
    readme = fake_hub.files["README.md"].decode()
    assert "blocks.0/mutual_choice" in readme and f'SAE.from_pretrained("{REPO}"' in readme
    # the uploader checks for a README after each SAE and writes it once
    assert [u["path_in_repo"] for u in fake_hub.file_uploads] == ["README.md"]


_CHILD = """
import sys
from safetensors.torch import load_file, save_file
import huggingface_hub.constants as c
assert c.HF_HUB_OFFLINE and c.HF_HUB_CACHE == sys.argv[2], (c.HF_HUB_OFFLINE, c.HF_HUB_CACHE)
from sae_lens import SAE

x = load_file(f"{sys.argv[1]}/inputs.safetensors")["x"]
out = {}
for sae_id in sys.argv[4:]:
    if sae_id.startswith("legacy/"):
        import sae_lens_choice  # 0.1.0 folders need mutual_choice / feature_choice registered
    sae, cfg, sparsity = SAE.from_pretrained_with_cfg_and_sparsity(sys.argv[3], sae_id)
    if sae_id.startswith("trained/"):  # (given first) SAELens alone loads them
        assert "sae_lens_choice" not in sys.modules, "the plugin was imported"
    out[f"{sae_id}.encode"] = sae.encode(x).detach()
    out[f"{sae_id}.forward"] = sae(x).detach()
    out[f"{sae_id}.threshold"] = sae.threshold.detach()
    if sparsity is not None:
        out[f"{sae_id}.sparsity"] = sparsity
    out[f"{sae_id}.is_" + type(sae).__name__] = x.new_ones(())
    # the plain from_pretrained call of the README
    same = SAE.from_pretrained(sys.argv[3], sae_id)
    assert (same.threshold == sae.threshold).all()
save_file(out, f"{sys.argv[1]}/outputs.safetensors")
"""


def test_from_pretrained_round_trip_through_a_local_hf_cache(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    sparsity = torch.randn(D_SAE)
    saes: dict[str, Any] = {}
    for arch, seed in [("mutual_choice", 3), ("feature_choice", 4)]:
        saes[f"trained/{arch}"] = save_trained(tmp_path / arch, arch, seed=seed)
    save_file({"sparsity": sparsity}, tmp_path / "feature_choice" / "sparsity.safetensors")
    saes["legacy/mutual_choice"] = make_calibrated_legacy_sae("mutual_choice", seed=5, **LEGACY)
    saes["legacy/feature_choice"] = save_legacy_folder(
        tmp_path / "legacy-fc", "feature_choice", seed=6, **LEGACY
    )
    upload_saes_to_huggingface(
        {
            "trained/mutual_choice": tmp_path / "mutual_choice",
            "trained/feature_choice": tmp_path / "feature_choice",
            "legacy/mutual_choice": saes["legacy/mutual_choice"],
            "legacy/feature_choice": tmp_path / "legacy-fc",
        },
        hf_repo_id=REPO,
        show_progress=False,
    )
    hub_cache = tmp_path / "hf_home" / "hub"
    commit = fake_hub.write_hf_cache(hub_cache, REPO)
    assert (
        hub_cache / "models--choice-org--tiny-choice-saes" / "refs" / "main"
    ).read_text() == commit

    x = sparse_activations(256, seed=7)
    save_file({"x": x}, tmp_path / "inputs.safetensors")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))},
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("PYTHONPATH", None)
    run_python(_CHILD, tmp_path, hub_cache, REPO, *saes, cwd=tmp_path, env=env)
    outputs = load_file(tmp_path / "outputs.safetensors")
    for arch, legacy_class in [
        ("mutual_choice", "MutualChoiceSAE"),
        ("feature_choice", "FeatureChoiceSAE"),
    ]:
        assert f"trained/{arch}.is_JumpReLUSAE" in outputs
        assert f"legacy/{arch}.is_{legacy_class}" in outputs
    with torch.no_grad():
        for sae_id, sae in saes.items():
            torch.testing.assert_close(outputs[f"{sae_id}.encode"], sae.encode(x), rtol=0, atol=0)
            torch.testing.assert_close(outputs[f"{sae_id}.forward"], sae(x), rtol=0, atol=0)
            torch.testing.assert_close(outputs[f"{sae_id}.threshold"], sae.threshold)
            assert (outputs[f"{sae_id}.encode"] > 0).any()
    torch.testing.assert_close(outputs["trained/feature_choice.sparsity"], sparsity)
    assert "trained/mutual_choice.sparsity" not in outputs


# ---------------------------------------------------------------------------
# examples/publish_to_hub.py
# ---------------------------------------------------------------------------


def _load_example() -> ModuleType:
    path = REPO_ROOT / "examples" / "publish_to_hub.py"
    spec = importlib.util.spec_from_file_location("publish_to_hub_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # guarded by __main__: uploads nothing
    return module


def test_publish_example_uploads_saved_saes_and_converts_0_1_0_folders(
    fake_hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = _load_example()
    assert fake_hub.folder_uploads == []  # importing it did nothing
    trained = save_trained(tmp_path / "mc", "mutual_choice", seed=8)
    old = save_legacy_folder(tmp_path / "old", "feature_choice", seed=9, **LEGACY)
    fake_hub.repo_exists = True
    status = example.main(
        [
            "--repo-id", REPO, "--sae", f"resid0-mc={tmp_path / 'mc'}",
            "--sae", f"resid0-fc={tmp_path / 'old'}", "--no-readme",
        ]
    )  # fmt: skip
    assert status == 0
    assert fake_hub.repos_created == []  # it existed already
    assert sorted(fake_hub.files) == [
        "resid0-fc/cfg.json",
        "resid0-fc/sae_weights.safetensors",
        "resid0-mc/cfg.json",
        "resid0-mc/sae_weights.safetensors",
    ]
    # the trained SAE goes up as saved; the 0.1.0 folder as its JumpReLU conversion
    assert fake_hub.files["resid0-mc/cfg.json"] == (tmp_path / "mc" / "cfg.json").read_bytes()
    converted = json.loads(fake_hub.files["resid0-fc/cfg.json"])
    assert converted["architecture"] == "jumprelu"
    assert converted["metadata"]["training_architecture"] == "feature_choice"
    out = capsys.readouterr().out
    assert "resid0-fc: converted a 0.1.0 feature_choice folder to jumprelu" in out
    assert "uploaded 2 SAE(s)" in out
    # the conversion encodes as the 0.1.0 SAE did
    fc_dir = tmp_path / "published-fc"
    fc_dir.mkdir()
    for name in ("cfg.json", "sae_weights.safetensors"):
        (fc_dir / name).write_bytes(fake_hub.files[f"resid0-fc/{name}"])
    x = sparse_activations(256, seed=10)
    with torch.no_grad():
        torch.testing.assert_close(
            SAE.load_from_disk(fc_dir).encode(x), old.encode(x), rtol=1e-5, atol=1e-5
        )
        assert trained.encode(x).abs().sum() > 0

    with pytest.raises(SystemExit):
        example.main(["--repo-id", REPO, "--sae", "no-equals-sign"])


def test_publish_example_refuses_bad_folders_before_uploading_anything(
    fake_hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = _load_example()
    save_trained(tmp_path / "good", "mutual_choice", seed=11)
    # a SAE with one NaN weight
    save_trained(tmp_path / "nan", "feature_choice", seed=12)
    weights = load_file(tmp_path / "nan" / "sae_weights.safetensors")
    weights["W_dec"][5, 3] = float("nan")
    save_file(weights, tmp_path / "nan" / "sae_weights.safetensors")
    # a training checkpoint, not the saved SAE
    make_trained_sae("mutual_choice", n_steps=2).save_model(tmp_path / "ckpt")

    good = f"ok={tmp_path / 'good'}"
    for bad, message in [
        (f"bad={tmp_path / 'nan'}", "W_dec holds NaN or inf; not publishing it"),
        (f"bad={tmp_path / 'ckpt'}", "A training checkpoint cannot be published"),
        (f"ok={tmp_path / 'good'}", "given twice"),
    ]:
        assert example.main(["--repo-id", REPO, "--sae", good, "--sae", bad]) == 1
        assert message in capsys.readouterr().err
    assert fake_hub.repos_created == [] and fake_hub.files == {}
