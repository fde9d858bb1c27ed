"""Random-access record sources: JSONL files, ArrayRecord files, in-memory lists.

Each source returns `RawRecord(source, line, payload)`; the payload is left unparsed (bytes)
so that JSON decoding, and its failures, happen in the parse stage where they are counted.
Random access (needed for global shuffling, per-host sharding and exact resume) comes from a
byte-offset index of a JSONL file built once when the source is opened; reads use `os.pread`,
which is safe in forked Grain workers that share a file descriptor. A JSONL object in a store
(`gs://`) is indexed by streaming it once and read by ranged requests, one per record (ArrayRecord
is the format to prefer there: array_record reads `gs://` itself, a chunk at a time).

ArrayRecord records hold the same UTF-8 JSON objects as JSONL lines (`write_array_record`
converts). Relative image paths resolve against the data file's directory (JSONL) or
`data.image_root` (ArrayRecord, in-memory; default: the current directory).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Sequence

import numpy as np

from t5gemma2_jax import storage

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonlines")
ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")


class RawRecord(NamedTuple):
    source: int  # index into the source's `names` / `base_dirs`
    line: int  # 1-based line of a JSONL file, record index otherwise
    payload: Any  # bytes (JSON text), for in-memory sources a dict / str, or `Unreadable`


class Unreadable(NamedTuple):
    """The payload of a record whose read failed (an I/O error, a corrupt ArrayRecord chunk).

    Raising from `__getitem__` would end the run inside Grain, where the record is anonymous;
    handing this on lets the parse stage count and log it with its file and line."""

    error: str  # "<exception type>: <message>"


def _unreadable(error: Exception) -> Unreadable:
    return Unreadable(f"{type(error).__name__}: {error}")


class JsonlSource:
    """Records are the non-blank lines of one or more JSONL files."""

    def __init__(self, paths: Sequence[str]):
        self.names = [os.fspath(p) for p in paths]
        self.base_dirs: list[str | None] = [p.rsplit("/", 1)[0] if storage.is_url(p) else os.path.dirname(os.path.abspath(p))
                                            for p in self.names]
        files, offsets, lengths, lines = [], [], [], []
        for fi, path in enumerate(self.names):
            o, n, ln = _index_lines(path)
            files.append(np.full(len(o), fi, np.int32))
            offsets.append(o)
            lengths.append(n)
            lines.append(ln)
        self._file = _cat(files, np.int32)
        self._offset = _cat(offsets, np.int64)
        self._length = _cat(lengths, np.int64)
        self._line = _cat(lines, np.int64)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._offset)

    def __getitem__(self, index: int) -> RawRecord:
        fi = int(self._file[index])
        try:
            if storage.is_url(self.names[fi]):
                data = storage.read_range(self.names[fi], int(self._offset[index]), int(self._length[index]))
            else:
                data = os.pread(self._fd(fi), int(self._length[index]), int(self._offset[index]))
        except storage.StorageError:
            raise                     # the store failing is not a bad record: the run stops on it
        except OSError as e:
            data = _unreadable(e)
        return RawRecord(fi, int(self._line[index]), data)

    def _fd(self, fi: int) -> int:
        if self._pid != os.getpid():  # a forked worker: open its own descriptors
            self._fds, self._pid = {}, os.getpid()
        if fi not in self._fds:
            self._fds[fi] = os.open(self.names[fi], os.O_RDONLY)
        return self._fds[fi]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __repr__(self) -> str:
        return f"JsonlSource({self.names}, {len(self)} records)"


def _index_lines(path: str, block: int = 1 << 26) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offset, length, 1-based line number) of every non-blank line of a file."""
    offsets, lengths, line_numbers = [], [], []
    base, line_no, rest = 0, 0, b""
    with storage.storage_op("reading", path), storage.as_path(path).open("rb") as f:
        while True:
            chunk = f.read(block)
            data = rest + chunk
            if not chunk:  # `data` is a last line without a trailing newline, or empty
                cut = len(data)
                body, rest = (data + b"\n", b"") if data else (b"", b"")
            else:
                cut = data.rfind(b"\n") + 1
                body, rest = data[:cut], data[cut:]
            if body:
                ends = np.flatnonzero(np.frombuffer(body, np.uint8) == 10) + 1
                starts = np.concatenate([[0], ends[:-1]])
                blank = np.zeros(len(starts), bool)
                for i in np.flatnonzero(ends - starts <= 16):  # only short lines can be blank
                    blank[i] = not body[starts[i]:ends[i]].strip()
                keep = ~blank
                offsets.append(base + starts[keep])
                lengths.append(np.minimum(ends, cut)[keep] - starts[keep])
                line_numbers.append(line_no + 1 + np.flatnonzero(keep))
                line_no += len(starts)
                base += cut
            if not chunk:
                break
    return _cat(offsets, np.int64), _cat(lengths, np.int64), _cat(line_numbers, np.int64)


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


class ArrayRecordSource:
    """Records of ArrayRecord files, each a UTF-8 JSON object (the JSONL schema)."""

    def __init__(self, paths: Sequence[str], image_root: str | None = None):
        import grain

        self.names = [os.fspath(p) for p in paths]
        self.base_dirs = [image_root or os.getcwd()]
        self._source = grain.sources.ArrayRecordDataSource(self.names)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> RawRecord:
        try:
            data = self._source[index]
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. RuntimeError for a damaged chunk
            data = _unreadable(e)
        return RawRecord(0, int(index), data)

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.names}, {len(self)} records)"


class MemorySource:
    """An in-memory list of records (dicts, or JSON strings/bytes)."""

    def __init__(self, records: Sequence[Any], image_root: str | None = None,
                 name: str = "memory"):
        self._records = list(records)
        self.names = [name]
        self.base_dirs = [image_root or os.getcwd()]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> RawRecord:
        return RawRecord(0, int(index), self._records[index])

    def __repr__(self) -> str:
        return f"MemorySource({len(self)} records)"


Source = JsonlSource | ArrayRecordSource | MemorySource


def expand_paths(spec: str) -> list[str]:
    """Comma-separated paths and globs (local or `gs://`) -> existing files (sorted within each glob)."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        matches = storage.glob(part)
        if not matches:
            raise FileNotFoundError(f"no data file matches {part!r}")
        out += matches
    return out


def open_source(spec: str | Sequence[Any], image_root: str | None = None) -> Source:
    """A source from a path spec (JSONL or ArrayRecord, by extension) or a list of records."""
    if not isinstance(spec, str):
        return MemorySource(spec, image_root)
    paths = expand_paths(spec)
    kinds = {"jsonl" if p.endswith(JSONL_SUFFIXES) else
             "array_record" if p.endswith(ARRAY_RECORD_SUFFIXES) else p for p in paths}
    if kinds == {"jsonl"}:
        return JsonlSource(paths)
    if kinds == {"array_record"}:
        return ArrayRecordSource(paths, image_root)
    raise ValueError(f"data files must all be JSONL ({JSONL_SUFFIXES}) or all ArrayRecord "
                     f"({ARRAY_RECORD_SUFFIXES}); got {sorted(kinds)}")


def write_array_record(path: str, records: Sequence[dict | str | bytes]) -> None:
    """Writes records (dicts are JSON-encoded) to one ArrayRecord file."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
    try:
        for r in records:
            if isinstance(r, dict):
                r = json.dumps(r, separators=(",", ":"))
            writer.write(r.encode("utf-8") if isinstance(r, str) else r)
    finally:
        writer.close()
