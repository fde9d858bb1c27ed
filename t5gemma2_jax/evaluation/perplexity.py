"""Teacher-forced loss and perplexity of an evaluation file: the eval split exactly as training
evaluates it (packed rows, the training loss, token-weighted), overall and per UL2 task."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax

from t5gemma2_jax.data.config import DataConfig
from t5gemma2_jax.data.pipeline import make_pipeline
from t5gemma2_jax.data.tokenizer import Tokenizer
from t5gemma2_jax.evaluation.placement import compiled
from t5gemma2_jax.losses import batch_loss_sums
from t5gemma2_jax.parallel import global_batch


def _sums(model, batch):
    _, (ce, count) = batch_loss_sums(model, batch)
    return ce, count


def loss_over(placed, mesh, rules, cfg: DataConfig, tok: Tokenizer, *, max_batches: int | None = None,
              progress: Callable[[int], None] | None = None) -> dict:
    """{loss, perplexity, tokens, batches, records_seen, skipped} over the eval split of `cfg`."""
    graphdef, state = placed
    fn = compiled(graphdef, _sums, mesh, rules)
    total, tokens, n = 0.0, 0.0, 0
    with make_pipeline(cfg, "eval", tokenizer=tok) as batches:
        pending = []
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            pending.append(fn(state, global_batch(batch, mesh)))
            n += 1
            if progress:
                progress(1)
        for ce, count in jax.device_get(pending):
            total, tokens = total + float(ce), tokens + float(count)
        stats = batches.stats()
    loss = total / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"), "tokens": tokens,
            "batches": n, "records_seen": stats.get("records_seen", 0),
            "skipped": {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith("skipped/") and v}}


def task_groups(cfg: DataConfig) -> dict[str, DataConfig]:
    """One data config per UL2 paradigm (R, X, S: its denoisers, their weights kept), for the
    per-task figures; SFT and a single-paradigm mixture have none."""
    if cfg.kind != "pretrain":
        return {}
    groups: dict[str, list] = {}
    for d in cfg.ul2_denoisers:
        if d.weight > 0:
            groups.setdefault(d.name[0], []).append(d)
    if len(groups) < 2:
        return {}
    return {name: dataclasses.replace(cfg, ul2_denoisers=tuple(specs)) for name, specs in groups.items()}


def perplexity(placed, mesh, rules, cfg: DataConfig, tok: Tokenizer, *, max_batches: int | None = None,
               progress=None) -> dict:
    """The eval split's loss and perplexity (as `train.eval_every` reports them), plus `per_task`
    when the file is pretraining text under several UL2 paradigms (each paradigm over every
    document)."""
    out = loss_over(placed, mesh, rules, cfg, tok, max_batches=max_batches, progress=progress)
    groups = task_groups(cfg)
    if groups:
        out["per_task"] = {name: {k: v for k, v in loss_over(placed, mesh, rules, c, tok, max_batches=max_batches,
                                                             progress=progress).items()
                                  if k in ("loss", "perplexity", "tokens")}
                           for name, c in groups.items()}
    return out
