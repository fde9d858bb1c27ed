"""Cached generation (greedy, sampling, beam search) and scoring."""

from t5gemma2_jax.generation.generate import generate
from t5gemma2_jax.generation.scoring import score, score_candidates
from t5gemma2_jax.generation.stream import generate_stream
from t5gemma2_jax.generation.texts import generate_texts

__all__ = ["generate", "generate_stream", "generate_texts", "score", "score_candidates"]
