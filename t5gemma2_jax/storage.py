"""Where the project's files live: a local path or an object-store URL (`gs://bucket/...`).

Every reader and writer of the package takes its paths through here. A local path stays a
`pathlib.Path` and keeps what a POSIX disk gives (atomic renames, free-space checks); a URL
becomes an etils `epath.Path`, the path type Orbax uses, which reaches the store through
fsspec/gcsfs. Arrays go through TensorStore (Orbax) and ArrayRecord files through array_record,
both of which read `gs://` themselves; there is no HTTP client here.

On an object store there are no renames and no appends, so:
  - a file is written as one whole object (`write_bytes`, `write_text`, `open_write`): an object
    appears complete or not at all, as a renamed temporary file does on a disk;
  - a directory of several objects that must appear at once is made visible by the object its
    writer puts last (a commit marker: Orbax's `commit_success.txt`, an export's
    `model_config.json`, a PEFT directory's `adapter_config.json`, `save_hf`'s manifest);
  - a growing log is one object per flush (`train.metrics`), never appended in place.

A store that does not answer surfaces as one `StorageError` naming the bucket and the operation
(`storage_op`); gcsfs's own retries bound how long that takes.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import logging
import os
import pathlib
import re
import tempfile
from typing import IO, Iterator, Union

from etils import epath

AnyPath = Union[pathlib.Path, epath.Path]
PathLike = Union[str, os.PathLike]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StorageError(OSError):
    """An object store did not do what was asked (unreachable, refused, failed): one line naming
    the bucket and the operation."""


def is_url(path: PathLike | None) -> bool:
    """Whether `path` names an object in a store (`gs://...`) rather than a local file."""
    return path is not None and bool(_URL.match(os.fspath(path)))


def as_path(path: PathLike) -> AnyPath:
    """`path` as a path object: an `epath.Path` for a URL (whose str keeps the `gs://`; a
    `pathlib.Path` would turn it into `gs:/...`), else a `pathlib.Path`."""
    if isinstance(path, epath.Path) and not isinstance(path, pathlib.Path):
        return path
    if is_url(path):
        _quiet_retries()
        return epath.Path(os.fspath(path))
    return pathlib.Path(path)


def absolute(path: PathLike) -> AnyPath:
    """A local path made absolute (relative to the current directory); a URL as it is."""
    p = as_path(path)
    return p.absolute() if isinstance(p, pathlib.Path) else p


def is_local(path: PathLike) -> bool:
    return not is_url(path)


def bucket(path: PathLike) -> str:
    """`gs://bucket` of a URL (the whole path when it is local)."""
    s = os.fspath(path)
    m = _URL.match(s)
    if not m:
        return s
    return m.group(0) + s[m.end():].split("/", 1)[0]


def join(path: PathLike, *parts: str) -> str:
    """`path/part/...` as a string, a URL kept a URL."""
    return os.fspath(as_path(path).joinpath(*parts))


def filesystem(path: PathLike):
    """The fsspec file system under a URL (the instance etils epath and Orbax use)."""
    from etils.epath import backend

    return backend.fsspec_backend.fs(os.fspath(path))


@contextlib.contextmanager
def storage_op(operation: str, path: PathLike) -> Iterator[None]:
    """Turns a failure of `operation` on a URL into one `StorageError` naming the bucket, the
    operation and the object (a missing object stays FileNotFoundError; local paths raise as
    they always did)."""
    if not is_url(path):
        yield
        return
    try:
        yield
    except (FileNotFoundError, StorageError):
        raise
    except _transport_errors() as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise StorageError(f"{bucket(path)}: {operation} {os.fspath(path)} failed ({type(e).__name__}: {reason})") from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What the clients under a URL raise when the store fails (not the caller's own errors)."""
    found: list[type[BaseException]] = [OSError, TimeoutError]
    for module, name in (("aiohttp", "ClientError"), ("gcsfs.retry", "HttpError"),
                         ("google.auth.exceptions", "GoogleAuthError"),
                         ("google.api_core.exceptions", "GoogleAPIError")):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _quiet_retries() -> None:
    """gcsfs logs each request that runs out of retries with a traceback; the failure reaches the
    caller as an exception anyway (one `StorageError` line here), so the traceback is noise."""
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    # fsspec announces its read-ahead cache at INFO for every object opened.
    logging.getLogger("fsspec.caching").setLevel(logging.WARNING)


# Listings of a store change under other processes (other hosts, a resumed run, a test reading a
# running job's work directory); fsspec's listing cache would keep showing the old ones.
try:
    import fsspec.config

    for _proto in ("gs", "gcs"):
        fsspec.config.conf.setdefault(_proto, {}).setdefault("use_listings_cache", False)
except ImportError:  # fsspec comes with etils[epath]; without it only local paths work
    pass


# ---------------------------------------------------------------------------------------------
# Whole-file writes.


def write_bytes(path: PathLike, data: bytes) -> None:
    """`data` as the whole of `path`: on a disk a temporary file renamed over it, in a store one
    object. A reader sees the old content or the new, never part of it."""
    with open_write(path) as f:
        f.write(data)


def write_text(path: PathLike, text: str, *, parents: bool = False) -> None:
    """`text` as the whole of `path` (see `write_bytes`); `parents`: a local path's missing folders
    are made first (a store has none to make)."""
    if parents and not is_url(path):
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def open_write(path: PathLike) -> Iterator[IO[bytes]]:
    """A binary file to stream `path`'s content into; it appears under its name only when the
    block ends without an error (nothing is left when it raises)."""
    if is_url(path):
        # Spooled to a local file and uploaded whole at the end: an upload cut off by an error
        # must leave no object, which a discarded gcsfs upload does not promise for small files.
        with tempfile.NamedTemporaryFile(prefix=".upload.", delete=True) as tmp:
            yield tmp
            tmp.flush()
            with storage_op("writing", path):
                filesystem(path).put_file(tmp.name, os.fspath(path))
        return
    p = pathlib.Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def put_file(local: PathLike, path: PathLike) -> None:
    """A local file copied to `path` (an upload to a store, a temporary file renamed on a disk)."""
    if is_url(path):
        with storage_op("writing", path):
            filesystem(path).put_file(os.fspath(local), os.fspath(path))
    else:
        with open(local, "rb") as src, open_write(path) as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)


# ---------------------------------------------------------------------------------------------
# Reads, listings, removal.


def read_bytes(path: PathLike) -> bytes:
    with storage_op("reading", path):
        return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def read_range(path: PathLike, start: int, length: int) -> bytes:
    """`length` bytes of `path` from byte `start` (one ranged request on a store)."""
    if is_url(path):
        with storage_op("reading", path):
            return filesystem(path).cat_file(os.fspath(path), start=start, end=start + length)
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(length)


def read_many(paths: list[str]) -> list[bytes]:
    """The content of several objects of one store, fetched concurrently (local files in turn)."""
    if not paths:
        return []
    if not is_url(paths[0]):
        return [pathlib.Path(p).read_bytes() for p in paths]
    with storage_op("reading", paths[0]):
        got = filesystem(paths[0]).cat(list(paths), on_error="raise")
    return [got[p] if p in got else got[p.split("://", 1)[1]] for p in paths]


def glob(pattern: str) -> list[str]:
    """Paths matching `pattern` (`*`, `?`, `[...]`; `~` expanded locally), sorted; URLs stay URLs."""
    if is_url(pattern):
        with storage_op("listing", pattern):
            fs = filesystem(pattern)
            scheme = pattern.split("://", 1)[0] + "://"
            if not globlib.has_magic(pattern):
                return [pattern] if fs.isfile(pattern) else []
            return sorted(p if is_url(p) else scheme + p for p in fs.glob(pattern))
    return sorted(globlib.glob(os.path.expanduser(pattern)))


def files_under(path: PathLike) -> list[str]:
    """Every file below directory `path`, recursively (one listing request on a store)."""
    if is_url(path):
        scheme = os.fspath(path).split("://", 1)[0] + "://"
        with storage_op("listing", path):
            return sorted(scheme + p for p in filesystem(path).find(os.fspath(path)))
    return sorted(str(p) for p in pathlib.Path(path).rglob("*") if p.is_file())


def remove(path: PathLike, missing_ok: bool = True) -> None:
    with storage_op("deleting", path):
        try:
            as_path(path).unlink()
        except FileNotFoundError:
            if not missing_ok:
                raise


def remove_tree(path: PathLike) -> None:
    """A directory and everything below it (nothing when it is not there)."""
    if is_url(path):
        with storage_op("deleting", path):
            fs = filesystem(path)
            found = fs.find(os.fspath(path))
            if found:
                fs.rm(found)
        return
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def move_tree(src: PathLike, dst: PathLike) -> None:
    """A directory moved: a rename on a disk; in a store a copy of each object then its removal
    (not atomic: only for setting aside what nothing reads any more)."""
    if is_url(src):
        with storage_op("moving", src):
            fs = filesystem(src)
            fs.mv(os.fspath(src), os.fspath(dst), recursive=True)
        return
    import shutil

    shutil.move(os.fspath(src), os.fspath(dst))
