"""`evaluate(checkpoint, data)`: load anything `t5gemma2_jax.load` reads, then on an evaluation file
the teacher-forced loss and perplexity (pretraining text or SFT conversations, per UL2 task when
the text is scored under several), generation metrics (SFT: the last model turn is the reference;
text: the continuation of a prefix; image-question records: against their `answers`, with the
benchmarks' metrics chosen by `EvalOptions.metrics`), multiple-choice accuracy and the string match
of long-context task records (`evaluation.ruler`); results as one JSON object, predictions one JSON
line per example."""

from __future__ import annotations

import dataclasses
import json
import math
import os

from tqdm import tqdm

from t5gemma2_jax import storage
from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.data.config import DataConfig
from t5gemma2_jax.data.pipeline import check_data_files
from t5gemma2_jax.data.sources import open_source
from t5gemma2_jax.evaluation.choices import choice_eval, read_choice_records
from t5gemma2_jax.evaluation.examples import Skipped, iter_indexed_examples, record_answers, record_kind
from t5gemma2_jax.evaluation.generation import generation_eval
from t5gemma2_jax.evaluation.metrics import METRICS, TEXT_METRICS, check_available
from t5gemma2_jax.evaluation.perplexity import perplexity
from t5gemma2_jax.evaluation.placement import default_mesh, place
from t5gemma2_jax.evaluation.ruler import read_records
from t5gemma2_jax.evaluation.ruler_score import predict, table
from t5gemma2_jax.loading import find_source, load, load_tokenizer_for, run_config
from t5gemma2_jax.parallel import check_batch
from t5gemma2_jax.storage import AnyPath


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    generate: bool = False          # also generation metrics (SFT data, or pretraining text's prefixes)
    max_examples: int | None = None  # at most this many examples generated for / choice records
    max_batches: int | None = None   # at most this many loss batches
    batch_size: int | None = None    # default: the training run's data.batch_size
    encoder_length: int | None = None
    decoder_length: int | None = None
    max_new_tokens: int | None = None   # default: the decoder length
    method: str = "greedy"
    num_beams: int = 4
    stop: tuple[str, ...] = ()
    chat: bool = False              # choice prompts in the chat template
    mode: str | None = None         # choice prompts after a UL2 mode token
    progress: bool = True
    metrics: tuple[str, ...] = TEXT_METRICS   # generation metrics, names in `metrics.METRICS`

    def __post_init__(self):
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ConfigError(f"--metrics: unknown {unknown or 'empty list'}; known: {','.join(METRICS)}")
        check_available(self.metrics)


def evaluate(checkpoint: str | os.PathLike, data: str, *, tokenizer: str | None = None, dtype: str | None = None,
             options: EvalOptions = EvalOptions(), out: str | os.PathLike | None = None,
             predictions: str | os.PathLike | None = None, attention_backend: str | None = None) -> dict:
    """The results (see the module docstring); written to `out` and `predictions` when given."""
    check_data_files(DataConfig(eval=data))
    src = find_source(checkpoint)
    model = load(src, dtype=dtype, attention_backend=attention_backend)
    tok = load_tokenizer_for(src, model.config, tokenizer)
    run = run_config(src)
    kind = record_kind(data)
    cfg = _data_config(run.data if run is not None else DataConfig(), model.config, data, kind, options, tok)
    mesh, rules = default_mesh()
    if kind not in ("choice", "ruler"):         # loss batches are split over the devices like training's
        check_batch(cfg.batch_size, mesh, name="--batch-size")
    placed = place(model, mesh, rules)
    results: dict = {"checkpoint": str(checkpoint), "source": src.kind, "step": src.step, "data": data, "kind": kind}
    rows: list[dict] = []
    skipped = Skipped()
    with _bar(options.progress, "evaluate") as bar:
        if kind == "choice":
            records = read_choice_records(data, skipped)[:options.max_examples]
            metrics, rows = choice_eval(placed, mesh, rules, tok, records, chat=options.chat, mode=options.mode,
                                        progress=bar.update)
            results.update(metrics)
        elif kind == "ruler":
            rows = predict(model, tok, read_records(data)[:options.max_examples], batch_size=cfg.batch_size,
                           max_new_tokens=options.max_new_tokens, progress=bar.update)
            results.update({"string_match": sum(r["score"] for r in rows) / len(rows), "examples": len(rows),
                            "table": table(rows)})
        else:
            loss = perplexity(placed, mesh, rules, cfg, tok, max_batches=options.max_batches, progress=bar.update)
            if not loss["tokens"]:
                raise ConfigError(f"--data {data}: no usable example ({loss['records_seen']} records, skipped: "
                                  f"{loss['skipped'] or 'none'})")
            results.update(loss)
            if options.generate:
                examples, answers = [], []
                source = open_source(data, cfg.image_root)
                for i, ex in iter_indexed_examples(cfg, tok, data, skipped):
                    try:
                        answers.append(record_answers(source, i) if kind == "sft" else None)
                    except ValueError as e:
                        skipped.add("bad_answers", f"{data} record {i + 1} ({e})")
                        continue
                    examples.append(ex)
                    if options.max_examples is not None and len(examples) >= options.max_examples:
                        break
                if not examples:
                    raise ConfigError(f"--data {data}: no example to generate for (skipped: {skipped.counts or 'none'})")
                metrics, rows = generation_eval(
                    model, tok, examples, max_images=cfg.max_images_per_row if model.config.with_vision else 0,
                    image_size=cfg.image_size, batch_size=cfg.batch_size, progress=bar.update,
                    max_new_tokens=options.max_new_tokens or cfg.decoder_length, method=options.method,
                    num_beams=options.num_beams, stop=options.stop, metrics=options.metrics,
                    answers=answers if any(a is not None for a in answers) else None)
                results.update(metrics)
    if skipped.total:
        results["generation_skipped" if kind != "choice" else "skipped"] = skipped.counts
        results["skipped_places"] = skipped.places
    results["config"] = {"data": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "ul2_denoisers"},
                         "options": dataclasses.asdict(options), "tokenizer": str(tok.path),
                         "model": {k: getattr(model.config, k) for k in ("dtype", "attention_backend")}}
    if predictions is not None and rows:
        _write_lines(storage.as_path(predictions), rows)
        results["predictions"] = str(predictions)
    if out is not None:
        _write_json(storage.as_path(out), results)
    return results


def _data_config(base: DataConfig, model_config, data: str, kind: str, o: EvalOptions, tok) -> DataConfig:
    images = base.max_images_per_row if model_config.with_vision else 0
    return dataclasses.replace(
        base, eval=data, kind="sft" if kind == "sft" else "pretrain", tokenizer=str(tok.path),
        batch_size=o.batch_size or base.batch_size, encoder_length=o.encoder_length or base.encoder_length,
        decoder_length=o.decoder_length or base.decoder_length, max_images_per_row=images, num_workers=0,
        max_bad_fraction=1.0)


def _bar(enabled: bool, desc: str):
    return tqdm(desc=desc, unit=" batches/examples", dynamic_ncols=True, disable=not enabled)


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _write_json(path: AnyPath, obj: dict) -> None:
    storage.write_text(path, json.dumps(_finite(obj), indent=1) + "\n", parents=True)


def _write_lines(path: AnyPath, rows: list[dict]) -> None:
    storage.write_text(path, "".join(json.dumps(row) + "\n" for row in rows), parents=True)
