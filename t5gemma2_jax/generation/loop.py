"""What a compiled decoding loop reads its decoder weights from."""

from __future__ import annotations

from t5gemma2_jax.ops.backends import target_platform


def loop_layers(model) -> list | None:
    """The decoder's layers sliced out of their scanned stack once, before a decoding loop, or
    None to let each step slice them (`model.decode_step(..., layers)`).

    Inside the loop a slice of the stacked weights feeds each matmul. TPU fuses the slice into the
    matmul; CPU (and GPU) XLA copies it first, i.e. writes and rereads every decoder weight per
    step, which costs more than reading them. So off TPU the slices are taken once, holding a
    second copy of the decoder's weights for the duration of the call (none for an unscanned stack).
    """
    if target_platform() == "tpu":
        return None
    return model.decoder.stack.decode_layers()


def loop_block_states(model) -> list | None:
    """`loop_layers` for a loop run from Python, one compiled step per call (`generate_stream`):
    the scanned blocks' sliced parameters, to return from one program and pass to the next
    (`model.decoder.stack.decode_layers(block_states)`), or None where nothing is sliced."""
    if target_platform() == "tpu" or model.decoder.stack.blocks is None:
        return None
    return model.decoder.stack.block_states()
