"""`make_pipeline`: DataConfig -> an iterator of packed numpy batches, checkpointable.

Training (per host, per task):
    records[host::hosts] -> shuffle -> repeat -> parse (tokenize, decode images)
        -> task (UL2 denoiser / SFT turns) -> pack
  then the packed rows of the UL2 tasks are mixed by weight (so the mixture rates hold for
  rows, whatever the tasks' packing densities), batched, and optionally computed in
  `data.num_workers` Grain worker processes.
Evaluation: one pass in file order, every record once (each document draws its denoiser from
a seed of its index), the last batch padded with empty rows to the full batch size.

The returned `DataPipeline` iterates dicts of numpy arrays (keys in `batch_keys(cfg)`), and has
`get_state()` / `set_state()` (JSON-serialisable: Grain's iterator state plus the data-quality
counters) and `stats()` (counters, keys `skipped/<reason>` etc.). When the share of skipped
records exceeds data.max_bad_fraction it raises `DataQualityError`.

Workers (data.num_workers > 0) need a `if __name__ == "__main__":` guard in the main script;
the pipeline marks absl flags as parsed if nobody did (Grain reads absl flags in workers).
Changing num_workers changes the batch order (still deterministic), so resume with the same
value.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from t5gemma2_jax import storage
from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.data import counters, packing
from t5gemma2_jax.data.config import DataConfig
from t5gemma2_jax.data.packing import (BATCH_KEYS, COUNTS_KEY, IMAGE_KEYS, PackIterDataset,
                                       stack_rows)
from t5gemma2_jax.data.records import ParseRecord
from t5gemma2_jax.data.sft import ChatTemplate
from t5gemma2_jax.data.sources import ARRAY_RECORD_SUFFIXES, JSONL_SUFFIXES, expand_paths, open_source
from t5gemma2_jax.data.tasks import PretrainExamples, SftExamples
from t5gemma2_jax.data.tokenizer import Tokenizer
from t5gemma2_jax.data.ul2 import Denoiser

STATE_VERSION = 1
READ_THREADS = 1  # per task and process: parse/decode one record ahead, bounded memory
READ_BUFFER = 8


class DataQualityError(RuntimeError):
    """Too many records were skipped (data.max_bad_fraction)."""


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    if cfg.tokenizer:
        path = cfg.tokenizer
    else:
        from t5gemma2_jax.data.tiny_tokenizer import tiny_tokenizer_path

        path = tiny_tokenizer_path()
    try:
        return Tokenizer(path, overrides=dict(cfg.tokenizer_overrides), num_sentinels=cfg.num_sentinels)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except (ConfigError, storage.StorageError):
        raise
    except (OSError, RuntimeError, IndexError, ValueError) as e:  # sentencepiece's errors on a bad file
        raise ConfigError(f"data.tokenizer: {path!r} is not a usable SentencePiece model for this "
                          f"project ({type(e).__name__}: {e})") from None


def batch_keys(cfg: DataConfig) -> tuple[str, ...]:
    return BATCH_KEYS + (IMAGE_KEYS if cfg.images_enabled else ())


def batch_shapes(cfg: DataConfig, rows: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each array of this config's batches (`rows` default: the global batch)."""
    return packing.batch_shapes(cfg.batch_size if rows is None else rows, encoder_length=cfg.encoder_length,
                                decoder_length=cfg.decoder_length, max_images=cfg.max_images_per_row,
                                image_size=cfg.image_size)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class PadBatch(grain.transforms.Map):
    """Pads a short last batch with empty rows (evaluation keeps a static batch shape)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = next(iter(batch.values())).shape[0]
        if n == self.batch_size:
            return batch
        return {k: np.concatenate([v, np.zeros((self.batch_size - n, *v.shape[1:]), v.dtype)])
                for k, v in batch.items()}


def split_path(cfg: DataConfig, split: str) -> str:
    """The files of `split` ("train" / "eval"): the configured ones, else the demo dataset's."""
    if split == "train":
        if cfg.train:
            return cfg.train
    elif split == "eval":
        if cfg.eval:
            return cfg.eval
        if cfg.train:
            raise ValueError("data.eval is not set (data.train is): no evaluation data")
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    from t5gemma2_jax.data.demo import demo_paths

    train, eval_ = demo_paths(cfg.kind)
    return train if split == "train" else eval_


def build_dataset(cfg: DataConfig, split: str = "train", process_index: int = 0,
                  process_count: int = 1, *, records: Sequence[Any] | None = None,
                  tokenizer: Tokenizer | None = None) -> grain.IterDataset:
    """The Grain dataset behind `make_pipeline` (batches still carry `_counts`)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    tok = tokenizer or load_tokenizer(cfg)
    source = open_source(records if records is not None else split_path(cfg, split),
                         cfg.image_root)
    train = split == "train"
    if len(source) == 0:
        raise ValueError(f"no records in the {split} data: {source!r}")
    if len(source) < process_count:
        raise ValueError(f"{source!r} has fewer records than processes ({process_count})")
    parser = ParseRecord(kind=cfg.kind, tokenizer=tok, names=source.names,
                         base_dirs=source.base_dirs, image_size=cfg.image_size,
                         mm_tokens_per_image=cfg.mm_tokens_per_image,
                         max_images=cfg.max_images_per_row, unknown_fields=cfg.unknown_fields,
                         process_index=process_index, process_count=process_count)
    read = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_BUFFER)

    def parsed(salt: int) -> grain.IterDataset:
        ds = grain.MapDataset.source(source)[process_index::process_count]
        if train:
            if cfg.shuffle:
                ds = ds.shuffle(seed=_seed(cfg.seed, salt))
            ds = ds.repeat(None)
        return ds.map_with_index(parser).to_iter_dataset(read)

    pack_kw = dict(encoder_length=cfg.encoder_length, decoder_length=cfg.decoder_length,
                   max_images=cfg.max_images_per_row, image_size=cfg.image_size,
                   bos=tok.special.bos, num_bins=cfg.packing_bins if cfg.packing else 1,
                   max_examples_per_row=None if cfg.packing else 1)
    FlatMap = grain.experimental.FlatMapIterDataset

    if cfg.kind == "sft":
        sft = SftExamples(ChatTemplate(tok), encoder_length=cfg.encoder_length,
                          decoder_length=cfg.decoder_length, max_images=cfg.max_images_per_row,
                          turns=cfg.sft_turns, truncation=cfg.sft_truncation,
                          image_size=cfg.image_size)
        rows = PackIterDataset(FlatMap(parsed(1), sft), **pack_kw)
    else:
        block = tok.image_block(cfg.mm_tokens_per_image)
        specs = [d for d in cfg.ul2_denoisers if d.weight > 0]
        denoisers = [Denoiser(d, tok.special, encoder_length=cfg.encoder_length,
                              decoder_length=cfg.decoder_length, image_block=block,
                              mode_tokens=cfg.ul2_mode_tokens) for d in specs]
        weights = [d.weight for d in specs]
        if train:  # per-task packing, then mixing of rows
            per_task = {}
            for t, d in enumerate(specs):
                task = PretrainExamples(denoisers, weights, seed=cfg.seed, task_index=t,
                                        long_documents=cfg.long_documents,
                                        images_prefix_only=cfg.image_denoisers == "prefix")
                per_task[d.name] = PackIterDataset(FlatMap(parsed(100 + t), task), **pack_kw)
            rows = (next(iter(per_task.values())) if len(per_task) == 1 else
                    grain.IterDataset.mix(per_task, {d.name: d.weight for d in specs}))
        else:
            task = PretrainExamples(denoisers, weights, seed=cfg.seed, task_index=None,
                                    long_documents=cfg.long_documents,
                                    images_prefix_only=cfg.image_denoisers == "prefix")
            rows = PackIterDataset(FlatMap(parsed(1), task), **pack_kw)

    batch_size = cfg.per_host_batch_size(process_count)
    ds = rows.batch(batch_size, drop_remainder=train, batch_fn=stack_rows)
    if not train:
        ds = ds.map(PadBatch(batch_size))
    if cfg.num_workers > 0:
        _mark_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size))
    return ds


def _mark_absl_flags_parsed() -> None:
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class DataPipeline(Iterator[dict[str, np.ndarray]]):
    """Batches, checkpointable state and data-quality counters (see the module docstring)."""

    def __init__(self, dataset: grain.IterDataset, cfg: DataConfig, tokenizer: Tokenizer,
                 split: str, process_count: int = 1):
        self.cfg = cfg
        self._batch_size = cfg.per_host_batch_size(process_count)
        self.tokenizer = tokenizer
        self.split = split
        self.dataset = dataset
        self._it = iter(dataset)
        self._totals = counters.zeros()

    def __iter__(self) -> "DataPipeline":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._it))
        self._totals += np.asarray(batch.pop(COUNTS_KEY)).sum(axis=0)
        self._check_quality()
        return batch

    def stats(self) -> dict[str, int]:
        """Counters over everything consumed so far: `records_seen`, `examples`,
        `documents_split`, `sft_turns_dropped`, `images_dropped`, `skipped/<reason>`."""
        return counters.as_dict(self._totals)

    def skip_summary(self) -> str:
        """One line for the end of a run, e.g. `skipped 3 of 120 records: malformed_json 2
        (first at train.jsonl:7), corrupt_image 1 (first at train.jsonl:12)`.

        The log names at most a few skips per reason, early on; this says what the whole run
        dropped, with one place per reason to start looking. Counts are `stats()` (restored
        ones included); a first place is known only for skips made in this process since it
        started, so it is missing after a restart for reasons not met again, and with
        data.num_workers > 0, where the workers parse (their log has the places)."""
        stats = self.stats()
        files = self._own_files()
        by_count = sorted(counters.SKIP_REASONS, key=lambda r: -stats[f"skipped/{r}"])
        parts = []
        for reason in by_count:
            n = stats[f"skipped/{reason}"]
            if n:
                first = counters.first_skip_origin(reason, files)
                parts.append(f"{reason} {n}" + (f" (first at {first})" if first else ""))
        head = (f"skipped {counters.total_skipped(self._totals)} of {stats['records_seen']} "
                "records")
        return f"{head}: {', '.join(parts)}" if parts else head

    def _own_files(self) -> set[str] | None:
        """The configured files of this split, so that the summary of a train pipeline does not
        point at the eval file the same process also read; None (any file) for the demo data or
        in-memory records, which have no configured path."""
        spec = self.cfg.train if self.split == "train" else self.cfg.eval
        if not spec:
            return None
        try:
            return set(expand_paths(spec))
        except FileNotFoundError:
            return None

    def empty_batch(self) -> dict[str, np.ndarray]:
        """An all-padding batch of this pipeline's shapes (zero loss weight): lets hosts whose
        finite eval shard ran out keep stepping in lockstep with the others."""
        shapes = batch_shapes(self.cfg, self._batch_size)
        return {k: np.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable; save it with the training checkpoint (e.g. orbax JsonSave)."""
        return {"version": STATE_VERSION, "split": self.split,
                "iterator": self._it.get_state(), "counters": self.stats()}

    def set_state(self, state: dict[str, Any] | str | bytes) -> None:
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data pipeline state version {state.get('version')} is not "
                             f"{STATE_VERSION}")
        self._it.set_state(state["iterator"])
        self._totals = counters.from_dict(state.get("counters", {}))

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "DataPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_quality(self) -> None:
        seen = int(self._totals[counters.counter_index("records_seen")])
        bad = counters.total_skipped(self._totals)
        cfg = self.cfg
        if seen < max(cfg.bad_fraction_min_records, 1) or bad <= cfg.max_bad_fraction * seen:
            return
        reasons = ", ".join(f"{k}={v}" for k, v in self.stats().items()
                            if k.startswith("skipped/") and v)
        raise DataQualityError(
            f"{bad} of {seen} records ({bad / seen:.1%}) were skipped in the {self.split} data, "
            f"more than data.max_bad_fraction={cfg.max_bad_fraction:g} (checked once "
            f"data.bad_fraction_min_records={cfg.bad_fraction_min_records} records were seen). "
            f"By reason: {reasons}. The first skips of each reason are logged with file and "
            "line. Fix the data, or raise data.max_bad_fraction (or set "
            "data.unknown_fields=ignore if the records only carry extra fields).")


def check_data_files(cfg: DataConfig) -> None:
    """Raises ConfigError naming the field when a configured data file is missing, unreadable or of
    an unknown kind, before any pipeline is built."""
    for field in ("train", "eval"):
        spec = getattr(cfg, field)
        if not spec:
            continue
        try:
            paths = expand_paths(spec)
        except FileNotFoundError as e:
            raise ConfigError(f"data.{field}: {e}") from None
        for path in paths:
            if not path.endswith(JSONL_SUFFIXES + ARRAY_RECORD_SUFFIXES):
                raise ConfigError(f"data.{field}: {path!r} is neither JSONL {JSONL_SUFFIXES} nor "
                                  f"ArrayRecord {ARRAY_RECORD_SUFFIXES}")
            try:
                storage.read_range(path, 0, 1)
            except storage.StorageError:
                raise
            except OSError as e:
                raise ConfigError(f"data.{field}: cannot read {path!r}: {e.strerror or e}") from None


def check_model_compatible(tokenizer: Tokenizer, model_config: Any, cfg: DataConfig) -> None:
    """Raises ConfigError when the tokenizer or data shapes disagree with a model config (a
    `t5gemma2_jax.config.T5Gemma2Config`, read by attribute name: the data layer does not import it)."""
    s = tokenizer.special
    problems = []
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and tokenizer.vocab_size > vocab:
        problems.append(f"data.tokenizer: {tokenizer.vocab_size} pieces > model vocab_size {vocab}")
    roles = [("pad", "pad_token_id"), ("eos", "eos_token_id"), ("bos", "bos_token_id")]
    if cfg.images_enabled:
        roles += [("boi", "boi_token_id"), ("eoi", "eoi_token_id"), ("image", "image_token_id")]
    for role, attr in roles:
        want = getattr(model_config, attr, None)
        if want is not None and getattr(s, role) != want:
            problems.append(f"data.tokenizer: {role} id {getattr(s, role)} != model {attr} {want} "
                            f"(data.tokenizer_overrides='{role}={want}' if the file lacks it)")
    if cfg.images_enabled:
        if getattr(model_config, "mm_tokens_per_image", cfg.mm_tokens_per_image) != cfg.mm_tokens_per_image:
            problems.append(f"data.mm_tokens_per_image: {cfg.mm_tokens_per_image} != model "
                            f"{model_config.mm_tokens_per_image}")
        vision = getattr(model_config, "vision", None)
        if vision is not None and vision.image_size != cfg.image_size:
            problems.append(f"data.image_size: {cfg.image_size} != model {vision.image_size}")
    if problems:
        raise ConfigError("; ".join(problems))


def make_pipeline(cfg: DataConfig, split: str = "train", process_index: int = 0,
                  process_count: int = 1, *, records: Sequence[Any] | None = None,
                  tokenizer: Tokenizer | None = None) -> DataPipeline:
    """The data pipeline for `split` ("train" or "eval") of this host.

    `records` replaces the configured path by an in-memory list of records (dicts or JSON
    strings). `data.train`/`data.eval` unset: the demo dataset of `data.kind`."""
    tok = tokenizer or load_tokenizer(cfg)
    ds = build_dataset(cfg, split, process_index, process_count, records=records, tokenizer=tok)
    return DataPipeline(ds, cfg, tok, split, process_count)
