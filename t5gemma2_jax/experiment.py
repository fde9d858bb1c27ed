"""Experiment configuration: frozen dataclasses loaded from YAML plus dotted overrides.

    cfg = load_config("configs/tiny.yaml", ["train.steps=200", "mesh.fsdp=4"])

A config file has six sections, each optional:

    model:  {preset: tiny, dtype: bfloat16, remat: full, encoder: {num_layers: 4}}
    data:   t5gemma2_jax.data.DataConfig fields
    mesh:   MeshConfig fields
    optim:  OptimConfig fields
    train:  TrainConfig fields
    lora:   LoraConfig fields (rank > 0: train low-rank adapters on a frozen base)

`model` names a preset (`t5gemma2_jax.preset`) and overrides any `T5Gemma2Config` field, nested
ones (`encoder`, `decoder`, `vision`) included; changing a tower's `num_layers` without giving its
`layer_types` re-derives Gemma 3's 5-local:1-global pattern. With `train.init_from` the
architecture is the checkpoint's instead (`ExperimentConfig.model_config`): the runtime fields
still come from `model`, fields given there must equal the checkpoint's, and the preset must be its
size. A file may start from another with `base: other.yaml` (relative to it) and state only what
differs. Every key is checked by the config
engine (`t5gemma2_jax.configlib`): an unknown key or a value of the wrong type raises `ConfigError`
naming the key (with a close match if there is one). Overrides are `dotted.key=value` with the
value read as YAML (`train.steps=200`, `optim.learning_rate=1e-4`, `data.train=null`,
`model.encoder.layer_types=[...]`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import yaml

from t5gemma2_jax import configlib
from t5gemma2_jax.config import (PRESETS, RUNTIME_FIELDS, SHAPE_FIELDS, ConfigError, T5Gemma2Config, TextConfig,
                                 default_layer_types, preset, same_value)
from t5gemma2_jax.configlib import require as _require
from t5gemma2_jax.data.config import DataConfig
from t5gemma2_jax.parallel import MeshConfig

if TYPE_CHECKING:
    from t5gemma2_jax.checkpoints.sources import Source

SECTIONS = ("model", "data", "mesh", "optim", "train", "lora")
QUANTIZE_BASE = ("none", "int8", "nf4")
SCHEDULES = ("cosine", "linear", "rsqrt", "constant")
DATA_SOURCES = ("pipeline", "synthetic")
DISTRIBUTED = ("auto", "on", "off")
MU_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then a cosine / linear / rsqrt / constant schedule, and clipping."""

    learning_rate: float = 3e-4
    schedule: str = "cosine"
    warmup_steps: int = 100
    decay_steps: int = 0  # cosine/linear: steps from 0 to the end of decay; 0 = train.steps
    min_lr_ratio: float = 0.1  # cosine/linear: the final learning rate / peak
    rsqrt_timescale: int = 0  # rsqrt: lr * sqrt(timescale / step) after warmup; 0 = warmup_steps
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled, scaled by the schedule (optax.adamw)
    decay_vectors: bool = False  # also decay 1-D parameters (norm scales, eoi embedding)
    clip_norm: float = 1.0  # global gradient norm clip; 0 disables
    mu_dtype: str = "float32"  # first-moment dtype ("bfloat16" halves its memory)

    def __post_init__(self):
        _require(self.learning_rate >= 0, "optim.learning_rate", f"must be >= 0, got {self.learning_rate}")
        _require(self.schedule in SCHEDULES, "optim.schedule", f"{self.schedule!r} not in {SCHEDULES}")
        for name in ("warmup_steps", "decay_steps", "rsqrt_timescale"):
            _require(getattr(self, name) >= 0, f"optim.{name}", f"must be >= 0, got {getattr(self, name)}")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1/b2", "must be in [0, 1)")
        _require(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.clip_norm >= 0, "optim.clip_norm", f"must be >= 0, got {self.clip_norm}")
        _require(self.mu_dtype in MU_DTYPES, "optim.mu_dtype", f"{self.mu_dtype!r} not in {MU_DTYPES}")


WANDB_MODES = ("online", "offline", "disabled")


@dataclass(frozen=True)
class WandbConfig:
    enabled: bool = False
    project: str = "t5gemma2-jax"
    entity: str | None = None
    name: str | None = None      # default: the work directory's name
    group: str | None = None     # e.g. one ablation study
    tags: tuple[str, ...] = ()
    notes: str | None = None
    mode: str = "online"         # "offline": written under WORKDIR/wandb for `wandb sync`
    dir: str | None = None       # default: the work directory

    def __post_init__(self):
        configlib.require_choice(self.mode, "train.wandb.mode", WANDB_MODES)
        configlib.require(bool(self.project), "train.wandb.project", "must be a non-empty string")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    microbatches: int = 1  # gradient accumulation: the global batch is split into this many
    z_loss: float = 0.0  # PaLM z-loss coefficient (0 disables)
    freeze_vision: bool = True  # the SigLIP tower gets no gradients and no optimizer state
    seed: int = 0  # parameter init and the training RNG (data order: data.seed)
    init_from: str | None = None  # an HF checkpoint dir, a params export or a training checkpoint (SFT)
    data_source: str = "pipeline"  # "pipeline" (t5gemma2_jax.data) or "synthetic" (benchmarks)
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic evaluation
    eval_steps: int = 20  # at most this many eval batches per evaluation (the split is one pass)
    eval_at_start: bool | None = None  # evaluate before the first step (None: when init_from is set)
    eval_generate_every: int = 0  # generation metrics on held-out examples every N steps (0: never)
    eval_generate_examples: int = 16  # that many held-out examples (the eval split's first ones)
    eval_generate_tokens: int = 0  # at most this many new tokens each (0: data.decoder_length)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # the last K checkpoints are kept ...
    keep_best: bool = False  # ... plus the one with the lowest eval loss
    async_checkpointing: bool = True
    checkpoint_write_gb: int = 2  # host memory a save may hold in flight at once (Orbax's save_concurrent_gb)
    export_at_end: bool = True  # params-only export to WORKDIR/export (generate / save_hf)
    progress_bar: bool = True
    tensorboard: bool = True
    peak_tflops: float = 0.0  # per device, for MFU; 0: known table (TPU/GPU) or measured (CPU)
    compilation_cache_dir: str | None = None  # JAX persistent compilation cache
    distributed: str = "auto"  # jax.distributed.initialize(): auto-detect, on, off
    max_nonfinite_steps: int = 10  # this many steps in a row with a non-finite loss/gradient stop the run
    allow_data_restart: bool = False  # resume from a checkpoint without data-iterator state (data restarts)
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases logging (train/tracking.py)
    profile_steps: tuple[int, ...] = ()  # [first, last]: jax.profiler trace of those steps into WORKDIR/tensorboard

    def __post_init__(self):
        for name in ("steps", "microbatches", "log_every", "eval_steps", "checkpoint_every",
                     "keep_checkpoints", "max_nonfinite_steps", "checkpoint_write_gb"):
            _require(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "seed", "eval_generate_every", "eval_generate_tokens"):
            _require(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        _require(self.z_loss >= 0, "train.z_loss", f"must be >= 0, got {self.z_loss}")
        _require(self.peak_tflops >= 0, "train.peak_tflops", f"must be >= 0, got {self.peak_tflops}")
        _require(self.data_source in DATA_SOURCES, "train.data_source",
                 f"{self.data_source!r} not in {DATA_SOURCES}")
        _require(self.distributed in DISTRIBUTED, "train.distributed",
                 f"{self.distributed!r} not in {DISTRIBUTED}")
        _require(not (self.keep_best and self.eval_every == 0), "train.keep_best",
                 "needs periodic evaluation (train.eval_every > 0)")
        _require(len(self.profile_steps) in (0, 2) and all(s >= 1 for s in self.profile_steps)
                 and list(self.profile_steps) == sorted(self.profile_steps), "train.profile_steps",
                 f"must be [first, last] with 1 <= first <= last, or [] (no trace), got {list(self.profile_steps)}")
        _require(not self.profile_steps or self.profile_steps[0] <= self.steps, "train.profile_steps",
                 f"{list(self.profile_steps)} starts after the last step (train.steps={self.steps})")
        _require(self.eval_generate_examples >= 1, "train.eval_generate_examples",
                 f"must be >= 1, got {self.eval_generate_examples}")
        _require(not (self.eval_generate_every and self.data_source != "pipeline"), "train.eval_generate_every",
                 "needs held-out examples: train.data_source=pipeline")

    @property
    def evaluates_at_start(self) -> bool:
        return bool(self.init_from) if self.eval_at_start is None else self.eval_at_start


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (`t5gemma2_jax.apply_lora`): with `rank` > 0 only the adapters train (and
    have optimizer state); the whole base is frozen and, with `quantize_base`, stored as int8 or
    nf4 (QLoRA). Checkpoints then hold the adapters and the optimizer state, plus a checksum of the
    base they apply to; the base itself comes from `train.init_from` (or the seed) again on resume."""

    rank: int = 0  # 0: no adapters, the usual training
    alpha: float = 16.0  # the update is scaled by alpha / rank, as in PEFT
    targets: tuple[str, ...] = ()  # HF module names or regular expressions; () = every text projection
    dropout: float = 0.0  # on each adapter's input, training only
    quantize_base: str = "none"  # "int8" / "nf4": the frozen text projections stored quantised
    dtype: str = "float32"  # the adapters' parameter dtype

    def __post_init__(self):
        _require(isinstance(self.rank, int) and self.rank >= 0, "lora.rank", f"must be >= 0, got {self.rank!r}")
        _require(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(self.quantize_base in QUANTIZE_BASE, "lora.quantize_base",
                 f"{self.quantize_base!r} not in {QUANTIZE_BASE}")
        _require(self.rank > 0 or self.quantize_base == "none", "lora.quantize_base",
                 "a quantised base needs adapters to train (set lora.rank > 0)")
        _require(self.dtype in ("float32", "bfloat16"), "lora.dtype", f"{self.dtype!r} not in ('float32', 'bfloat16')")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass(frozen=True)
class ModelSpec:
    """A preset name plus overrides of `T5Gemma2Config` fields (nested dicts for the towers)."""

    preset: str = "tiny"
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> T5Gemma2Config:
        return self._built

    @functools.cached_property
    def _built(self) -> T5Gemma2Config:
        # Built once per spec: validation, `model_config()` and the trainer share it.
        try:
            return _build_model_config(self.preset, dict(self.overrides))
        except ConfigError as e:
            raise ConfigError(f"model: {e}") from None

    def to_dict(self) -> dict:
        return {"preset": self.preset, **configlib.plain(dict(self.overrides))}


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def model_config(self) -> T5Gemma2Config:
        """The model config: the preset with the `model.*` overrides or, with `train.init_from`, the
        checkpoint's own architecture with the config's runtime fields (`_from_checkpoint`);
        `with_vision` follows the data (images on) unless set explicitly. With `train.init_from`
        this reads the checkpoint's config (not its weights) and checks it against the data.
        Resolved once per config object; every later call returns the same config."""
        return self._model_config

    @functools.cached_property
    def _model_config(self) -> T5Gemma2Config:
        cfg = self.model.build()
        if "with_vision" not in self.model.overrides:
            cfg = cfg.replace(with_vision=self.data.images_enabled)
        if self.init_source is None:
            return cfg
        cfg = _from_checkpoint(self.model, cfg, self.init_source)
        _check_model(self, cfg)
        return cfg

    @functools.cached_property
    def init_source(self) -> "Source | None":
        """What `train.init_from` names (`checkpoints.sources.find_source`), opened once per config
        object (its config, not its weights): the model config, `--check` and the trainer's
        starting state all read this one."""
        if self.train.init_from is None:
            return None
        # Imported here so that reading a config file does not load the checkpoint readers.
        from t5gemma2_jax.checkpoints.sources import find_source

        return find_source(self.train.init_from, what="train.init_from")

    def to_dict(self) -> dict:
        """Plain YAML-able dict; `load_config` reads it back to an equal config."""
        out = {"model": self.model.to_dict()}
        for name in ("data", "mesh", "optim", "train", "lora"):
            out[name] = configlib.plain(getattr(self, name))
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------------------------------------
# Loading.


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """YAML file (or defaults when `path` is None) + `key=value` overrides -> ExperimentConfig."""
    raw = configlib.load_yaml(path) if path is not None else {}
    for item in overrides:
        key, value = configlib.parse_override(item)
        configlib.set_dotted(raw, key, value, SECTIONS)
    return from_dict(raw)


def from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    for k in raw:
        if k not in SECTIONS:
            raise configlib.unknown_key(k, SECTIONS)
    sections = {}
    for name in SECTIONS:
        sub = raw.get(name) or {}
        if not isinstance(sub, Mapping):
            raise ConfigError(f"{name}: must be a mapping, got {type(sub).__name__}")
        sections[name] = sub
    cfg = ExperimentConfig(model=_model_spec(sections["model"]),
                           **{name: configlib.build(cls, sections[name], name)
                              for name, cls in (("data", DataConfig), ("mesh", MeshConfig),
                                                ("optim", OptimConfig), ("train", TrainConfig),
                                                ("lora", LoraConfig))})
    _check_cross(cfg)
    return cfg


def _check_cross(cfg: ExperimentConfig) -> None:
    """Consistency between sections that needs no devices (and, with `train.init_from`, no file:
    `model_config()` checks the model against the data once it has read the checkpoint's)."""
    d, t = cfg.data, cfg.train
    _require(d.batch_size % t.microbatches == 0, "train.microbatches",
             f"{t.microbatches} does not divide data.batch_size={d.batch_size}")
    if t.init_from is None:
        _check_model(cfg, cfg.model_config())


def _check_model(cfg: ExperimentConfig, m: T5Gemma2Config) -> None:
    """The model config `m` against the data, train and lora sections."""
    d, t = cfg.data, cfg.train
    if d.images_enabled:
        _require(m.with_vision, "model.with_vision",
                 "is false but the data has images (data.max_images_per_row > 0); set "
                 "data.max_images_per_row=0 for text-only training")
        _require(d.mm_tokens_per_image == m.mm_tokens_per_image, "data.mm_tokens_per_image",
                 f"{d.mm_tokens_per_image} != model mm_tokens_per_image={m.mm_tokens_per_image}")
        _require(d.image_size == m.vision.image_size, "data.image_size",
                 f"{d.image_size} != model vision.image_size={m.vision.image_size}")
    if cfg.mesh.context > 1:
        _require(d.encoder_length % cfg.mesh.context == 0, "data.encoder_length",
                 f"{d.encoder_length} is not divisible by mesh.context={cfg.mesh.context}")
        from t5gemma2_jax.ops.masks import bidirectional_window

        # The halo comes from the neighbouring devices only (`ops/backends/context`).
        chunk, side = d.encoder_length // cfg.mesh.context, max(bidirectional_window(m.encoder.sliding_window))
        _require(chunk >= side, "mesh.context",
                 f"{cfg.mesh.context} leaves {chunk} encoder positions per device, fewer than half the "
                 f"sliding window ({side}): local layers read keys from the neighbouring devices only")
    for name, length, tower in (("encoder_length", d.encoder_length, m.encoder),
                                ("decoder_length", d.decoder_length, m.decoder)):
        _require(length <= tower.max_position_embeddings, f"data.{name}",
                 f"{length} exceeds the model's max_position_embeddings={tower.max_position_embeddings}")
    if cfg.lora.enabled:
        from t5gemma2_jax.adapters import select_sites

        select_sites(m, cfg.lora.targets or None)      # names every target that adapts nothing
        _require(t.freeze_vision, "train.freeze_vision",
                 "false has no effect with adapters (lora.rank > 0 freezes the whole base); adapt the "
                 "SigLIP tower with lora.targets (e.g. [q_proj, out_proj, fc1, fc2]) instead")


def _model_spec(raw: Mapping[str, Any]) -> ModelSpec:
    raw = dict(raw)
    name = raw.pop("preset", "tiny")
    _require(isinstance(name, str) and name in PRESETS, "model.preset", f"{name!r} not in {PRESETS}")
    spec = ModelSpec(preset=name, overrides=configlib.check_overrides(preset(name), raw, "model"))
    spec.build()
    return spec


def _build_model_config(name: str, overrides: dict) -> T5Gemma2Config:
    cfg = preset(name)
    changes = {}
    for key, value in overrides.items():
        if key in ("encoder", "decoder", "vision"):
            sub = getattr(cfg, key)
            value = dict(value)
            if isinstance(sub, TextConfig) and "num_layers" in value and "layer_types" not in value:
                value["layer_types"] = default_layer_types(value["num_layers"])
            changes[key] = dataclasses.replace(sub, **value)
        else:
            changes[key] = value
    return cfg.replace(**changes) if changes else cfg


def _from_checkpoint(spec: ModelSpec, configured: T5Gemma2Config, src: "Source") -> T5Gemma2Config:
    """The architecture of the checkpoint at `path` with the runtime fields (`RUNTIME_FIELDS`:
    dtype, remat, ...) of `configured`. The `model.*` fields given explicitly must be the
    checkpoint's, and the preset must be its size (the batch, mesh and remat of a config are chosen
    for one size); the preset's other values (RoPE, eps, max positions, token ids) are the
    checkpoint's, so a checkpoint adapted with other settings needs no override."""
    path = src.path
    checkpoint = src.model_config()
    given = _given_differences(spec.overrides, checkpoint)
    if given:
        raise ConfigError(f"train.init_from: {path} has another architecture than the model.* fields given "
                          f"(the model is the checkpoint's; drop them or make them match): " + "; ".join(given))
    size = [f"{tower}.{name}: checkpoint {getattr(getattr(checkpoint, tower), name)} != preset "
            f"{getattr(getattr(configured, tower), name)}"
            for tower in ("encoder", "decoder") for name in SHAPE_FIELDS
            if getattr(getattr(checkpoint, tower), name) != getattr(getattr(configured, tower), name)]
    if size:
        raise ConfigError(f"train.init_from: {path} is not of model.preset {spec.preset}'s size (set model.preset "
                          f"or the model.* shape fields to the checkpoint's): " + "; ".join(size[:4]))
    if configured.with_vision and not checkpoint.with_vision:
        raise ConfigError(f"train.init_from: {path} has no vision tower but the model would have one (the data "
                          "has images); set data.max_images_per_row=0 for text-only training")
    return checkpoint.replace(**{name: getattr(configured, name) for name in RUNTIME_FIELDS})


def _given_differences(overrides: Mapping[str, Any], checkpoint: T5Gemma2Config) -> list[str]:
    """'field: checkpoint X != config Y' for each architecture field in `overrides` (the model
    section as given, nested for the towers) that differs from the checkpoint's."""
    theirs = configlib.plain(checkpoint)
    diffs = []
    for key, value in overrides.items():
        if key in RUNTIME_FIELDS:
            continue
        items = dict(value).items() if isinstance(theirs[key], dict) else [(None, value)]
        for sub, v in items:
            name, have = (key, theirs[key]) if sub is None else (f"{key}.{sub}", theirs[key][sub])
            v = configlib.plain(v)
            if not same_value(v, have):
                diffs.append(f"model.{name}: checkpoint {have!r} != config {v!r}")
    return diffs
