"""T5Gemma 2 in JAX / Flax NNX.

The layers of the package, and which way imports go, are described in docs/architecture.md.
"""

from t5gemma2_jax.adapters import apply_lora, load_peft, merge_lora, quantize_base, save_peft
from t5gemma2_jax.checkpoints import CheckpointError, adapt_gemma3, load_export, load_hf, save_export, save_hf
from t5gemma2_jax.config import ConfigError, PRESETS, T5Gemma2Config, TextConfig, VisionConfig, preset
from t5gemma2_jax.generation import generate, score
from t5gemma2_jax.loading import find_source, load, load_tokenizer_for
from t5gemma2_jax.model import ModelOutput, T5Gemma2, count_params

__all__ = [
    "adapt_gemma3", "apply_lora", "load_peft", "merge_lora", "quantize_base", "save_peft", "CheckpointError",
    "ConfigError", "ModelOutput", "PRESETS", "T5Gemma2", "T5Gemma2Config",
    "TextConfig", "VisionConfig", "count_params", "find_source", "generate", "load", "load_tokenizer_for", "load_export", "load_hf", "preset", "save_export",
    "save_hf", "score",
]
