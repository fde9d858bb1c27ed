"""What a checkpoint reader found wrong with a checkpoint, gathered so one error lists all of it.

Readers (`load_hf`, `adapt_gemma3`, `load_export`) walk every key before failing: a user fixing a
converted checkpoint sees every unknown, missing and mis-shaped tensor at once, not one per run.
"""

from __future__ import annotations

from collections import defaultdict

import jax.numpy as jnp
import numpy as np

from t5gemma2_jax.checkpoints.safetensors_io import FLOATING, CheckpointDir, CheckpointError

UNKNOWN, MISMATCHED, DUPLICATED = "unknown keys", "shape mismatches", "tensors present twice"
DTYPE_MISMATCHES = "dtype mismatches"
SHOWN = 12      # items listed per kind; the count says how many there are


class KeyTriage:
    def __init__(self):
        self.problems: dict[str, list[str]] = defaultdict(list)

    def add(self, label: str, item: str) -> None:
        self.problems[label].append(item)

    def extend(self, label: str, items) -> None:
        for item in items:
            self.add(label, item)

    def check_shape(self, key: str, stored: tuple, converted: tuple, expected: tuple, where: str = "") -> bool:
        """Records a mismatch unless `converted == expected`; returns whether they match."""
        if tuple(converted) == tuple(expected):
            return True
        at = f" at {where}" if where else ""
        self.add(MISMATCHED, f"{key}: checkpoint {tuple(stored)} -> {tuple(converted)}, model expects "
                             f"{tuple(expected)}{at}")
        return False

    def check_dtype(self, ckpt: CheckpointDir, key: str, target) -> bool:
        """Records a mismatch unless the stored dtype may be converted into the parameter's.

        Between floating types a conversion is a rounding (a bf16 checkpoint into an fp32 model).
        From anything else it would turn bit patterns into numbers: a header declaring I32 over
        what is really F32 data would load without error as garbage weights, so it is refused.
        """
        stored, target = ckpt.dtype(key), np.dtype(target)
        if not jnp.issubdtype(target, jnp.floating) or stored in FLOATING:  # numpy does not count bf16
            return True
        self.add(DTYPE_MISMATCHES, f"{key}: stored as {stored} in {ckpt.file(key).name}, expected a floating "
                                   f"type (F32, F16, BF16 or F64) for a {target.name} parameter")
        return False

    def raise_if_any(self, header: str) -> None:
        def rank(label: str) -> int:
            return {UNKNOWN: 0, MISMATCHED: 2, DTYPE_MISMATCHES: 2, DUPLICATED: 3}.get(
                label, 1 if label.startswith("missing") else 4)

        def listed(label: str, items: list[str]) -> str:
            items = items if label in (MISMATCHED, DTYPE_MISMATCHES) else sorted(items)
            more = f" (and {len(items) - SHOWN} more)" if len(items) > SHOWN else ""
            return f"{label} ({len(items)}): {items[:SHOWN]}{more}"

        lines = [listed(label, items) for label, items in sorted(self.problems.items(), key=lambda kv: rank(kv[0]))
                 if items]
        if lines:
            raise CheckpointError(f"{header}:\n  " + "\n  ".join(lines))
