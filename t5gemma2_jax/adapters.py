"""LoRA on a `T5Gemma2`: add adapters, fold them in, and store the frozen base quantised (QLoRA).

    model = tg.apply_lora(model, rank=8, alpha=16)          # every attention and MLP projection of both towers
    nnx.state(model, nnx.LoRAParam)                          # what fine-tuning trains
    model = tg.merge_lora(model)                             # adapters folded in: a plain model again

Targets are Hugging Face module names, matched the way PEFT matches `target_modules` (a module
`…self_attn.q_proj` is matched by `q_proj`): text `q_proj k_proj v_proj o_proj gate_proj up_proj
down_proj`, SigLIP `q_proj k_proj v_proj out_proj fc1 fc2`, and `multi_modal_projector` for the
projector's weight (PEFT's `target_parameters`). So `q_proj` adapts the SigLIP tower's query
projection as well when the model has one, as in PEFT. A target that is not one of these names is
a regular expression over our parameter paths (`decoder.*attn\\.(q|v)`), fully matched. In a
scanned stack the layers at one position of the repeating block share a path: a regular
expression selects positions of the block, a name selects every layer.

The adapters are this project's own (`nn.lora.LoRA`, `nnx.LoRAParam` variables created at their
kernels' paths): Qwix's LoRA provider, tried first, creates its parameters by intercepting calls
and cannot reach kernels applied inside the layer scan (`jax.lax.scan` over stacked blocks), which
every real configuration uses.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5gemma2_jax import storage
from t5gemma2_jax.checkpoints import peft
from t5gemma2_jax.checkpoints.hf import hf_entries
from t5gemma2_jax.checkpoints.peft import Site, all_sites
from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.model import T5Gemma2
from t5gemma2_jax.nn.lora import LoRA
from t5gemma2_jax.nn.project import kernel
from t5gemma2_jax.nn.quant import QUANTIZATIONS, QuantizedKernel

TEXT_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PROJECTOR = "multi_modal_projector"
HF_NAMES = tuple(dict.fromkeys(TEXT_NAMES + VISION_NAMES + (PROJECTOR,)))
# Every attention and MLP projection of both text towers (the names alone would also take the
# SigLIP tower's q/k/v, as PEFT's do).
DEFAULT_TARGETS = (r"(encoder|decoder)\.stack\..*\.(attn|cross_attn|mlp)\.(q|k|v|o|gate|up|down)",)


def _matches_name(site: Site, name: str) -> bool:
    if name == PROJECTOR:
        return not site.linear
    return site.linear and all(m == name or m.endswith("." + name) for m in site.hf_modules)


def select_sites(config, targets: str | Sequence[str] | None = None) -> list[Site]:
    """The sites `targets` name (see the module docstring); raises ConfigError naming any target
    that selects nothing, with the valid names."""
    targets = DEFAULT_TARGETS if targets is None else ((targets,) if isinstance(targets, str) else tuple(targets))
    if not targets:
        raise ConfigError("lora.targets: empty; name Hugging Face modules or give a regular expression")
    sites = all_sites(config)
    chosen: dict[tuple, Site] = {}
    for target in targets:
        if target in HF_NAMES:
            hit = [s for s in sites if _matches_name(s, target)]
        else:
            try:
                pattern = re.compile(target)
            except re.error as e:
                raise ConfigError(f"lora.targets: {target!r} is neither a module name {HF_NAMES} nor a regular "
                                  f"expression ({e})") from None
            hit = [s for s in sites if pattern.fullmatch(s.name)]
        if not hit:
            where = "" if config.with_vision else " (this model has no vision tower)"
            raise ConfigError(f"lora.targets: {target!r} matches no projection{where}; module names: "
                              f"{list(HF_NAMES)}, or a regular expression over paths such as {sites[0].name!r}")
        chosen.update({s.path: s for s in hit})
    return [s for s in sites if s.path in chosen]


def module_at(model: nnx.Module, path: Iterable) -> nnx.Module:
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _logical_axes(var) -> tuple:
    axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
    return tuple(axes) if axes is not None else (None,) * len(var.shape)


def _check_rank(rank, site: Site, shape: tuple) -> None:
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
        raise ConfigError(f"lora.rank: must be a positive integer, got {rank!r}")
    lead = 1 if site.stacked else 0
    width = min(math.prod(shape[lead:lead + site.in_dims]), math.prod(shape[lead + site.in_dims:]))
    if rank > width:
        raise ConfigError(f"lora.rank: {rank} is above the width {width} of {site.name} {tuple(shape)}; a low-rank "
                          "update of rank above it is no longer low-rank")


def apply_lora(model: T5Gemma2, rank: int = 8, alpha: float = 16.0, targets: str | Sequence[str] | None = None,
               dropout: float = 0.0, *, rngs: nnx.Rngs | jax.Array | int = 0, dtype="float32") -> T5Gemma2:
    """Adds a LoRA adapter to each selected kernel of `model` (in place; returns it). A starts
    like PEFT's (uniform in ±1/sqrt(fan_in)), B at zero, so the adapted model equals its base.
    `dtype` is the adapters' parameter dtype (float32 by default, whatever the base's)."""
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
        raise ConfigError(f"lora.alpha: must be a positive number, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora.dropout: must be in [0, 1), got {dropout!r}")
    if isinstance(rngs, nnx.Rngs):
        key = rngs.params()
    elif isinstance(rngs, int):
        key = jax.random.key(rngs)
    else:
        key = rngs                       # a PRNG key
    dtype = jnp.dtype(dtype)
    for n, site in enumerate(select_sites(model.config, targets)):
        module = module_at(model, site.path[:-1])
        name = site.path[-1]
        if getattr(module, f"{name}_lora", None) is not None:
            raise ConfigError(f"apply_lora: {site.name} already has an adapter (merge_lora first)")
        var = getattr(module, name)
        shape = tuple(var.shape)
        _check_rank(rank, site, shape)
        lead, k = (1 if site.stacked else 0), site.in_dims
        axes = _logical_axes(var) if not isinstance(var, QuantizedKernel) else _logical_axes(var.codes)
        a_shape = shape[:lead] + shape[lead:lead + k] + (rank,)
        b_shape = shape[:lead] + (rank,) + shape[lead + k:]
        bound = 1.0 / math.sqrt(math.prod(shape[lead:lead + k]))
        a = jax.random.uniform(jax.random.fold_in(key, n), a_shape, jnp.float32, -bound, bound).astype(dtype)
        setattr(module, f"{name}_lora", LoRA(
            a, jnp.zeros(b_shape, dtype), in_dims=k, alpha=alpha, dropout=dropout, name=site.name,
            axes_a=axes[:lead] + axes[lead:lead + k] + ("lora_rank",),
            axes_b=axes[:lead] + ("lora_rank",) + axes[lead + k:]))
    return model


def lora_sites(model: T5Gemma2) -> list[tuple[Site, LoRA]]:
    """The sites of `model` that hold an adapter, with it."""
    out = []
    for site in all_sites(model.config):
        lora = getattr(module_at(model, site.path[:-1]), f"{site.path[-1]}_lora", None)
        if lora is not None:
            out.append((site, lora))
    return out


def merge_lora(model: T5Gemma2) -> T5Gemma2:
    """Folds every adapter into its kernel and removes it (in place; returns `model`): the result
    is a plain model, for `save_hf` or for serving without the adapter's extra matmuls. A
    quantised kernel is dequantised first (its adapter was trained against the dequantised one)."""
    for site, lora in lora_sites(model):
        module = module_at(model, site.path[:-1])
        name = site.path[-1]
        var = getattr(module, name)
        base = kernel(module, name)
        merged = base.astype(jnp.float32) + lora.delta()
        if isinstance(var, QuantizedKernel):
            setattr(module, name, nnx.Param(merged.astype(var.dtype), logical_axes=_logical_axes(var.codes)))
        else:
            var.set_value(merged.astype(var.dtype))
        delattr(module, f"{name}_lora")
    return model


def quantize_base(model: T5Gemma2, method: str, targets: str | Sequence[str] | None = None) -> T5Gemma2:
    """Stores the selected frozen kernels quantised (`int8` or `nf4`), in place; returns `model`.
    Default: every linear projection of both text towers (the bulk of the weights); embeddings,
    norms and the vision tower stay as they are."""
    if method not in QUANTIZATIONS:
        raise ConfigError(f"lora.quantize_base: {method!r} not in {('none',) + QUANTIZATIONS}")
    for site in select_sites(model.config, targets):
        if not site.linear:
            continue
        module = module_at(model, site.path[:-1])
        name = site.path[-1]
        var = getattr(module, name)
        if isinstance(var, QuantizedKernel):
            continue
        setattr(module, name, QuantizedKernel(var[...], method=method, in_dims=site.in_dims, stacked=site.stacked,
                                              logical_axes=_logical_axes(var), dtype=var.dtype))
    return model


def save_peft(model: T5Gemma2, path, *, base_model_name_or_path: str | None = None):
    """Writes the adapters of `model` as a PEFT LoRA directory, which
    `peft.PeftModel.from_pretrained(T5Gemma2ForConditionalGeneration...)` loads
    (`t5gemma2_jax.checkpoints.peft`)."""
    hf_entries(model.config)                      # refuses architectures the HF format cannot hold
    sites = lora_sites(model)
    if not sites:
        raise ConfigError("save_peft: the model has no adapters (apply_lora first)")
    adapters = [peft.Adapter(site, lora.rank, lora.alpha, lora.dropout, _host(lora.a[...]), _host(lora.b[...]))
                for site, lora in sites]
    if jax.process_index() != 0:       # every process gathers (a collective); one writes
        return storage.as_path(path)
    return peft.write_adapter(path, adapters, base_model_name_or_path=base_model_name_or_path)


def _host(x: jax.Array) -> np.ndarray:
    """The whole array on this host, also when its shards live on other processes (every process
    of a multi-host job must call this for the same arrays)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def load_peft(model: T5Gemma2, path) -> T5Gemma2:
    """Adds the adapters of a PEFT LoRA directory to `model` (in place; returns it); raises
    CheckpointError naming what does not fit before the model changes."""
    sites = all_sites(model.config)
    shapes = {s.path: tuple(getattr(module_at(model, s.path[:-1]), s.path[-1]).shape) for s in sites}
    for ad in peft.read_adapter(path, sites, shapes):
        apply_lora(model, rank=ad.rank, alpha=ad.alpha, dropout=ad.dropout, targets=re.escape(ad.site.name))
        lora = getattr(module_at(model, ad.site.path[:-1]), f"{ad.site.path[-1]}_lora")
        lora.a.set_value(jnp.asarray(ad.a, lora.a.dtype))
        lora.b.set_value(jnp.asarray(ad.b, lora.b.dtype))
    return model


def adapter_arrays(model: T5Gemma2) -> dict[str, np.ndarray]:
    """Every adapter of `model` as host arrays `{'<path>.a': A, '<path>.b': B}` (small)."""
    out = {}
    for site, lora in lora_sites(model):
        out[site.name + ".a"] = _host(lora.a[...])
        out[site.name + ".b"] = _host(lora.b[...])
    return out
