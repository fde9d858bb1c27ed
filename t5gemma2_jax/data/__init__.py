"""Grain data pipelines for T5Gemma 2: tokenizer, UL2 pretraining mixture, SFT, packing, images.

    from t5gemma2_jax.data import DataConfig, make_pipeline
    pipe = make_pipeline(DataConfig(train="train.jsonl"), "train", jax.process_index(),
                         jax.process_count())
    batch = next(pipe)          # dict of numpy arrays, keys: batch_keys(cfg)
    state = pipe.get_state()    # JSON-serialisable, save with the checkpoint
    pipe.stats()                # {"records_seen": ..., "skipped/malformed_json": ..., ...}
"""

from t5gemma2_jax.data.config import (DEFAULT_DENOISERS_SPEC, DataConfig, DataConfigError,
                                      DenoiserSpec, parse_denoisers)
from t5gemma2_jax.data.counters import COUNTER_NAMES, SKIP_REASONS
from t5gemma2_jax.data.demo import demo_paths, write_demo_dataset
from t5gemma2_jax.data.packing import BATCH_KEYS, IMAGE_KEYS, build_row
from t5gemma2_jax.data.pipeline import (DataPipeline, DataQualityError, batch_keys,
                                        build_dataset, check_data_files, check_model_compatible,
                                        load_tokenizer,
                                        make_pipeline)
from t5gemma2_jax.data.sources import open_source, write_array_record
from t5gemma2_jax.data.tiny_tokenizer import tiny_tokenizer_path, train_tokenizer
from t5gemma2_jax.data.tokenizer import SpecialIds, Tokenizer

__all__ = [
    "BATCH_KEYS", "COUNTER_NAMES", "DEFAULT_DENOISERS_SPEC", "DataConfig", "DataConfigError",
    "DataPipeline", "DataQualityError", "DenoiserSpec", "IMAGE_KEYS", "SKIP_REASONS",
    "SpecialIds", "Tokenizer", "batch_keys", "build_dataset", "build_row", "check_data_files",
    "check_model_compatible", "demo_paths",
    "load_tokenizer", "make_pipeline", "open_source", "parse_denoisers", "tiny_tokenizer_path",
    "train_tokenizer", "write_array_record", "write_demo_dataset",
]
