"""What every command line of the project does with a user's mistake: one line, exit status 2.

Errors that describe bad input (a config, a machine that does not fit it, a checkpoint or data
file that is missing or malformed, a checkpoint directory that cannot be written) are printed as
`error: ...` on one line, without a traceback; anything else is a bug and keeps its traceback
(its frames cleared of their locals, see `run`).

An object store that stops answering (`StorageError`) ends the process right after its line:
the writers still running in the background (Orbax's save thread, tensorboardX's last flush at
interpreter exit) would each retry the store for minutes before the exit could happen.
"""

from __future__ import annotations

import gc
import os
import sys
import traceback
from typing import Callable

from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError
from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.data.images import ImageError
from t5gemma2_jax.data.pipeline import DataQualityError
from t5gemma2_jax.parallel import SetupError
from t5gemma2_jax.storage import StorageError
from t5gemma2_jax.train.checkpoint import CheckpointIOError

USER_ERRORS = (ConfigError, SetupError, CheckpointError, CheckpointIOError, DataQualityError, ImageError, StorageError)
USAGE = 2


def one_line(error: BaseException) -> str:
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__


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
        # A traceback that reaches the interpreter keeps every frame's locals alive until exit: the
        # batches a data worker handed over in shared memory, the train state. Grain's and
        # multiprocessing's exit handlers then report them as leaks after the error. Free them now;
        # the traceback prints the same without them.
        traceback.clear_frames(e.__traceback__)
        gc.collect()
        raise
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
