"""Multiple-choice scoring: each record `{"prompt", "choices", "answer"}` (answer: the index of the
right choice, or its text) is answered by the choice the model gives the highest log-likelihood
(each choice scored as the whole decoder output, eos included, as `generation.score` does).
Accuracy is reported by total log-likelihood and by log-likelihood per token (length-normalised)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.data.prompts import encode_prompt
from t5gemma2_jax.data.records import BadRecord, decode_record
from t5gemma2_jax.data.sources import Unreadable, open_source
from t5gemma2_jax.data.tokenizer import Tokenizer
from t5gemma2_jax.evaluation.examples import Skipped
from t5gemma2_jax.evaluation.placement import compiled
from t5gemma2_jax.generation import score


def _bucket(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


def parse_choice_record(rec: dict, origin: str, skipped: Skipped) -> tuple[str, list[str], int] | None:
    """(prompt, choices, index of the answer), or None after counting why the record is unusable."""
    prompt, choices, answer = rec.get("prompt"), rec.get("choices"), rec.get("answer")
    if not isinstance(prompt, str) or not prompt.strip():
        skipped.add("empty_prompt", origin)
        return None
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c.strip() for c in choices)):
        skipped.add("bad_choices", origin)
        return None
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        skipped.add("bad_answer", origin)
        return None
    return prompt, choices, answer


def read_choice_records(path: str, skipped: Skipped) -> list[tuple[str, str, list[str], int]]:
    """(origin, prompt, choices, answer) of every usable record of a JSONL / ArrayRecord file."""
    source = open_source(path)
    out = []
    for i in range(len(source)):
        raw = source[i]
        origin = f"{source.names[raw.source]}:{raw.line}"
        if isinstance(raw.payload, Unreadable):
            skipped.add("parse_error", origin)
            continue
        try:
            rec = decode_record(raw.payload)
        except BadRecord as e:
            skipped.add(e.reason, origin)
            continue
        parsed = parse_choice_record(rec, origin, skipped)
        if parsed is not None:
            out.append((origin, *parsed))
    return out


def _choice_logp(model, ids, mask, targets, target_mask):
    per_token = score(model, ids, targets, mask, target_mask, per_token=True)
    return per_token.sum(-1)


def choice_eval(placed, mesh, rules, tok: Tokenizer, records, *, chat: bool = False, mode: str | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[dict, list[dict]]:
    """(metrics, one row per record: prompt, choices, answer, predicted, log-likelihoods)."""
    if not records:
        raise ConfigError("--data: no usable multiple-choice record")
    graphdef, state = placed
    fn = compiled(graphdef, _choice_logp, mesh, rules)
    s = tok.special
    rows_per_record = max(len(choices) for _, _, choices, _ in records)
    n_dev = mesh.size
    R = _bucket(rows_per_record, n_dev)
    rows, right, right_norm = [], 0, 0
    for origin, prompt, choices, answer in records:
        p = encode_prompt(tok, prompt, chat=chat, mode=mode)
        targets = [np.concatenate([tok.encode(c), [s.eos]]).astype(np.int32) for c in choices]
        P, T = _bucket(len(p), 32), _bucket(max(len(t) for t in targets), 16)
        ids = np.full((R, P), s.pad, np.int32)
        ids[:, :len(p)] = p
        mask = np.zeros((R, P), np.int32)
        mask[:, :len(p)] = 1
        tgt = np.full((R, T), s.pad, np.int32)
        tmask = np.zeros((R, T), np.float32)
        for j, t in enumerate(targets):
            tgt[j, :len(t)], tmask[j, :len(t)] = t, 1.0
        logp = np.asarray(fn(state, ids, mask, tgt, tmask))[:len(choices)]
        norm = logp / np.array([len(t) for t in targets])
        pred, pred_norm = int(np.argmax(logp)), int(np.argmax(norm))
        right += pred == answer
        right_norm += pred_norm == answer
        rows.append({"origin": origin, "prompt": prompt, "choices": choices, "answer": answer, "predicted": pred,
                     "correct": pred == answer, "loglik": [float(x) for x in logp]})
        if progress:
            progress(1)
    n = len(records)
    return {"accuracy": right / n, "accuracy_per_token": right_norm / n, "records": n,
            "chance": float(np.mean([1 / len(c) for _, _, c, _ in records]))}, rows
