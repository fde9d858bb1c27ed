"""Generation metrics during training (`train.eval_generate_every`): the first
`train.eval_generate_examples` examples of the eval split (SFT: the last model turn of each
conversation; text: a prefix-LM split), completed greedily by the current parameters and scored
like `scripts/evaluate.py --generate` does."""

from __future__ import annotations

from t5gemma2_jax.config import T5Gemma2Config
from t5gemma2_jax.data.pipeline import load_tokenizer, split_path
from t5gemma2_jax.evaluation.examples import Skipped, iter_examples
from t5gemma2_jax.evaluation.generation import generation_eval
from t5gemma2_jax.experiment import ExperimentConfig

SAMPLES = 3   # predictions logged with the metrics


class HeldOut:
    def __init__(self, cfg: ExperimentConfig, model_config: T5Gemma2Config):
        self.cfg, self.model_config = cfg, model_config
        self._examples = None

    def _load(self):
        d, t = self.cfg.data, self.cfg.train
        self.tok = load_tokenizer(d)
        self.skipped = Skipped()
        examples = []
        for ex in iter_examples(d, self.tok, split_path(d, "eval"), self.skipped):
            examples.append(ex)
            if len(examples) >= t.eval_generate_examples:
                break
        return examples

    def evaluate(self, model) -> tuple[dict, list[dict]]:
        """({eval_exact_match, eval_rouge_l, eval_bleu, eval_chrf, eval_generated}, a few samples)."""
        if self._examples is None:
            self._examples = self._load()
        if not self._examples:
            return {"eval_generated": 0}, []
        d, t = self.cfg.data, self.cfg.train
        metrics, rows = generation_eval(
            model, self.tok, self._examples, max_images=d.max_images_per_row if self.model_config.with_vision else 0,
            image_size=d.image_size, batch_size=min(len(self._examples), d.batch_size),
            max_new_tokens=t.eval_generate_tokens or d.decoder_length)
        out = {f"eval_{k}": v for k, v in metrics.items() if k != "examples"}
        out["eval_generated"] = metrics["examples"]
        return out, rows[:SAMPLES]
