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
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects
from sae_lens import upload_saes_to_huggingface
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training import upload_saes_to_huggingface as upload_module
from safetensors.torch import load_file, save_file

from sae_lens_choice import (
    FeatureChoiceSAE,
    FeatureChoiceSAEConfig,
    MutualChoiceSAE,
    MutualChoiceSAEConfig,
    calibrate_thresholds,
)

D_IN, D_SAE = 16, 64
REPO = "choice-org/tiny-choice-saes"
REPO_ROOT = Path(__file__).resolve().parents[1]


def make_sae(arch: str, seed: int) -> MutualChoiceSAE | FeatureChoiceSAE:
    metadata = SAEMetadata(hook_name="blocks.0.hook_resid_post", model_name="tiny")
    common: dict[str, Any] = {"d_in": D_IN, "d_sae": D_SAE, "k": 4, "metadata": metadata}
    common["rescale_acts_by_decoder_norm"] = True
    sae: Any = (
        MutualChoiceSAE(MutualChoiceSAEConfig(**common))
        if arch == "mutual_choice"
        else FeatureChoiceSAE(FeatureChoiceSAEConfig(**common, capacity="zipf"))
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) / math.sqrt(D_IN))
        sae.b_enc.copy_(0.5 + 0.1 * torch.randn(D_SAE, generator=g))
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g) * 0.7)
        sae.b_dec.copy_(0.1 * torch.randn(D_IN, generator=g))
    calibrate_thresholds(sae, torch.randn(2048, D_IN, generator=g) * 2, show_progress=False)
    return sae


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
    mc = make_sae("mutual_choice", seed=0)
    fc_dir = tmp_path / "fc"
    make_sae("feature_choice", seed=1).save_model(fc_dir)
    save_file({"sparsity": torch.randn(D_SAE)}, fc_dir / "sparsity.safetensors")
    (fc_dir / "runner_cfg.json").write_text("{}")
    (fc_dir / "notes.txt").write_text("not for upload")  # filtered by allow_patterns

    upload_saes_to_huggingface(
        {"blocks.0/mutual_choice": mc, "blocks.0/feature_choice": fc_dir},
        hf_repo_id=REPO,
        show_progress=False,
    )

    assert fake_hub.repos_created == [REPO]
    assert [u["path_in_repo"] for u in fake_hub.folder_uploads] == [
        "blocks.0/mutual_choice",
        "blocks.0/feature_choice",
    ]
    assert all(u["revision"] == "main" for u in fake_hub.folder_uploads)
    assert sorted(fake_hub.files) == [
        "README.md",
        "blocks.0/feature_choice/cfg.json",
        "blocks.0/feature_choice/runner_cfg.json",
        "blocks.0/feature_choice/sae_weights.safetensors",
        "blocks.0/feature_choice/sparsity.safetensors",
        "blocks.0/mutual_choice/cfg.json",
        "blocks.0/mutual_choice/sae_weights.safetensors",
    ]
    # the SAE object was saved by save_model: our architecture, our weights
    cfg = json.loads(fake_hub.files["blocks.0/mutual_choice/cfg.json"])
    assert cfg["architecture"] == "mutual_choice" and cfg["k"] == 4
    assert cfg["inference_mode"] == "threshold"
    readme = fake_hub.files["README.md"].decode()
    assert "blocks.0/mutual_choice" in readme and f'SAE.from_pretrained("{REPO}"' in readme
    # the uploader checks for a README after each SAE and writes it once
    assert [u["path_in_repo"] for u in fake_hub.file_uploads] == ["README.md"]


_CHILD = textwrap.dedent(
    """
    import sys
    from safetensors.torch import load_file, save_file
    import huggingface_hub.constants as c
    assert c.HF_HUB_OFFLINE and c.HF_HUB_CACHE == sys.argv[2], (c.HF_HUB_OFFLINE, c.HF_HUB_CACHE)
    import sae_lens_choice  # registers mutual_choice / feature_choice
    from sae_lens import SAE

    x = load_file(f"{sys.argv[1]}/inputs.safetensors")["x"]
    out = {}
    for sae_id in sys.argv[4:]:
        sae, cfg, sparsity = SAE.from_pretrained_with_cfg_and_sparsity(sys.argv[3], sae_id)
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
)


def test_from_pretrained_round_trip_through_a_local_hf_cache(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    saes = {
        "layer0/mc": make_sae("mutual_choice", seed=2),
        "layer0/fc": make_sae("feature_choice", seed=3),
    }
    fc_dir = tmp_path / "fc"
    saes["layer0/fc"].save_model(fc_dir)
    sparsity = torch.randn(D_SAE)
    save_file({"sparsity": sparsity}, fc_dir / "sparsity.safetensors")
    upload_saes_to_huggingface(
        {"layer0/mc": saes["layer0/mc"], "layer0/fc": fc_dir},
        hf_repo_id=REPO,
        show_progress=False,
    )
    hub_cache = tmp_path / "hf_home" / "hub"
    commit = fake_hub.write_hf_cache(hub_cache, REPO)
    assert (
        hub_cache / "models--choice-org--tiny-choice-saes" / "refs" / "main"
    ).read_text() == commit

    x = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(4)) * 2
    save_file({"x": x}, tmp_path / "inputs.safetensors")
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))},
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(hub_cache), REPO, *saes],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = load_file(tmp_path / "outputs.safetensors")
    assert "layer0/mc.is_MutualChoiceSAE" in outputs
    assert "layer0/fc.is_FeatureChoiceSAE" in outputs
    with torch.no_grad():
        for sae_id, sae in saes.items():
            torch.testing.assert_close(outputs[f"{sae_id}.encode"], sae.encode(x), rtol=0, atol=0)
            torch.testing.assert_close(outputs[f"{sae_id}.forward"], sae(x), rtol=0, atol=0)
            torch.testing.assert_close(outputs[f"{sae_id}.threshold"], sae.threshold)
    torch.testing.assert_close(outputs["layer0/fc.sparsity"], sparsity)
    assert "layer0/mc.sparsity" not in outputs


def _load_example() -> ModuleType:
    path = REPO_ROOT / "examples" / "publish_to_hub.py"
    spec = importlib.util.spec_from_file_location("publish_to_hub_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # guarded by __main__: uploads nothing
    return module


def test_publish_example_uploads_saes_and_jumprelu_exports(
    fake_hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = _load_example()
    assert fake_hub.folder_uploads == []  # importing it did nothing
    make_sae("mutual_choice", seed=5).save_model(tmp_path / "mc")
    fake_hub.repo_exists = True
    status = example.main(
        ["--repo-id", REPO, "--sae", f"resid0={tmp_path / 'mc'}", "--jumprelu", "--no-readme"]
    )
    assert status == 0
    assert fake_hub.repos_created == []  # it existed already
    assert sorted(fake_hub.files) == [
        "resid0-jumprelu/cfg.json",
        "resid0-jumprelu/sae_weights.safetensors",
        "resid0/cfg.json",
        "resid0/sae_weights.safetensors",
    ]
    assert json.loads(fake_hub.files["resid0-jumprelu/cfg.json"])["architecture"] == "jumprelu"
    assert "uploaded 2 SAE(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        example.main(["--repo-id", REPO, "--sae", "no-equals-sign"])
