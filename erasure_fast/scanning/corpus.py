"""Token corpora for scans: memory-mapped arrays, Hugging Face datasets, text / jsonl files.

Every corpus yields fixed-length rows of token ids in a deterministic order; row ``i`` is always the
same tokens, which is what makes resume and sharding exact.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np

_BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32, "int32": np.int32, "int64": np.int64}


class CorpusError(ValueError):
    """A corpus that cannot be read as token rows; the message names the file and offset."""


def _file_digest(path: str, chunk: int = 1 << 20) -> str:
    """Size + mtime-free content fingerprint: hash of the size, first and last MiB."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:16]


@dataclass
class TokenCorpus:
    """Rows of ``seq_len`` token ids. ``n_rows`` is None for streams of unknown length."""

    source: str
    seq_len: int
    n_rows: Optional[int]
    fingerprint: str
    _array: Optional[np.ndarray] = None  # memmap: 1-D stream or 2-D rows
    _stream: Optional[object] = None  # callable(start_row) -> iterator of np rows

    def describe(self) -> dict:
        return {"source": self.source, "seq_len": self.seq_len, "n_rows": self.n_rows, "fingerprint": self.fingerprint}

    def rows(self, start: int = 0) -> Iterator[Tuple[int, np.ndarray]]:
        """(row index, int64 ids [seq_len]) from row ``start`` on."""
        if self._array is not None:
            a = self._array
            for i in range(start, self.n_rows):
                if a.ndim == 1:
                    row = a[i * self.seq_len:(i + 1) * self.seq_len]
                else:
                    row = a[i, : self.seq_len]
                yield i, np.asarray(row, dtype=np.int64)
        else:
            yield from self._stream(start)

    def byte_offset(self, row: int) -> Optional[int]:
        """Byte offset of a row in the underlying file (for error messages), when it has one."""
        if self._array is None:
            return None
        a = self._array
        base = getattr(a, "offset", 0)
        per_row = self.seq_len if a.ndim == 1 else a.shape[1]
        return int(base + row * per_row * a.dtype.itemsize)


def _check_array(path: str, a: np.ndarray) -> None:
    if a.dtype.type not in _BIN_DTYPES.values():
        raise CorpusError(f"{path}: token array dtype {a.dtype} not supported (use uint16, uint32, int32 or int64)")
    if a.ndim not in (1, 2):
        raise CorpusError(f"{path}: token array must be 1-D (a stream) or 2-D (rows), got shape {a.shape}")
    if a.size == 0:
        raise CorpusError(f"{path}: token array is empty")


def _from_array(path: str, a: np.ndarray, seq_len: Optional[int]) -> TokenCorpus:
    _check_array(path, a)
    if a.ndim == 2:
        seq_len = a.shape[1] if seq_len is None else seq_len
        if seq_len > a.shape[1]:
            raise CorpusError(f"{path}: seq_len {seq_len} is longer than the rows ({a.shape[1]} tokens)")
        n_rows = a.shape[0]
    else:
        if seq_len is None:
            raise CorpusError(f"{path}: a 1-D token stream needs seq_len to cut it into rows")
        n_rows = a.shape[0] // seq_len
        if n_rows == 0:
            raise CorpusError(f"{path}: {a.shape[0]} tokens is less than one row of seq_len {seq_len}")
    if seq_len < 2:
        raise CorpusError(f"{path}: seq_len must be >= 2 (next-token targets), got {seq_len}")
    fp = f"{_file_digest(path)}:{a.dtype}:{list(a.shape)}"
    return TokenCorpus(source=os.path.abspath(path), seq_len=int(seq_len), n_rows=int(n_rows), fingerprint=fp, _array=a)


def open_npy(path: str, seq_len: Optional[int] = None) -> TokenCorpus:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CorpusError(f"{path}: not a readable .npy token array ({e})") from None
    return _from_array(path, a, seq_len)


def open_bin(path: str, dtype: str = "uint16", seq_len: Optional[int] = None) -> TokenCorpus:
    if dtype not in _BIN_DTYPES:
        raise CorpusError(f"{path}: dtype must be one of {sorted(_BIN_DTYPES)}, got {dtype!r}")
    dt = np.dtype(_BIN_DTYPES[dtype])
    size = os.path.getsize(path)
    if size == 0:
        raise CorpusError(f"{path}: file is empty")
    if size % dt.itemsize:
        raise CorpusError(
            f"{path}: size {size} bytes is not a multiple of {dt.itemsize} ({dtype}); the file is truncated "
            f"at byte offset {size - size % dt.itemsize}"
        )
    a = np.memmap(path, dtype=dt, mode="r")
    return _from_array(path, a, seq_len)


def _chunked(token_lists, seq_len: int, start: int) -> Iterator[Tuple[int, np.ndarray]]:
    """Cut each sequence into seq_len rows (remainders dropped); rows numbered across the corpus."""
    row = 0
    for toks in token_lists:
        toks = np.asarray(toks, dtype=np.int64)
        for lo in range(0, len(toks) - seq_len + 1, seq_len):
            if row >= start:
                yield row, toks[lo:lo + seq_len]
            row += 1


def open_hf_dataset(name_or_path: str, *, column: str = "tokens", split: str = "train", seq_len: int = 1024) -> TokenCorpus:
    """A Hugging Face dataset with a token column (e.g. NeelNanda/c4-code-tokenized-2b): a local
    ``save_to_disk`` directory, or a hub name read in streaming mode (needs network or the HF cache)."""
    import datasets

    if os.path.isdir(name_or_path) and os.path.exists(os.path.join(name_or_path, "state.json")) or \
            os.path.isdir(name_or_path) and os.path.exists(os.path.join(name_or_path, "dataset_dict.json")):
        ds = datasets.load_from_disk(name_or_path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        fp = f"disk:{ds._fingerprint}"
    else:
        ds = datasets.load_dataset(name_or_path, split=split, streaming=True)
        fp = f"hub:{name_or_path}:{split}"
    if column not in (ds.column_names or []):
        raise CorpusError(f"{name_or_path}: dataset has no column {column!r} (columns: {ds.column_names})")

    def stream(start):
        return _chunked((ex[column] for ex in ds), seq_len, start)

    n_rows = None
    return TokenCorpus(source=name_or_path, seq_len=seq_len, n_rows=n_rows, fingerprint=fp, _stream=stream)


def open_text(path: str, tokenizer, *, seq_len: int = 1024, field: str = "text") -> TokenCorpus:
    """Plain text (one document per blank-line-separated block) or jsonl (``field`` per line),
    tokenised with ``tokenizer`` (a Hugging Face tokenizer) and packed into seq_len rows."""
    if tokenizer is None:
        raise CorpusError(f"{path}: text corpora need the model's tokenizer, and this model has none")
    is_jsonl = path.endswith(".jsonl")

    def docs():
        with open(path, encoding="utf-8") as f:
            if is_jsonl:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)[field]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise CorpusError(f"{path}: line {lineno} is not a JSON object with field {field!r} ({e})") from None
            else:
                block = []
                for line in f:
                    if line.strip():
                        block.append(line)
                    elif block:
                        yield "".join(block)
                        block = []
                if block:
                    yield "".join(block)

    eos = getattr(tokenizer, "eos_token_id", None)

    def stream(start):
        def packed():
            buf = []
            for doc in docs():
                buf.extend(tokenizer(doc)["input_ids"])
                if eos is not None:
                    buf.append(eos)
                while len(buf) >= seq_len:
                    yield buf[:seq_len]
                    buf = buf[seq_len:]
        return _chunked(packed(), seq_len, start)

    return TokenCorpus(source=os.path.abspath(path), seq_len=seq_len, n_rows=None, fingerprint=_file_digest(path), _stream=stream)


def open_corpus(spec, *, seq_len: Optional[int] = None, tokenizer=None, bin_dtype: str = "uint16",
                column: str = "tokens") -> TokenCorpus:
    """Open ``spec``: a TokenCorpus, a numpy array, or a path (.npy, .bin, .txt, .jsonl, HF dataset)."""
    if isinstance(spec, TokenCorpus):
        return spec
    if isinstance(spec, np.ndarray):
        _check_array("<array>", spec)
        if spec.ndim == 1 and seq_len is None:
            raise CorpusError("<array>: a 1-D token stream needs seq_len")
        sl = seq_len or spec.shape[1]
        n = spec.shape[0] // sl if spec.ndim == 1 else spec.shape[0]
        fp = hashlib.sha256(np.ascontiguousarray(spec).tobytes()).hexdigest()[:16]
        return TokenCorpus(source="<array>", seq_len=sl, n_rows=n, fingerprint=fp, _array=spec)
    path = os.fspath(spec)
    if seq_len is not None and seq_len < 2:
        raise CorpusError(f"{path}: seq_len must be >= 2 (next-token targets), got {seq_len}")
    if path.endswith(".npy"):
        return open_npy(path, seq_len)
    if path.endswith(".bin"):
        return open_bin(path, bin_dtype, seq_len)
    if path.endswith((".txt", ".jsonl")):
        return open_text(path, tokenizer, seq_len=seq_len or 1024)
    if os.path.isfile(path):
        raise CorpusError(f"{path}: unknown corpus format (use .npy, .bin, .txt, .jsonl or a dataset directory)")
    return open_hf_dataset(path, column=column, seq_len=seq_len or 1024)
