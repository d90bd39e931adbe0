"""Token corpora for scans: memory-mapped arrays, Hugging Face datasets, text / jsonl files.

Every corpus yields fixed-length rows of ``seq_len`` token ids in a deterministic order; row ``i`` is
always the same tokens, which is what makes resume and sharding exact. How each kind is cut:

* 1-D arrays (``.npy``, raw ``.bin``): consecutive windows of ``seq_len``; the tokens after the last
  whole window are dropped (``TokenCorpus.dropped_tokens`` says how many).
* 2-D arrays ``[rows, R]``: every stored row is cut into ``R // seq_len`` consecutive windows (so a
  ``seq_len`` shorter than the rows scans every window, not just the first), the last ``R % seq_len``
  tokens of each stored row are dropped; ``seq_len`` defaults to ``R``.
* datasets: every example's token list is cut into windows of its own (a pre-tokenised training
  row of 1024 tokens stays one row with its BOS first); each example's remainder is dropped.
* text: documents are tokenised, joined with the tokenizer's EOS and cut into windows; a final
  partial window is dropped.

Errors are `CorpusError` (a ValueError) naming the file and, where there is one, the row and byte
offset: a missing path ("no such file", per kind), an unreadable or malformed file, a raw ``.bin``
without its dtype (it has no header, so reading it with a wrong dtype would scan garbage), a corpus
shorter than one row. `TokenCorpus.check_ids` checks every id of an array corpus against the
vocabulary in one vectorised pass, before a scan does any work.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field  # `field` is the JSONL text field's parameter
from typing import Callable, Iterator, Optional, Tuple

import numpy as np

from ..optional_deps import import_optional
from ..paths import expand_path

BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32, "int32": np.int32, "int64": np.int64}
HUB_PREFIX = "hf:"  # "hf:owner/name": a dataset on the Hugging Face hub, read in streaming mode
_CHECK_BLOCK = 1 << 22  # tokens per block of the vectorised id check


class CorpusError(ValueError):
    """A corpus that cannot be read as token rows; the message names the file and offset."""


@dataclass
class TokenCorpus:
    """Rows of ``seq_len`` token ids. ``n_rows`` is None for streams of unknown length.

    ``identity`` holds what identifies the corpus cheaply (kind, dtype, shape / size, dataset
    fingerprint); a scan's checkpoint also holds a hash of the tokens it has read (see `batches`).
    """

    source: str
    kind: str  # "array", "dataset", "hub" or "text"
    seq_len: int
    n_rows: Optional[int]
    identity: dict = dataclass_field(default_factory=dict)
    dropped_tokens: Optional[int] = None  # tokens no row contains (array corpora)
    _array: Optional[np.ndarray] = dataclass_field(default=None, repr=False)  # memmap: 1-D stream or 2-D rows
    _stream: Optional[Callable] = dataclass_field(default=None, repr=False)  # callable(start_row) -> iterator of (i, row)

    def describe(self) -> dict:
        return {"source": self.source, "kind": self.kind, "seq_len": self.seq_len, "n_rows": self.n_rows,
                "dropped_tokens": self.dropped_tokens, **self.identity}

    @property
    def windows_per_row(self) -> int:
        """Rows (windows) per stored row of a 2-D array; 1 otherwise."""
        a = self._array
        return 1 if a is None or a.ndim == 1 else a.shape[1] // self.seq_len

    def row_block(self, start: int, stop: int) -> np.ndarray:
        """int64 [stop - start, seq_len]: rows ``start`` to ``stop`` of an array corpus, vectorised."""
        a = self._array
        if a is None:
            raise TypeError("row_block needs an array corpus")
        if a.ndim == 1:
            block = a[start * self.seq_len: stop * self.seq_len].reshape(-1, self.seq_len)
        else:
            wpr, L = self.windows_per_row, self.seq_len
            first, last = start // wpr, (stop - 1) // wpr + 1  # stored rows that hold the windows
            block = a[first:last, : wpr * L].reshape(-1, L)[start - first * wpr: stop - first * wpr]
        return np.array(block, dtype=np.int64)  # a private, writable copy (never a view of the file)

    def rows(self, start: int = 0) -> Iterator[Tuple[int, np.ndarray]]:
        """(row index, int64 ids [seq_len]) from row ``start`` on."""
        if self._array is not None:
            for lo in range(start, self.n_rows, 256):
                block = self.row_block(lo, min(lo + 256, self.n_rows))
                for j, row in enumerate(block):
                    yield lo + j, row
        else:
            yield from self._stream(start)

    def batches(self, batch_size: int, max_rows: Optional[int] = None) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
        """(batch index, row ids [b], int64 tokens [b, seq_len]) for every batch from the first,
        at most ``max_rows`` rows; the last batch may be short."""
        limit = self.n_rows if max_rows is None else (max_rows if self.n_rows is None else min(max_rows, self.n_rows))
        if self._array is not None:
            for b, lo in enumerate(range(0, limit, batch_size)):
                hi = min(lo + batch_size, limit)
                yield b, np.arange(lo, hi), self.row_block(lo, hi)
            return
        rows, ids, b = [], [], 0
        for i, row in self._stream(0):
            if limit is not None and i >= limit:
                break
            rows.append(row)
            ids.append(i)
            if len(rows) == batch_size:
                yield b, np.array(ids), np.stack(rows)
                rows, ids, b = [], [], b + 1
        if rows:
            yield b, np.array(ids), np.stack(rows)

    def byte_offset(self, row: int) -> Optional[int]:
        """Byte offset of a row's first token in the underlying file (for error messages), when it has one."""
        a = self._array
        if a is None:
            return None
        base = getattr(a, "offset", 0)
        if a.ndim == 1:
            return int(base + row * self.seq_len * a.dtype.itemsize)
        wpr = self.windows_per_row
        return int(base + ((row // wpr) * a.shape[1] + (row % wpr) * self.seq_len) * a.dtype.itemsize)

    def check_ids(self, d_vocab: int, max_rows: Optional[int] = None) -> None:
        """Raise CorpusError naming the first row (and byte offset) with an id outside [0, d_vocab),
        checking every row a scan of ``max_rows`` rows would read. Array corpora are checked here in
        one vectorised pass; streams (datasets, text) are checked batch by batch as they are read."""
        if self._array is None:
            return
        n = self.n_rows if max_rows is None else min(max_rows, self.n_rows)
        per_block = max(1, _CHECK_BLOCK // self.seq_len)
        for lo in range(0, n, per_block):
            block = self.row_block(lo, min(lo + per_block, n))
            bad = (block < 0) | (block >= d_vocab)
            if bad.any():
                raise self.id_error(lo + int(bad.any(axis=1).argmax()), block[bad], d_vocab)

    def id_error(self, row: int, bad_values: np.ndarray, d_vocab: int) -> CorpusError:
        where = self.byte_offset(row)
        return CorpusError(
            f"{self.source}: row {row}{'' if where is None else f' (byte offset {where})'} has token ids outside "
            f"[0, d_vocab={d_vocab}) (e.g. {int(bad_values.reshape(-1)[0])}); the corpus does not match the "
            "model's vocabulary" + (" or was read with the wrong dtype" if self.identity.get("format") == "bin" else "")
        )


def _check_array(path: str, a: np.ndarray) -> None:
    if a.dtype.type not in BIN_DTYPES.values():
        raise CorpusError(f"{path}: token array dtype {a.dtype} not supported (use uint16, uint32, int32 or int64)")
    if a.ndim not in (1, 2):
        raise CorpusError(f"{path}: token array must be 1-D (a stream) or 2-D (rows), got shape {a.shape}")
    if a.size == 0:
        raise CorpusError(f"{path}: token array is empty")


def _check_seq_len(seq_len: Optional[int]) -> None:
    if seq_len is not None and (not isinstance(seq_len, (int, np.integer)) or isinstance(seq_len, bool) or seq_len < 2):
        raise CorpusError(f"seq_len must be an int >= 2 (next-token targets), got {seq_len!r}")


def _from_array(path: str, a: np.ndarray, seq_len: Optional[int], identity: dict) -> TokenCorpus:
    _check_array(path, a)
    _check_seq_len(seq_len)
    if a.ndim == 2:
        R = a.shape[1]
        seq_len = R if seq_len is None else seq_len
        if seq_len > R:
            raise CorpusError(f"seq_len {seq_len} is longer than the stored rows of {path} ({R} tokens)")
        n_rows = a.shape[0] * (R // seq_len)
        dropped = a.shape[0] * (R % seq_len)
    else:
        if seq_len is None:
            raise CorpusError(f"seq_len is needed to cut the 1-D token stream {path} into rows")
        n_rows = a.shape[0] // seq_len
        dropped = a.shape[0] % seq_len
        if n_rows == 0:
            raise CorpusError(f"{path}: {a.shape[0]} tokens is less than one row of seq_len {seq_len}")
    _check_seq_len(seq_len)
    identity = dict(identity, dtype=str(a.dtype), shape=list(a.shape))
    return TokenCorpus(source=path, kind="array", seq_len=int(seq_len), n_rows=int(n_rows), identity=identity,
                       dropped_tokens=int(dropped), _array=a)


def _require_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise CorpusError(f"{path}: no such file ({what})")
    if not os.path.isfile(path):
        raise CorpusError(f"{path}: not a regular file ({what})")
    if not os.access(path, os.R_OK):
        raise CorpusError(f"{path}: not readable ({what})")


def open_npy(path: str, seq_len: Optional[int] = None) -> TokenCorpus:
    """A ``.npy`` token array (1-D stream or 2-D rows), memory-mapped; never unpickled."""
    _require_file(path, ".npy token array")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CorpusError(f"{path}: not a readable .npy token array ({e})") from None
    return _from_array(os.path.abspath(path), a, seq_len, {"format": "npy", "bytes": os.path.getsize(path)})


def open_bin(path: str, dtype: Optional[str], seq_len: Optional[int] = None) -> TokenCorpus:
    """A raw token file (no header), memory-mapped as a 1-D stream of ``dtype``. The dtype must be
    given: the file cannot say it, and a wrong one reads garbage (e.g. int32 ids read as uint16 give
    twice the tokens, every second one 0)."""
    _require_file(path, "raw .bin token file")
    if dtype is None:
        raise CorpusError(f"{path}: a raw .bin token file has no header; pass its dtype (bin_dtype / --bin-dtype: "
                          f"{', '.join(BIN_DTYPES)})")
    if dtype not in BIN_DTYPES:
        raise CorpusError(f"{path}: bin_dtype must be one of {', '.join(BIN_DTYPES)}, got {dtype!r}")
    dt = np.dtype(BIN_DTYPES[dtype])
    size = os.path.getsize(path)
    if size == 0:
        raise CorpusError(f"{path}: file is empty")
    if size % dt.itemsize:
        raise CorpusError(
            f"{path}: size {size} bytes is not a multiple of {dt.itemsize} ({dtype}); the file is truncated "
            f"at byte offset {size - size % dt.itemsize}, or {dtype} is not its dtype"
        )
    a = np.memmap(path, dtype=dt, mode="r")
    return _from_array(os.path.abspath(path), a, seq_len, {"format": "bin", "bytes": size})


def _windows(token_lists, seq_len: int, start: int, pack: bool) -> Iterator[Tuple[int, np.ndarray]]:
    """Cut sequences into seq_len rows numbered across the corpus, from row ``start`` on: each
    sequence on its own (remainders dropped), or with ``pack`` concatenated first (a final partial
    row is dropped)."""
    row, buf = 0, np.empty(0, dtype=np.int64)
    for toks in token_lists:
        toks = np.asarray(toks, dtype=np.int64).reshape(-1)
        buf = np.concatenate([buf, toks]) if pack else toks
        n = len(buf) // seq_len
        for j in range(n):
            if row >= start:
                yield row, buf[j * seq_len:(j + 1) * seq_len]
            row += 1
        buf = buf[n * seq_len:]


def _first_row_or_error(corpus: TokenCorpus, count_tokens: Callable[[], int]) -> None:
    """A stream must yield at least one row; say how many tokens it has when it does not."""
    for _ in corpus.rows(0):
        return
    raise CorpusError(f"{corpus.source}: {count_tokens():,} tokens in all, fewer than one row of seq_len "
                      f"{corpus.seq_len}; nothing to scan")


def _is_dataset_dir(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def open_hf_dataset(name_or_path: str, *, column: str = "tokens", split: str = "train", seq_len: int = 1024) -> TokenCorpus:
    """A Hugging Face dataset with a token column (e.g. NeelNanda/c4-code-tokenized-2b): a local
    ``save_to_disk`` directory, or ``hf:owner/name`` on the hub, read in streaming mode (needs network
    access or the local HF cache). Each example is cut into seq_len rows of its own."""
    _check_seq_len(seq_len)
    datasets = import_optional("datasets")  # installed but broken: raises, saying why
    if datasets is None:
        raise CorpusError(f"{name_or_path}: reading a Hugging Face dataset needs the `datasets` package: "
                          "pip install 'erasure_fast[hf]'")
    if name_or_path.startswith(HUB_PREFIX):
        name = name_or_path[len(HUB_PREFIX):]
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
            raise CorpusError(f"{name_or_path}: not a hub dataset name (expected hf:owner/name)")
        try:
            ds = datasets.load_dataset(name, split=split, streaming=True)
        except Exception as e:  # network, missing dataset, missing split: one message either way
            raise CorpusError(f"{name_or_path}: cannot open the hub dataset ({type(e).__name__}: {str(e)[:200]})") from None
        kind, identity = "hub", {"dataset": name, "split": split, "column": column}
    else:
        if not _is_dataset_dir(name_or_path):
            raise CorpusError(f"{name_or_path}: not a Hugging Face dataset directory (no state.json or dataset_dict.json)")
        try:
            ds = datasets.load_from_disk(name_or_path)
        except Exception as e:
            raise CorpusError(f"{name_or_path}: cannot read the dataset directory ({type(e).__name__}: {str(e)[:200]})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise CorpusError(f"{name_or_path}: no split {split!r} (splits: {list(ds)})")
            ds = ds[split]
        kind, identity = "dataset", {"dataset_fingerprint": ds._fingerprint, "split": split, "column": column}
    if column not in (ds.column_names or []):
        raise CorpusError(f"{name_or_path}: dataset has no column {column!r} (columns: {ds.column_names})")
    _check_token_feature(name_or_path, column, (ds.features or {}).get(column))

    def stream(start):
        where = f"{name_or_path}: column {column!r}"
        return _windows((example_token_ids(ex[column], where, i) for i, ex in enumerate(ds)), seq_len, start, pack=False)

    source = name_or_path if kind == "hub" else os.path.abspath(name_or_path)
    corpus = TokenCorpus(source=source, kind=kind, seq_len=seq_len, n_rows=None, identity=identity, _stream=stream)
    if kind == "dataset":
        _first_row_or_error(corpus, lambda: sum(len(ex[column]) for ex in ds))
    return corpus


def _check_token_feature(name: str, column: str, feature) -> None:
    """Refuse, before any work, a dataset column whose declared type is not one list of integer ids
    per example (a streamed dataset may declare none: its examples are checked as they are read)."""
    if feature is None:
        return
    inner = getattr(feature, "feature", None)
    if inner is None or getattr(inner, "feature", None) is not None:
        kind = "one value" if inner is None else "lists of lists"
        raise CorpusError(f"{name}: column {column!r} holds {kind} per example ({feature}), not a list of token ids")
    dtype = getattr(inner, "dtype", None)
    if not isinstance(dtype, str) or not dtype.startswith(("int", "uint")):
        raise CorpusError(f"{name}: column {column!r} holds {dtype} values, not integer token ids ({feature})")


def example_token_ids(values, where: str, index: int) -> np.ndarray:
    """One example's token ids as int64, refusing anything but a flat list of integers (floats are
    never truncated into ids)."""
    ids = np.asarray(values)
    if ids.size == 0:
        return np.empty(0, dtype=np.int64)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise CorpusError(f"{where}: example {index} holds {ids.dtype} values of shape {list(ids.shape)} (e.g. "
                          f"{ids.reshape(-1)[0].item()!r}), "
                          "not a list of integer token ids")
    return ids.astype(np.int64)


def _text_lines(path: str) -> Iterator[Tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, newlines normalised to "\n"; a line that is not UTF-8
    is a CorpusError naming its line and byte offset."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path}: line {lineno} (byte offset {offset + e.start}) is not UTF-8 text "
                                  f"({e.reason}: {raw[e.start:e.start + 4]!r})") from None
            yield lineno, text.replace("\r\n", "\n").replace("\r", "\n")
            offset += len(raw)


def _jsonl_field(path: str, lineno: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: line {lineno} is not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise CorpusError(f"{path}: line {lineno} is a JSON {type(record).__name__}, not an object with field {field!r}")
    if field not in record:
        raise CorpusError(f"{path}: line {lineno} has no field {field!r} (fields: {sorted(record)[:5]})")
    value = record[field]
    if not isinstance(value, str):
        kind = "null" if value is None else f"a JSON {type(value).__name__}"
        raise CorpusError(f"{path}: line {lineno}: field {field!r} is {kind}, not a string")
    return value


def open_text(path: str, tokenizer, *, seq_len: int = 1024, field: str = "text") -> TokenCorpus:
    """Plain text (one document per blank-line-separated block) or jsonl (``field`` per line),
    tokenised with ``tokenizer`` (a Hugging Face tokenizer), EOS between documents, packed into
    seq_len rows."""
    _check_seq_len(seq_len)
    _require_file(path, ".jsonl text" if path.endswith(".jsonl") else ".txt text")
    if tokenizer is None:
        raise CorpusError(f"{path}: text corpora need the model's tokenizer, and this model has none")
    is_jsonl = path.endswith(".jsonl")

    def docs():
        if is_jsonl:
            for lineno, line in _text_lines(path):
                if line.strip():
                    yield _jsonl_field(path, lineno, line, field)
        else:
            block = []
            for _, line in _text_lines(path):
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block)
                    block = []
            if block:
                yield "".join(block)

    eos = getattr(tokenizer, "eos_token_id", None)

    def token_lists():
        for doc in docs():
            yield list(tokenizer(doc)["input_ids"]) + ([eos] if eos is not None else [])

    def stream(start):
        return _windows(token_lists(), seq_len, start, pack=True)

    corpus = TokenCorpus(source=os.path.abspath(path), kind="text", seq_len=seq_len, n_rows=None,
                         identity={"format": "jsonl" if is_jsonl else "txt", "bytes": os.path.getsize(path),
                                   "tokenizer": type(tokenizer).__name__, "vocab_size": getattr(tokenizer, "vocab_size", None)},
                         _stream=stream)
    _first_row_or_error(corpus, lambda: sum(len(t) for t in token_lists()))
    return corpus


def open_corpus(spec, *, seq_len: Optional[int] = None, tokenizer=None, bin_dtype: Optional[str] = None,
                column: Optional[str] = None) -> TokenCorpus:
    """Open ``spec``: a TokenCorpus, a numpy array (1-D stream or 2-D rows), or a path (``~`` and
    ``$VARS`` expanded): ``.npy``, ``.bin`` (``bin_dtype`` required, and only there), ``.txt`` /
    ``.jsonl`` (needs ``tokenizer``), a Hugging Face ``save_to_disk`` directory, or ``hf:owner/name``
    (hub, streamed) -- for datasets ``column`` names the token column (default "tokens", and only
    there). ``seq_len`` defaults to a 2-D array's row length, else 1024 for datasets and text; 1-D
    arrays need it."""
    if isinstance(spec, TokenCorpus):
        corpus = spec
    else:
        _check_seq_len(seq_len)
        corpus = _open(spec, seq_len, tokenizer, bin_dtype, column or "tokens")
    if bin_dtype is not None and corpus.identity.get("format") != "bin":
        raise CorpusError(f"bin_dtype is only for raw .bin token files; {corpus.source} is a {_kind_name(corpus)}")
    if column is not None and corpus.kind not in ("dataset", "hub"):
        raise CorpusError(f"column is only for Hugging Face datasets; {corpus.source} is a {_kind_name(corpus)}")
    return corpus


def _kind_name(corpus: TokenCorpus) -> str:
    fmt = corpus.identity.get("format")
    return {"npy": ".npy token array (its header says its dtype)", "array": "token array",
            "txt": ".txt text file", "jsonl": ".jsonl text file"}.get(fmt, f"{corpus.kind} corpus")


def _open(spec, seq_len: Optional[int], tokenizer, bin_dtype: Optional[str], column: str) -> TokenCorpus:
    if isinstance(spec, np.ndarray):
        import hashlib

        _check_array("<array>", spec)
        digest = hashlib.blake2b(np.ascontiguousarray(spec).tobytes(), digest_size=16).hexdigest()
        return _from_array("<array>", spec, seq_len, {"format": "array", "content": digest})
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"corpus must be a path, a numpy array of token ids or a TokenCorpus, got {type(spec).__name__}")
    path = expand_path(spec)
    if not path:
        raise CorpusError("corpus: the path is empty")
    if path.startswith(HUB_PREFIX):
        return open_hf_dataset(path, column=column, seq_len=seq_len or 1024)
    if path.endswith(".npy"):
        return open_npy(path, seq_len)
    if path.endswith(".bin"):
        return open_bin(path, bin_dtype, seq_len)
    if path.endswith((".txt", ".jsonl")):
        return open_text(path, tokenizer, seq_len=seq_len or 1024)
    if os.path.isdir(path):
        return open_hf_dataset(path, column=column, seq_len=seq_len or 1024)
    if os.path.exists(path):
        raise CorpusError(f"{path}: unknown corpus format (use .npy, .bin, .txt, .jsonl, a dataset directory or hf:owner/name)")
    raise CorpusError(f"{path}: no such file or directory (a dataset on the Hugging Face hub is named {HUB_PREFIX}owner/name)")
