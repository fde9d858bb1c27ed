"""Every on-disk format of the project, and nothing else.

- `hf`: Hugging Face T5Gemma 2 directories (`load_hf`, `save_hf`), with the key mappings of the
  text towers (`hf_text`), the vision tower (`hf_vision`) and `config.json` (`hf_config`);
- `gemma3`: a Hugging Face Gemma 3 checkpoint adapted into both towers (`adapt_gemma3`);
- `peft`: PEFT LoRA adapter directories and the Hugging Face names of our adaptable kernels
  (`t5gemma2_jax.adapters.save_peft` / `load_peft` apply them to a model);
- `export`: the params export, model config + Orbax arrays (`save_export`, `load_export`), which
  training writes at the end of a run and `train.init_from` and generation read;
- `safetensors_io`, `staging`, `triage`: the safetensors reader/writer, host staging of tensors on
  their way to the devices, and the error listing what a checkpoint lacks or has too much of.

The training run's own checkpoints (state, data iterators, metadata) are the trainer's
(`t5gemma2_jax.train.checkpoint`).
"""

from t5gemma2_jax.checkpoints.export import flat_params, load_export, save_export
from t5gemma2_jax.checkpoints.gemma3 import adapt_gemma3
from t5gemma2_jax.checkpoints.hf import load_hf, save_hf
from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError

__all__ = ["CheckpointError", "adapt_gemma3", "flat_params", "load_export", "load_hf", "save_export", "save_hf"]
