#!/usr/bin/env python
"""Long-context (RULER-style) tasks: generate them at several lengths, score a checkpoint on them
into one table of accuracy per task and length, and write them as lm-eval tasks.

    # 50 records per task and length, lengths in the tokens of the model's tokenizer
    python scripts/ruler.py generate --tokenizer tokenizer.model --lengths 4096,8192,16384,32768,65536,131072 \
        --samples 50 --out ruler/
    # greedy completions of a checkpoint on every file; the table as JSON and markdown
    python scripts/ruler.py score --checkpoint workdirs/run --data ruler/ --out ruler/table.json \
        --markdown ruler/table.md --predictions ruler/predictions.jsonl
    # the table again from a predictions file (no model)
    python scripts/ruler.py score --predictions ruler/predictions.jsonl --markdown ruler/table.md
    # lm-eval generate_until tasks over the files: --include_path ruler/lm_eval --tasks ruler_4096
    python scripts/ruler.py lm-eval-tasks --data ruler/ --out ruler/lm_eval
    # training conversations too (data.kind=sft), in the chat template the lengths count
    python scripts/ruler.py generate --tokenizer tokenizer.model --lengths 1K --tasks niah_single --samples 4000 \
        --seed 1 --chat --sft --out needles/

Tasks: niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt, cwe, qa (see
t5gemma2_jax/evaluation/ruler.py). --checkpoint takes what evaluate.py takes.
"""

from __future__ import annotations

import hugepages  # first, so that a restart comes before the heavy imports

if __name__ == "__main__":
    hugepages.restart_with_huge_pages()

import argparse
import sys


def main(argv=None) -> int:
    from t5gemma2_jax import cli

    return cli.run(lambda: run(argv))


def _ints(text: str) -> list[int]:
    from t5gemma2_jax.configlib import ConfigError

    try:
        values = [int(v.strip().lower().replace("k", "")) * (1024 if v.strip().lower().endswith("k") else 1)
                  for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--lengths: expected comma-separated token counts (4096 or 4K), got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"--lengths: expected positive token counts, got {text!r}")
    return values


def _files(data: list[str]) -> list:
    """Every generated file named (a local path or a gs:// URL), a directory standing for the
    `{task}_{length}.jsonl` files in it (so that a predictions file written beside them is left out)."""
    import re

    from t5gemma2_jax import storage
    from t5gemma2_jax.configlib import ConfigError
    from t5gemma2_jax.evaluation.ruler import TASK_NAMES

    generated = re.compile(rf"^({'|'.join(TASK_NAMES)})_\d+\.jsonl$")
    out: list = []
    for d in data:
        p = storage.as_path(d)
        if p.is_dir():
            found = sorted((f for f in p.glob("*.jsonl") if generated.match(f.name)), key=str)
            if not found:
                raise ConfigError(f"--data: no generated task file ({{task}}_{{length}}.jsonl) in {p}")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"--data: {p} does not exist")
    return out


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write OUT/{task}_{length}.jsonl")
    g.add_argument("--tokenizer", required=True, help="the SentencePiece model whose tokens lengths count")
    g.add_argument("--lengths", required=True, help="comma-separated encoder lengths in tokens (4096 or 4K)")
    g.add_argument("--tasks", default=None, help="comma-separated (default: all)")
    g.add_argument("--samples", type=int, default=50, help="records per task and length")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--haystack", default="noise", choices=("noise", "words"),
                   help="needle and variable-tracking filler: repeated plain sentences, or random words")
    g.add_argument("--chat", action="store_true", help="count the prompt inside the chat template")
    g.add_argument("--mode", help="count the prompt after this UL2 mode token, e.g. [S2S]")
    g.add_argument("--out", required=True)
    g.add_argument("--lm-eval", metavar="DIR", help="also write lm-eval task YAMLs there")
    g.add_argument("--sft", action="store_true",
                   help="also write each file as training conversations, {task}_{length}.sft.jsonl (needs --chat)")
    s = sub.add_parser("score", help="a checkpoint's table over generated files, or a predictions file's")
    s.add_argument("--checkpoint", help="what evaluate.py takes; without it --predictions is read and tabulated")
    s.add_argument("--data", action="append", default=[], help="a generated file or a directory of them (repeatable)")
    s.add_argument("--tokenizer", help="SentencePiece model (default: the one the checkpoint records)")
    s.add_argument("--dtype", choices=("float32", "bfloat16"))
    s.add_argument("--attention-backend", help="replace the attention backend the checkpoint was trained with (auto, dense, blockwise, splash, cudnn)")
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--max-samples", type=int, help="at most this many records of each file")
    s.add_argument("--max-new-tokens", type=int, help="default: each record's own budget")
    s.add_argument("--out", help="the table as JSON")
    s.add_argument("--markdown", help="the table as markdown")
    s.add_argument("--predictions", help="one row per record (written with --checkpoint, read without)")
    s.add_argument("--no-progress", action="store_true")
    y = sub.add_parser("lm-eval-tasks", help="lm-eval generate_until YAMLs over generated files")
    y.add_argument("--data", action="append", required=True, help="a generated file or a directory of them")
    y.add_argument("--out", required=True)
    a = p.parse_args(argv)

    from t5gemma2_jax.configlib import ConfigError
    from t5gemma2_jax.evaluation import ruler, ruler_score

    if a.command == "generate":
        from tqdm import tqdm

        from t5gemma2_jax.data import DataConfig, load_tokenizer

        if a.sft and not a.chat:
            raise ConfigError("--sft: the conversations are laid out in the chat template; add --chat so that "
                              "--lengths counts the encoder input they become")
        tasks = ruler.TASK_NAMES if a.tasks is None else tuple(t.strip() for t in a.tasks.split(",") if t.strip())
        lengths = _ints(a.lengths)
        tok = load_tokenizer(DataConfig(tokenizer=a.tokenizer))
        with tqdm(total=len(tasks) * len(lengths) * max(a.samples, 0), desc="generate", unit=" records") as bar:
            paths = ruler.write_tasks(a.out, tok, tasks=tasks, lengths=lengths, num_samples=a.samples, seed=a.seed,
                                      haystack=a.haystack, chat=a.chat, mode=a.mode, progress=bar.update)
        if a.lm_eval:
            ruler.write_lm_eval_tasks(paths, a.lm_eval)
        if a.sft:
            paths += ruler.write_sft(paths)
        for path in paths:
            print(path)
        return [str(x) for x in paths]
    if a.command == "lm-eval-tasks":
        written = ruler.write_lm_eval_tasks(_files(a.data), a.out)
        for path in written:
            print(path)
        return [str(x) for x in written]

    for name in ("batch_size", "max_samples", "max_new_tokens"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {v}")
    if a.checkpoint is None:
        if a.predictions is None or a.data:
            raise ConfigError("score: give --checkpoint and --data, or --predictions alone (a predictions file "
                              "to tabulate)")
        rows = ruler_score.read_predictions(a.predictions)
        t = ruler_score.table(rows)
        ruler_score.write_results(t, None, out=a.out, markdown_out=a.markdown)
    else:
        if not a.data:
            raise ConfigError("--data: name the generated files (or their directory) to score")
        files = _files(a.data)
        from tqdm import tqdm

        import t5gemma2_jax as tg

        src = tg.find_source(a.checkpoint)
        model = tg.load(src, dtype=a.dtype, text_only=True, attention_backend=a.attention_backend)
        tok = tg.load_tokenizer_for(src, model.config, a.tokenizer)
        with tqdm(desc="score", unit=" records", disable=a.no_progress) as bar:
            t, rows = ruler_score.score_files(model, tok, files, batch_size=a.batch_size,
                                              max_new_tokens=a.max_new_tokens, max_samples=a.max_samples,
                                              progress=bar.update)
        ruler_score.write_results(t, rows, out=a.out, markdown_out=a.markdown, predictions=a.predictions)
    print(ruler_score.markdown(t), end="")
    return t


if __name__ == "__main__":
    sys.exit(main())
