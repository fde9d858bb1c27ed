"""Stopping a run at a step every host agrees on, with a checkpoint: preemption, SIGTERM, Ctrl-C.

Two sources decide, as in Orbax and MaxText:

- JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`), checked at every
  step. Once `jax.distributed` is up, JAX's notifier hears SIGTERM (and, on Cloud TPU, maintenance
  events) on any host and agrees with every host on one step to stop at. Its errors are raised.
- This process' own request (SIGTERM, Ctrl-C): on one process it stops after the current step; on
  several it is shared at logging steps (`sync=True`, one all-gather), so signals JAX's notifier
  does not carry (Ctrl-C) still stop every host at the same step.

The SIGTERM handler chains to whatever handler was there before, JAX's notifier included.
JAX installs that one from C++ (`std::signal`), out of Python's sight: `signal.getsignal` still
answers SIG_DFL, and `signal.signal` would silently replace it, after which the sync point never
fires. So the previous handler is read and, on exit, put back with libc's `sigaction` (ctypes), and
called from ours.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
import threading
from typing import Callable

import jax
import numpy as np

log = logging.getLogger(__name__)


class _SigAction(ctypes.Structure):
    # glibc's `struct sigaction` on Linux x86-64 and aarch64: the handler, a 1024-bit mask, flags,
    # the restorer.
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong)))),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]


_SA_SIGINFO = 4
_libc = None


def _sigaction(signum: int, new: _SigAction | None = None) -> _SigAction | None:
    """The kernel's current action for `signum` (installing `new` if given); None off Linux."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    old = _SigAction()
    if _libc.sigaction(signum, ctypes.byref(new) if new is not None else None, ctypes.byref(old)) != 0:
        return None
    return old


def _foreign(action: _SigAction | None, python_trampoline: int | None) -> Callable[[int], None] | None:
    """The C handler in `action` as a callable, unless it is the default, ignore, or Python's own."""
    if action is None or not action.handler or action.handler in (0, 1) or action.handler == python_trampoline:
        return None
    if action.flags & _SA_SIGINFO:
        fn = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(action.handler)
        info = ctypes.create_string_buffer(128)                 # a zeroed siginfo_t
        return lambda signum: fn(signum, ctypes.addressof(info), None)
    fn = ctypes.CFUNCTYPE(None, ctypes.c_int)(action.handler)
    return lambda signum: fn(signum)


def sync_point_available() -> bool:
    """JAX's preemption sync point works here: `jax.distributed` is up and the service enabled."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class PreemptionGuard:
    """Turns SIGTERM (TPU/VM preemption, `kill`) and Ctrl-C (SIGINT) into a stop-after-this-step
    request: the step finishes, a checkpoint is written, the run ends. A second Ctrl-C stops at
    once (KeyboardInterrupt), for when even that is too slow."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None     # the name of the signal that asked to stop
        self._restore: list[Callable[[], None]] = []
        self._chain: dict[int, Callable[[int], None]] = {}
        self._sync_point = False

    def __enter__(self):
        self._sync_point = sync_point_available()
        if jax.process_count() > 1 and not self._sync_point:
            log.warning("JAX's preemption sync point is off (jax_enable_preemption_service=False): a SIGTERM "
                        "to one host stops every host only at the next logging step")
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._install(sig)
        return self

    def _install(self, sig: int) -> None:
        kernel_old = _sigaction(sig)
        python_old = signal.signal(sig, self._handle)
        trampoline = getattr(_sigaction(sig), "handler", None)    # Python's C-level handler
        foreign = _foreign(kernel_old, trampoline)
        if foreign is not None:
            self._chain[sig] = foreign

            def restore(sig=sig, python_old=python_old, kernel_old=kernel_old):
                signal.signal(sig, python_old if python_old is not None else signal.SIG_DFL)
                _sigaction(sig, kernel_old)
        else:
            if sig == signal.SIGTERM and callable(python_old):
                self._chain[sig] = lambda signum, h=python_old: h(signum, None)

            def restore(sig=sig, python_old=python_old):
                signal.signal(sig, python_old if python_old is not None else signal.SIG_DFL)
        self._restore.append(restore)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested is None:
            log.warning("%s: saving a checkpoint after %s, then stopping%s", name,
                        "this step" if jax.process_count() == 1 else "the step every host agrees on",
                        " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
        self.requested = self.requested or name
        chained = self._chain.get(signum)
        if chained is not None:
            chained(signum)

    def __exit__(self, *exc):
        while self._restore:
            self._restore.pop()()
        self._chain = {}

    def should_stop(self, step: int, sync: bool) -> bool:
        """Whether to checkpoint `step` and stop; the same answer on every host. Call it at every
        step (JAX's sync point wants every step id) and with `sync=True` at the same steps on all
        hosts."""
        if self._sync_point and multihost_reached(step):
            if self.requested is None:
                log.warning("preemption notice (another host or the TPU maintenance scheduler): "
                            "saving a checkpoint at step %d, then stopping", step)
            return True
        if jax.process_count() == 1:
            return self.requested is not None
        if sync:
            from jax.experimental import multihost_utils
            return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested is not None))))
        return False


def multihost_reached(step: int) -> bool:
    from jax.experimental import multihost_utils

    return bool(multihost_utils.reached_preemption_sync_point(step))
