"""PEFT LoRA adapter directories: what `peft.PeftModel.from_pretrained` reads, and back.

    DIR/adapter_config.json          PEFT's LoraConfig (peft_type LORA, r, lora_alpha, targets, ...)
    DIR/adapter_model.safetensors    base_model.model.<transformers module>.lora_A.weight / .lora_B.weight

Module names are transformers' (`model.encoder.text_model.layers.3.self_attn.q_proj`), listed in
full in `target_modules`, so PEFT adapts exactly the modules ours did (a bare `out_proj` would
also match the LM head). For an `nn.Linear` with weight `[out, in]`, `lora_A.weight` is `[r, in]`
and `lora_B.weight` `[out, r]`: ours transposed, with multi-axis kernels flattened in the order
the Hugging Face mapping flattens them. The projector's weight is a bare parameter (PEFT's
`target_parameters`), where PEFT adds `lora_B @ lora_A` to the `[in, out]` weight itself: there
our A is `lora_B.weight` and our B `lora_A.weight`, untransposed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import defaultdict
import numpy as np

from t5gemma2_jax import storage
from t5gemma2_jax.checkpoints.hf_text import text_hf_entries
from t5gemma2_jax.checkpoints.hf_vision import vision_hf_entries
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from t5gemma2_jax.checkpoints.triage import MISMATCHED, UNKNOWN, KeyTriage

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


# Our linear kernels: how many leading axes each contracts with its input (the rest are outputs).
IN_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1,
           "q_kernel": 1, "k_kernel": 1, "v_kernel": 1, "out_kernel": 2, "fc1_kernel": 1, "fc2_kernel": 1}


@dataclasses.dataclass(frozen=True)
class Site:
    """One adaptable kernel: where it lives, its HF module names (one per layer it holds), and
    whether it is a `nn.Linear` in transformers or a bare parameter (the projector)."""

    path: tuple                 # module path + kernel name: ('decoder', 'stack', 'blocks', 'layers', 0, 'attn', 'q')
    hf_modules: tuple[str, ...]  # ordered like the stacked axis when `stacked`
    stacked: bool
    linear: bool = True

    @property
    def name(self) -> str:
        return ".".join(map(str, self.path))

    @property
    def in_dims(self) -> int:
        return IN_DIMS.get(self.path[-1], 1)


def all_sites(config) -> list[Site]:
    """Every adaptable kernel of a model built from `config`, from the Hugging Face mapping."""
    entries = list(text_hf_entries(config))
    if config.with_vision:
        entries += [e.prefixed("vision") for e in vision_hf_entries(config)]
    grouped: dict[tuple, list] = {}
    for e in entries:
        if e.path[-1] in IN_DIMS or e.hf_key.endswith("mm_input_projection_weight"):
            grouped.setdefault(e.path, []).append(e)
    sites = []
    for path, group in grouped.items():
        group = sorted(group, key=lambda e: -1 if e.index is None else e.index)
        if group[0].hf_key.endswith("mm_input_projection_weight"):
            sites.append(Site(path, (group[0].hf_key.rsplit(".", 1)[0],), stacked=False, linear=False))
        else:
            sites.append(Site(path, tuple(e.hf_key[: -len(".weight")] for e in group),
                              stacked=group[0].index is not None))
    return sites


@dataclasses.dataclass
class Adapter:
    """One site's adapter in our layout: A `[(layers,) *in, rank]`, B `[(layers,) rank, *out]`."""

    site: Site
    rank: int
    alpha: float
    dropout: float
    a: np.ndarray
    b: np.ndarray


def _layers(site: Site, x: np.ndarray) -> list[np.ndarray]:
    return list(x) if site.stacked else [x]


def write_adapter(path: str | os.PathLike, adapters: list[Adapter], *,
                  base_model_name_or_path: str | None = None) -> "storage.AnyPath":
    """The PEFT directory of `adapters` (see the module docstring)."""
    ranks = [a.rank for a in adapters]
    rank, alpha = max(set(ranks), key=ranks.count), adapters[0].alpha
    tensors, linear_modules, parameters, rank_pattern, alpha_pattern = [], [], [], {}, {}
    for ad in adapters:
        for module, a, b in zip(ad.site.hf_modules, _layers(ad.site, ad.a), _layers(ad.site, ad.b)):
            if ad.site.linear:
                linear_modules.append(module)
                lora_a, lora_b = a.reshape(-1, ad.rank).T, b.reshape(ad.rank, -1).T
            else:
                parameters.append(module + ".mm_input_projection_weight")
                lora_a, lora_b = b, a
            for suffix, arr in (("lora_A", lora_a), ("lora_B", lora_b)):
                arr = np.ascontiguousarray(arr)
                tensors.append((f"{PREFIX}{module}.{suffix}.weight", arr.shape, arr.dtype, lambda arr=arr: arr))
            if ad.rank != rank:
                rank_pattern[module] = ad.rank
            if ad.alpha != alpha:
                alpha_pattern[module] = ad.alpha
    config = {
        "peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": alpha,
        "lora_dropout": max(a.dropout for a in adapters), "bias": "none",
        "target_modules": linear_modules, "target_parameters": parameters or None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "base_model_name_or_path": base_model_name_or_path,
        "auto_mapping": {"base_model_class": "T5Gemma2ForConditionalGeneration",
                         "parent_library": "transformers.models.t5gemma2.modeling_t5gemma2"},
    }
    path = storage.as_path(path)
    if storage.is_local(path):
        path.mkdir(parents=True, exist_ok=True)
    # adapter_config.json is the directory's commit marker: removed first, written last, so an
    # overwrite cut off in between leaves no directory that reads as a whole adapter.
    storage.remove(path / CONFIG)
    write_safetensors(path / WEIGHTS, tensors)
    storage.write_text(path / CONFIG, json.dumps(config, indent=2))
    return path


def read_peft_config(path: str | os.PathLike) -> dict:
    file = storage.as_path(path) / CONFIG
    if not file.is_file():
        raise CheckpointError(f"{path}: not a PEFT adapter directory (no {CONFIG})")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: peft_type {config.get('peft_type') if isinstance(config, dict) else None!r} "
                              "is not LORA")
    unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if config.get("modules_to_save"):
        unsupported.append("modules_to_save")
    if unsupported:
        raise CheckpointError(f"{file}: LoRA options this implementation does not apply: {unsupported}")
    return config


def read_adapter(path: str | os.PathLike, sites: list[Site], kernel_shapes: dict[tuple, tuple]) -> list[Adapter]:
    """The adapters of a PEFT directory for a model with these `sites` (kernel shapes by site
    path, a stacked layer axis included). Raises CheckpointError naming every module this model
    does not have and every adapter whose shape does not fit its kernel: a directory for another
    architecture."""
    config = read_peft_config(path)
    file = SafetensorsFile(storage.as_path(path) / WEIGHTS)
    pairs: dict[str, dict[str, str]] = defaultdict(dict)
    triage = KeyTriage()
    for key in file.keys():
        m = _KEY.match(key)
        if m is None:
            triage.add(UNKNOWN, key)
        else:
            pairs[m.group(1)][m.group(2)] = key
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            triage.add("missing tensors", f"{module}: lora_{'B' if 'A' in ab else 'A'}")
    by_module = {m: site for site in sites for m in site.hf_modules}
    chosen: dict[tuple, Site] = {}
    for module in pairs:
        if module in by_module:
            chosen[by_module[module].path] = by_module[module]
        else:
            triage.add(UNKNOWN, f"{module} (this model has no such module)")
    for site in chosen.values():
        missing = [m for m in site.hf_modules if m not in pairs]
        if missing:
            triage.add("missing tensors", f"{site.name} is one stacked kernel for {len(site.hf_modules)} layers, "
                                          f"but the adapter has none for {missing[:3]} (load it into a model built "
                                          "with scan_layers=False)")
    triage.raise_if_any(f"{path}: does not fit this model")

    alpha, dropout = float(config.get("lora_alpha", 8)), float(config.get("lora_dropout", 0.0) or 0.0)
    alpha_pattern, rank_pattern = config.get("alpha_pattern") or {}, config.get("rank_pattern") or {}
    out = []
    for site in chosen.values():
        shape = tuple(kernel_shapes[site.path])
        lead, k = (1 if site.stacked else 0), site.in_dims
        first = site.hf_modules[0]
        rank = int(rank_pattern.get(first, file.shape(pairs[first]["A"])[0]))
        want_a, want_b = shape[lead:lead + k] + (rank,), (rank,) + shape[lead + k:]
        layers_a, layers_b = [], []
        for module in site.hf_modules:
            raw_a, raw_b = file.get(pairs[module]["A"]), file.get(pairs[module]["B"])
            # [in, r] and [r, out]; the projector's weight is a bare [in, out] parameter (see above).
            a, b = (raw_a.T, raw_b.T) if site.linear else (raw_b, raw_a)
            if (a.shape[-1], b.shape[0]) != (rank, rank) or a.size != np.prod(want_a) or b.size != np.prod(want_b):
                triage.add(MISMATCHED, f"{module}: lora_A {tuple(raw_a.shape)}, lora_B {tuple(raw_b.shape)}, "
                                       f"the model's kernel {shape[lead:]} needs A {want_a} and B {want_b}")
                continue
            layers_a.append(a.reshape(want_a))
            layers_b.append(b.reshape(want_b))
        if len(layers_a) == len(site.hf_modules):
            out.append(Adapter(site, rank, float(alpha_pattern.get(first, alpha)), dropout,
                               np.stack(layers_a) if site.stacked else layers_a[0],
                               np.stack(layers_b) if site.stacked else layers_b[0]))
    triage.raise_if_any(f"{path}: adapter shapes do not match this model")
    return out
