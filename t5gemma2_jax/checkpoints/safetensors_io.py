"""Safetensors checkpoints: read through the official library, written by a streaming writer.

Layout: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw little-endian tensor bytes.

Reading goes through `safetensors.safe_open`, which memory-maps the file and refuses every
malformed header (bad JSON or UTF-8, missing or mistyped fields, unknown dtypes, negative,
overlapping, out-of-order or out-of-bounds offsets, byte sizes that disagree with shape and dtype,
data that does not end where the file does); its errors become one-line `CheckpointError`s naming
the file. A tensor is copied out of the map only when it is asked for, so readers stream a
checkpoint one tensor at a time. What a header cannot show (an I32 tensor that is really F32
bytes) is the caller's to check against its target (`dtype()`, `FLOATING`).

Writing stays our own: the library's writers take every tensor in memory at once, ours asks a
producer for one tensor at a time, so a checkpoint is never held whole.

A file in an object store (`gs://`) cannot be memory-mapped: its bytes are read into a local
temporary file first (deleted when the reader is), which is then opened like any other.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

# Imported for its side effect too: the library builds numpy arrays with dtype="bfloat16", a name
# numpy knows only once ml_dtypes has registered its types; without it BF16 tensors cannot be read.
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from t5gemma2_jax import storage

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
FLOATING = frozenset({"F64", "F32", "F16", "BF16"})
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, malformed or does not match the model."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# The library's messages, reworded where they alone would not tell a user what is wrong.
_EXPLAIN = [
    (re.compile(r"invalid offset for tensor `(.*)`"),
     lambda m: f"tensor {m[1]!r} has invalid data_offsets (the tensors' byte ranges must start at 0, "
               "follow one another without gaps or overlaps, have begin <= end and stay inside the file)"),
    (re.compile(r"incomplete metadata, file not fully covered"),
     lambda m: "truncated or padded: the tensors' data_offsets do not end where the file does"),
    (re.compile(r"invalid shape, data type, or offset for tensor"),
     lambda m: "a tensor's byte size (data_offsets) does not match its shape and dtype"),
    (re.compile(r"unknown variant `(.*?)`, expected one of"),
     lambda m: f"corrupt safetensors header: unknown dtype {m[1]!r}"),
    (re.compile(r"invalid value: integer `(-\d+)`, expected usize"),
     lambda m: f"corrupt safetensors header: negative number {m[1]} in a shape or data_offsets"),
    (re.compile(r"invalid UTF-8 in header: (.*)"),
     lambda m: f"corrupt safetensors header: not valid UTF-8 ({m[1]})"),
    (re.compile(r"invalid JSON in header: (.*)"),
     lambda m: f"corrupt safetensors header: {m[1]}"),
    (re.compile(r"header too (large|small)"),
     lambda m: f"corrupt safetensors header: header too {m[1]}"),
]


def _explain(err: Exception) -> str:
    msg = _one_line(err).removeprefix("Error while deserializing header: ")
    for pattern, say in _EXPLAIN:
        m = pattern.search(msg)
        if m:
            return say(m)
    return f"not a readable safetensors file: {msg}"


class SafetensorsFile:
    """One `.safetensors` file, validated by the library when opened, read tensor by tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = storage.as_path(path)
        self._local = self.path
        self._download = None
        if storage.is_url(self.path):
            self._download = tempfile.NamedTemporaryFile(prefix=".safetensors.", suffix=".download")
            try:
                with storage.storage_op("reading", self.path), self.path.open("rb") as f:
                    while chunk := f.read(1 << 24):
                        self._download.write(chunk)
            except FileNotFoundError as e:
                raise CheckpointError(f"{self.path}: cannot be opened ({_one_line(e.strerror or e)})") from None
            self._download.flush()
            self._local = Path(self._download.name)
        self._check_framing()
        try:
            self._handle = safe_open(str(self._local), framework="numpy")
        except SafetensorError as e:
            raise CheckpointError(f"{self.path}: {_explain(e)}") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot be opened ({_one_line(e.strerror or e)})") from None
        self.metadata = self._handle.metadata() or {}
        self._info: dict[str, tuple[str, tuple[int, ...]]] = {}
        in_file_order = getattr(self._handle, "offset_keys", self._handle.keys)   # reading in turn walks the map once
        for name in in_file_order():
            view = self._handle.get_slice(name)
            dtype, shape = view.get_dtype(), tuple(view.get_shape())
            if dtype not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            self._info[name] = (dtype, shape)

    def _check_framing(self) -> None:
        """The two faults the library reports without numbers; the rest it reports itself."""
        try:
            size = self._local.stat().st_size
            with open(self._local, "rb") as f:
                raw = f.read(8)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot be opened ({_one_line(e.strerror or e)})") from None
        if len(raw) != 8:
            raise CheckpointError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{self.path}: header length {n} exceeds the file size {size}")

    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1]

    def dtype(self, name: str) -> str:
        """The dtype the header declares ("F32", "BF16", ...), known without reading the tensor."""
        return self._info[name][0]

    def get(self, name: str) -> np.ndarray:
        """Tensor `name`, copied out of the memory map."""
        return self._read(name, lambda: self._handle.get_tensor(name), self.shape(name))

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows `start:stop` of tensor `name` (its leading axis): only those bytes are read."""
        shape = self.shape(name)
        start, stop, _ = slice(start, stop).indices(shape[0])   # the library does not clip to the bounds
        stop = max(start, stop)
        return self._read(name, lambda: self._handle.get_slice(name)[start:stop], (stop - start, *shape[1:]))

    def _read(self, name: str, read: Callable[[], np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        dtype = self.dtype(name)
        try:
            arr = read()
        except (SafetensorError, TypeError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: tensor {name!r} ({dtype}) cannot be read: {_one_line(e)}") from None
        if arr.dtype != _DTYPES[dtype] or arr.shape != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor {name!r} read back as {arr.dtype}{list(arr.shape)}, "
                                  f"header says {dtype}{list(shape)}")
        return arr


def _shard_path(directory, index, name: str):
    """Where shard `name` of `index` lives, refusing any name that leads out of `directory`.

    The one symlink allowed out is the Hugging Face cache's own layout: `snapshots/<rev>/<file>`
    links to `../../blobs/<hash>` of the same repository, which is how every downloaded sharded
    checkpoint looks on disk.
    """
    if not name or os.path.isabs(name) or Path(name).drive or Path(name).root:
        raise CheckpointError(f"{index}: shard path {name!r} is not a file name inside {directory}")
    if os.path.normpath(name).split(os.sep)[0] == os.pardir:
        raise CheckpointError(f"{index}: shard path {name!r} leads outside the checkpoint directory {directory}")
    if storage.is_url(directory):      # no links in an object store: the name check above is all
        return directory / name
    home = directory.resolve()
    target = (directory / name).resolve()
    cache_blobs = home.parent.parent / "blobs" if home.parent.name == "snapshots" else None
    if not target.is_relative_to(home) and not (cache_blobs is not None and target.parent == cache_blobs):
        raise CheckpointError(f"{index}: shard {name!r} is a link to {target}, outside the checkpoint "
                              f"directory {directory}")
    return directory / name


def _read_index(index) -> dict[str, str]:
    try:
        raw = json.loads(index.read_bytes().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{index}: cannot be read ({_one_line(e.strerror or e)})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{index}: not valid UTF-8 ({_one_line(e)})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index}: not valid JSON ({_one_line(e)})") from None
    need = f"{index}: needs a \"weight_map\" object of tensor name -> shard file"
    if not isinstance(raw, dict):
        raise CheckpointError(f"{need}, the file holds a {type(raw).__name__}")
    if "weight_map" not in raw:
        raise CheckpointError(f"{need}, found none")
    weight_map = raw["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{need}, got a {type(weight_map).__name__}")
    bad = [k for k, v in weight_map.items() if not isinstance(v, str)]
    if bad:
        raise CheckpointError(f"{index}: weight_map values must be shard file names (strings); "
                              f"{len(bad)} are not, e.g. {bad[0]!r}: {weight_map[bad[0]]!r}")
    return weight_map


class CheckpointDir:
    """All tensors of an HF checkpoint directory: one file, or shards listed by an index."""

    def __init__(self, path: str | os.PathLike):
        self.path = storage.as_path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: checkpoint directory does not exist")
        index = self.path / INDEX_NAME
        weight_map: dict[str, str] = {}
        if index.exists():
            weight_map = _read_index(index)
            paths = {}
            for name in weight_map.values():
                paths.setdefault(os.path.normpath(name), _shard_path(self.path, index, name))
            if not paths:
                raise CheckpointError(f"{index}: the weight_map lists no shards")
        else:
            paths = {p.name: p for p in self.path.glob("*.safetensors")}
            if not paths:
                raise CheckpointError(f"{self.path}: no *.safetensors files found")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        for name in sorted(paths):
            if weight_map and not paths[name].is_file():
                count = sum(os.path.normpath(v) == name for v in weight_map.values())
                raise CheckpointError(f"{index}: shard {name} listed in the index is missing "
                                      f"({count} tensors map to it)")
            st = SafetensorsFile(paths[name])
            self._files[name] = st
            for key in st.keys():
                if key in self._where:
                    raise CheckpointError(f"{self.path}: tensor {key!r} is in both {self._where[key]} and {name}; "
                                          "which one holds the weights is ambiguous")
                self._where[key] = name
        absent = [k for k, v in weight_map.items() if k not in self._files[os.path.normpath(v)]]
        if absent:
            more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
            raise CheckpointError(f"{index}: tensor {absent[0]!r}{more} is listed in shard "
                                  f"{weight_map[absent[0]]} but that file does not hold it")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._files[self._where[key]].shape(key)

    def dtype(self, key: str) -> str:
        return self._files[self._where[key]].dtype(key)

    def file(self, key: str) -> storage.AnyPath:
        return self._files[self._where[key]].path

    def get(self, key: str) -> np.ndarray:
        return self._files[self._where[key]].get(key)

    def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        return self._files[self._where[key]].get_rows(key, start, stop)


def _header_bytes(entries: list[tuple[str, tuple[int, ...], np.dtype]], metadata: dict) -> tuple[bytes, int]:
    header, offset = {}, 0
    for name, shape, dtype in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, offset


def write_safetensors(path: str | os.PathLike,
                      tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
                      metadata: dict | None = None) -> None:
    """Write tensors given as (name, shape, dtype, producer); producers run one at a time."""
    tensors = list(tensors)
    raw, _ = _header_bytes([(n, tuple(s), np.dtype(d)) for n, s, d, _ in tensors], metadata or {"format": "pt"})
    # Never a half-written file under the final name (a temporary file renamed, or one object).
    with storage.open_write(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, produce in tensors:
            arr = np.asarray(produce(), dtype=dtype, order="C")   # keeps 0-d tensors 0-d
            if arr.shape != tuple(shape):
                raise CheckpointError(f"tensor {name!r}: produced shape {arr.shape}, declared {tuple(shape)}")
            f.write(arr.tobytes())


def split_shards(tensors: list, max_shard_bytes: int) -> Iterator[list]:
    """Group (name, shape, dtype, producer) tuples into shards of at most `max_shard_bytes`."""
    shard, size = [], 0
    for t in tensors:
        nbytes = int(np.prod(t[1], dtype=np.int64)) * np.dtype(t[2]).itemsize
        if shard and size + nbytes > max_shard_bytes:
            yield shard
            shard, size = [], 0
        shard.append(t)
        size += nbytes
    if shard:
        yield shard
