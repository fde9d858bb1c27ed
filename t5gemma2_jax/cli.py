"""What every command line of the project does with a user's mistake: one line, exit status 2.

Errors that describe bad input (a config, a machine that does not fit it, a checkpoint or data
file that is missing or malformed, a checkpoint directory that cannot be written) are printed as
`error: ...` on one line, without a traceback, and so is an allocation the device could not make
(what to shrink is the user's choice); anything else is a bug and keeps its traceback (its frames
cleared of their locals, see `run`).

Logging on several hosts (`configure_logging`, `start_processes`): every line names its process
(`[p1]`), process 0 logs from INFO up, the others only warnings and errors, so a pod's logs read
as one run with each host's problems in them.

An object store that stops answering (`StorageError`) ends the process right after its line:
the writers still running in the background (Orbax's save thread, tensorboardX's last flush at
interpreter exit) would each retry the store for minutes before the exit could happen.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import traceback
from typing import Callable

from t5gemma2_jax.checkpoints.run import CheckpointIOError
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError
from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.data.images import ImageError
from t5gemma2_jax.data.pipeline import DataQualityError
from t5gemma2_jax.parallel import SetupError, maybe_initialize_distributed
from t5gemma2_jax.storage import StorageError

USER_ERRORS = (ConfigError, SetupError, CheckpointError, CheckpointIOError, DataQualityError, ImageError, StorageError)
USAGE = 2
log = logging.getLogger(__name__)


def one_line(error: BaseException) -> str:
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__


def out_of_memory(error: BaseException) -> bool:
    """An allocation XLA could not make (a machine too small for the shapes asked of it)."""
    return isinstance(error, RuntimeError) and str(error).lstrip().startswith("RESOURCE_EXHAUSTED")


def run(main: Callable[[], object]) -> int:
    """`main()`'s exit status (an int; whatever else it returns counts as success), or 2 after
    printing a user error on one line."""
    try:
        status = main()
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        if isinstance(e, StorageError):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(USAGE)
        return USAGE
    except BaseException as e:
        if out_of_memory(e):
            print(f"error: the device ran out of memory ({one_line(e)[:200]}); lower the batch size or the "
                  "input length, or use attention_backend=auto (dense holds every [queries, keys] score "
                  "matrix)", file=sys.stderr)
            return USAGE
        # A traceback that reaches the interpreter keeps every frame's locals alive until exit: the
        # batches a data worker handed over in shared memory, the train state. Grain's and
        # multiprocessing's exit handlers then report them as leaks after the error. Free them now;
        # the traceback prints the same without them.
        traceback.clear_frames(e.__traceback__)
        gc.collect()
        raise
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


class ProcessLogFilter(logging.Filter):
    """Tags each record with its process (`record.process_tag`, `p?` until the processes have
    started) and lets records below WARNING through on process 0 only. The index is set, not looked
    up: asking JAX for it from inside a log call could start, or wait on, a backend."""

    def __init__(self):
        super().__init__()
        self.index: int | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_tag = "p?" if self.index is None else f"p{self.index}"
        return self.index in (None, 0) or record.levelno >= logging.WARNING


PROCESS_FILTER = ProcessLogFilter()


class UnreachableStoreFilter(logging.Filter):
    """Keeps one line of a background thread's report of a connection failure (Orbax's save
    threads log the exception they hand to the main thread): the main thread ends the run with
    the one-line error naming the bucket and the operation, and a traceback beside it would only
    repeat the store's address."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and threading.current_thread() is not threading.main_thread():
            e: BaseException | None = record.exc_info[1]
            while e is not None and not isinstance(e, OSError):
                e = e.__cause__ or e.__context__
            if e is not None:
                record.exc_info, record.exc_text = None, None
        return True
LOG_FORMAT = "%(asctime)s [%(process_tag)s] %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO, quiet: tuple[str, ...] = ("absl", "orbax", "jax._src")) -> None:
    """The scripts' logging: one stderr handler tagging each line with its process; `quiet`
    loggers from WARNING up."""
    root = logging.getLogger()
    for h in list(root.handlers):
        # absl's first log call (orbax logs while it is imported) runs logging.basicConfig(): a bare
        # stderr handler that would take every line. Replace that one, keep any other (pytest's).
        if type(h) is logging.StreamHandler and h.stream is sys.stderr and not h.filters:
            root.removeHandler(h)
    handler = logging.StreamHandler()
    handler.addFilter(PROCESS_FILTER)
    handler.addFilter(UnreachableStoreFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler])   # a no-op where logging is set up already (pytest)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)


def start_processes(mode: str) -> int:
    """`parallel.maybe_initialize_distributed(mode)`, then this process' index in every log line
    (and INFO from process 0 only); returns the index."""
    import jax

    reason = maybe_initialize_distributed(mode)
    PROCESS_FILTER.index = jax.process_index()
    if reason:
        log.info("jax.distributed (%s): process %d of %d", reason, jax.process_index(), jax.process_count())
    return PROCESS_FILTER.index

