#!/usr/bin/env python
"""Our forward (and greedy generation) against keras-hub's T5Gemma2 on the JAX backend, same weights.

    /tmp/khvenv/bin/python scripts/benchmark_keras_hub.py --encoder-length 8192 --decoder-length 256 --batch 1
    /tmp/khvenv/bin/python scripts/benchmark_keras_hub.py --encoder-length 512 --decoder-length 128 --batch 2

One process, one set of random weights (text only, float32):

- ours: a `t5gemma2_jax.T5Gemma2` built from `--preset` with the package defaults
  (`attention_backend="auto"`), called as users call it, `model(input_ids, decoder_input_ids)`
  (compiled on its first call, then reused);
- keras-hub: `keras_hub.models.T5Gemma2Seq2SeqLM` (the backbone plus its tied output head, so
  both sides produce the same `[B, T, V]` logits), its `stateless_call` under `jax.jit` with the
  variables as arguments (what `predict_on_batch` compiles, without copying the logits to numpy).

The weights go from our model to keras-hub's in memory through keras-hub's own converter for
Hugging Face checkpoints (`keras_hub.src.utils.transformers.convert_t5gemma2`: its
`convert_backbone_config` and `convert_weights`, fed the tensors `t5gemma2_jax.save_hf` would
write). Before any timing both forwards run once and the largest absolute differences of the
logits and of the encoder's output are printed; a relative logit difference above `--tolerance`
stops the run (exit 1). With `--new-tokens N` (default 32; 0 skips it) both also generate N greedy
tokens from the same prompt (`t5gemma2_jax.generate`; keras-hub's `generate` with the greedy
sampler, `stop_token_ids=None`), and the tokens the two agree on are counted.

Timings: the first call (compilation included; both first calls come before the check) and the
best of `--reps` calls after it, each ended by `block_until_ready`; compilation is estimated as the
first call less the best one (`*_compile_s`, negative when the load changed in between), and the
ratio is keras-hub's best over ours. `uptime`'s load average is
printed first, since the figures mean little on a busy machine. `--json FILE` appends one line.

keras-hub is not a dependency of the project and must not go into its environment (it pulls
TensorFlow and moves pinned versions). Install it in a separate virtual environment, with the
project at its pinned versions (jax must stay the project's):

    .venv/bin/python -m venv /tmp/khvenv                     # the project's Python, a new environment
    /tmp/khvenv/bin/pip install -c constraints.txt -e .
    /tmp/khvenv/bin/pip install -c constraints.txt keras-hub==0.32.0 keras
    /tmp/khvenv/bin/python -c "import jax; print(jax.__version__)"      # still the constraints' jax

Tested with keras-hub 0.32.0 and keras 3.15.1 (tensorflow 2.21 and tensorflow-text come along; every
package the constraints pin keeps its version). `T5Gemma2Backbone.from_preset(dir)` on a
`tg.save_hf` directory does not load as is: keras-hub's converter needs `initializer_range` in the
config and builds a vision tower whenever `vision_config` is there, hence the in-memory route.
Without keras-hub the script exits with one `error:` line and status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

# keras reads its backend once, at import: it must be jax, the same jax as ours.
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import t5gemma2_jax as tg
from t5gemma2_jax.checkpoints.hf import hf_entries, hub_key
from t5gemma2_jax.checkpoints.hf_config import config_to_hf
from t5gemma2_jax.checkpoints.staging import get_path
from t5gemma2_jax.parallel import SetupError

INSTALL = (".venv/bin/python -m venv /tmp/khvenv && /tmp/khvenv/bin/pip install -c constraints.txt -e . && "
           "/tmp/khvenv/bin/pip install -c constraints.txt keras-hub==0.32.0 keras, then run this script with "
           "/tmp/khvenv/bin/python")


def import_keras_hub():
    """keras and keras_hub on the JAX backend, or a SetupError saying how to install them."""
    try:
        import keras
        import keras_hub
        from keras_hub.src.utils.transformers import convert_t5gemma2
    except ImportError as e:
        raise SetupError(f"keras-hub is not installed in this environment ({e}); install it in a separate "
                         f"virtual environment, not the project's: {INSTALL}") from None
    if keras.backend.backend() != "jax":
        raise SetupError(f"keras runs on the {keras.backend.backend()!r} backend; set KERAS_BACKEND=jax "
                         "(or leave it unset) so that keras-hub runs on the same jax as the model")
    return keras, keras_hub, convert_t5gemma2


def hf_tensors(model) -> dict[str, np.ndarray]:
    """The tensors `tg.save_hf(model, dir)` writes, by their key there, as numpy arrays in memory."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out = {}
    for e in hf_entries(model.config):
        arr = get_path(pure, e.path)
        out[hub_key(e.hf_key)] = np.asarray(e.to_hf(np.asarray(arr[e.index] if e.index is not None else arr)))
    return out


def keras_hub_config(cfg, convert) -> tuple[dict, dict]:
    """keras-hub's backbone arguments for `cfg` through its converter of Hugging Face configs, and
    the Hugging Face config it was given.

    `config_to_hf` writes what transformers needs; keras-hub's converter also reads
    `initializer_range` (only used to initialise weights that are then overwritten) and builds a
    vision tower whenever `vision_config` is present, so it gets the text-only config."""
    hf = config_to_hf(cfg, "float32")
    hf["encoder"] = {k: v for k, v in hf["encoder"].items() if k != "vision_config"}
    for tower in (hf["encoder"]["text_config"], hf["decoder"]):
        tower.setdefault("initializer_range", 0.02)
    return convert.convert_backbone_config(hf), hf


class MemoryLoader:
    """What keras-hub's `SafetensorLoader` gives `convert_weights` (`port_weight`), over a dict:
    keys are looked up as there, with the common prefix (`model.`) found from the first key."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors, self.prefix, self.used = tensors, None, set()

    def get_tensor(self, key: str) -> np.ndarray:
        if self.prefix is None:
            self.prefix = next((k[: -len(key)] for k in self.tensors if k.endswith(key)), "")
        full = key if key in self.tensors else self.prefix + key
        self.used.add(full)
        return self.tensors[full]

    def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
        x = self.get_tensor(hf_weight_key)
        if hook_fn:
            x = hook_fn(x, list(keras_variable.shape))
        if tuple(x.shape) != tuple(keras_variable.shape):
            raise ValueError(f"{hf_weight_key}: shape {tuple(x.shape)} for keras variable "
                             f"{keras_variable.path} of shape {tuple(keras_variable.shape)}")
        keras_variable.assign(x)


def build_keras_hub(model, keras_hub, convert):
    backbone_kwargs, hf_config = keras_hub_config(model.config, convert)
    backbone = keras_hub.models.T5Gemma2Backbone(**backbone_kwargs, dtype="float32")
    tensors = hf_tensors(model)
    loader = MemoryLoader(tensors)
    convert.convert_weights(backbone, loader, hf_config)
    # The end-of-image embedding: keras-hub's text-only backbone has none (the inputs avoid that id).
    unused = sorted(set(tensors) - loader.used - {"model.encoder.embed_tokens.eoi_embedding"})
    if unused:
        raise ValueError(f"keras-hub's converter left {len(unused)} of our tensors unread: {unused[:5]}")
    del tensors, loader
    return keras_hub.models.T5Gemma2Seq2SeqLM(backbone=backbone, preprocessor=None)


def first_call(fn):
    """(seconds of the first call, compilation included; its result)."""
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t, out


def best_of(fn, reps: int) -> float:
    """The fastest of `reps` calls, in seconds, each ended by `block_until_ready`."""
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def compile_estimate(first: float, best: float) -> str:
    """Compilation time as the first call less a later one: only as good as the machine is quiet."""
    if first >= best:
        return f"compile ~{first - best:.2f} s"
    return "compile not estimable: the first call beat the later ones, the machine's load changed"


def ratio(theirs: float, ours: float) -> str:
    r = theirs / ours
    return f"keras-hub / ours = {r:.2f} (ours {r:.2f}x faster)" if r >= 1 else \
        f"keras-hub / ours = {r:.2f} (ours {1 / r:.2f}x slower)"


def load() -> str:
    try:
        return subprocess.run(["uptime"], check=False, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="270m-270m", choices=tg.PRESETS)
    p.add_argument("--encoder-length", type=int, default=512)
    p.add_argument("--decoder-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="timed calls after the first (best reported)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to generate in both (0: skip)")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest |logits difference| / largest |logit| accepted before timing")
    p.add_argument("--json", help="append the results as one JSON line to this file")
    a = p.parse_args(argv)

    uptime = load()                              # before keras-hub's imports load the machine
    keras, keras_hub, convert = import_keras_hub()
    print(f"uptime: {uptime}", flush=True)
    B, S, T, N = a.batch, a.encoder_length, a.decoder_length, a.new_tokens

    cfg = tg.preset(a.preset, with_vision=False)
    model = tg.T5Gemma2(cfg, rngs=nnx.Rngs(0))
    t = time.perf_counter()
    lm = build_keras_hub(model, keras_hub, convert)
    copy_s = time.perf_counter() - t
    dev = jax.devices()[0]
    print(f"{a.preset}, batch {B}, encoder {S}, decoder {T}, float32, {dev.platform}:{dev.device_kind}, "
          f"jax {jax.__version__}, keras {keras.__version__}, keras-hub {keras_hub.__version__}; "
          f"ours attention_backend={cfg.attention_backend!r}; weights copied in {copy_s:.1f} s", flush=True)

    rng = np.random.default_rng(0)
    special = [cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id]

    def random_ids(shape):
        # No image markers: ours embeds the end-of-image id with its own vector, keras-hub's
        # text-only backbone does not; the rest of the vocabulary is the same in both.
        x = rng.integers(10, cfg.vocab_size, shape)
        return np.where(np.isin(x, special), 10, x)

    ids = jnp.asarray(random_ids((B, S)), jnp.int32)
    dec = jnp.asarray(np.concatenate([np.full((B, 1), cfg.bos_token_id), random_ids((B, T - 1))], axis=1), jnp.int32)
    inputs = {"encoder_token_ids": ids, "encoder_padding_mask": jnp.ones((B, S), jnp.int32),
              "decoder_token_ids": dec, "decoder_padding_mask": jnp.ones((B, T), jnp.int32)}
    trainable = [v.value for v in lm.trainable_variables]
    non_trainable = [v.value for v in lm.non_trainable_variables]
    lm_forward = jax.jit(lambda tv, ntv, x: lm.stateless_call(tv, ntv, x, training=False)[0])
    encoder_model = keras.Model(lm.backbone.input, lm.backbone.output["encoder_sequence_output"])
    encoder_vars = ([v.value for v in encoder_model.trainable_variables],
                    [v.value for v in encoder_model.non_trainable_variables])

    ours_forward = lambda: model(ids, dec)
    kh_forward = lambda: lm_forward(trainable, non_trainable, inputs)
    ours_first, ours_out = first_call(ours_forward)
    kh_first, kh_logits = first_call(kh_forward)

    # The same computation? Logits and the encoder's final states, compared before the figures.
    logits = np.asarray(ours_out.logits)
    kh_logits = np.asarray(kh_logits)
    logit_diff = float(np.max(np.abs(logits - kh_logits)))
    logit_scale = float(np.max(np.abs(logits)))
    kh_enc = np.asarray(jax.jit(lambda tv, ntv, x: encoder_model.stateless_call(tv, ntv, x, training=False)[0])(
        *encoder_vars, inputs))
    enc_diff = float(np.max(np.abs(np.asarray(ours_out.encoder_states) - kh_enc)))
    argmax_agree = float(np.mean(logits.argmax(-1) == kh_logits.argmax(-1)))
    print(f"agreement: max |logits difference| {logit_diff:.3g} (largest |logit| {logit_scale:.3g}, relative "
          f"{logit_diff / logit_scale:.3g}); max |encoder output difference| {enc_diff:.3g}; "
          f"argmax equal at {100 * argmax_agree:.1f} % of positions", flush=True)
    del logits, kh_logits, kh_enc, ours_out
    result = dict(preset=a.preset, batch=B, encoder_length=S, decoder_length=T, dtype="float32",
                  attention_backend=cfg.attention_backend, device=f"{dev.platform}:{dev.device_kind}",
                  host=platform.processor() or platform.machine(), cpus=os.cpu_count(), uptime=uptime,
                  jax=jax.__version__, keras=keras.__version__, keras_hub=keras_hub.__version__,
                  max_abs_logit_diff=logit_diff, max_abs_logit=logit_scale, max_abs_encoder_diff=enc_diff,
                  argmax_agreement=argmax_agree, reps=a.reps)
    if logit_diff > a.tolerance * logit_scale:
        print(f"the two forwards disagree (relative {logit_diff / logit_scale:.3g} > --tolerance {a.tolerance}): "
              "not the same computation, no timings", file=sys.stderr)
        return 1

    ours_best, kh_best = best_of(ours_forward, a.reps), best_of(kh_forward, a.reps)
    result.update(forward_first_s=ours_first, forward_best_s=ours_best, forward_compile_s=ours_first - ours_best,
                  keras_hub_forward_first_s=kh_first, keras_hub_forward_best_s=kh_best,
                  keras_hub_forward_compile_s=kh_first - kh_best,
                  forward_speedup_vs_keras_hub=kh_best / ours_best)
    print(f"forward  ours:      first call {ours_first:8.2f} s ({compile_estimate(ours_first, ours_best)}), "
          f"best of {a.reps} {ours_best:8.3f} s", flush=True)
    print(f"forward  keras-hub: first call {kh_first:8.2f} s ({compile_estimate(kh_first, kh_best)}), "
          f"best of {a.reps} {kh_best:8.3f} s  -> {ratio(kh_best, ours_best)}", flush=True)

    if N > 0:
        prompt = {"encoder_token_ids": np.asarray(ids), "encoder_padding_mask": np.ones((B, S), np.int32),
                  "decoder_token_ids": np.concatenate([np.full((B, 1), cfg.bos_token_id, np.int32),
                                                       np.zeros((B, N), np.int32)], axis=1),
                  "decoder_padding_mask": np.concatenate([np.ones((B, 1), np.int32),
                                                          np.zeros((B, N), np.int32)], axis=1)}
        lm.compile(sampler="greedy")
        # eos_id=-1 / stop_token_ids=None: neither stops early, both produce exactly N tokens.
        ours_generate = lambda: np.asarray(tg.generate(model, ids, max_new_tokens=N, eos_id=-1))
        kh_generate = lambda: lm.generate(prompt, stop_token_ids=None)
        g_first, ours_tokens = first_call(ours_generate)
        kg_first, kh_out = first_call(kh_generate)
        same = float(np.mean(ours_tokens == np.asarray(kh_out["decoder_token_ids"])[:, 1:]))
        g_best, kg_best = best_of(ours_generate, a.reps), best_of(kh_generate, a.reps)
        result.update(new_tokens=N, generate_first_s=g_first, generate_best_s=g_best,
                      generate_compile_s=g_first - g_best, keras_hub_generate_first_s=kg_first,
                      keras_hub_generate_best_s=kg_best, keras_hub_generate_compile_s=kg_first - kg_best,
                      generate_speedup_vs_keras_hub=kg_best / g_best, generated_tokens_agreement=same)
        print(f"generate ({N} greedy tokens; {100 * same:.1f} % of the tokens the same in both)", flush=True)
        print(f"generate ours:      first call {g_first:8.2f} s ({compile_estimate(g_first, g_best)}), "
              f"best of {a.reps} {g_best:8.3f} s ({B * N / g_best:.1f} tok/s)", flush=True)
        print(f"generate keras-hub: first call {kg_first:8.2f} s ({compile_estimate(kg_first, kg_best)}), "
              f"best of {a.reps} {kg_best:8.3f} s ({B * N / kg_best:.1f} tok/s)  -> {ratio(kg_best, g_best)}",
              flush=True)

    result["peak_host_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    from t5gemma2_jax import cli

    sys.exit(cli.run(main))
