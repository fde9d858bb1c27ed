"""lm-evaluation-harness model `t5gemma2_jax`: any task of the harness on anything
`t5gemma2_jax.load` reads (a work directory, a step directory, an export, a Hugging Face directory,
a LoRA run).

    python -m t5gemma2_jax.evaluation.lm_eval --model_args pretrained=workdirs/demo,batch_size=32 \\
        --tasks arc_easy --output_path results/ --log_samples
    python -m t5gemma2_jax.evaluation.lm_eval --model_args pretrained=DIR --tasks my_task --include_path tasks/

or from Python, after importing this module (which registers the model):

    import lm_eval, t5gemma2_jax.evaluation.lm_eval
    lm_eval.simple_evaluate(model="t5gemma2_jax", model_args="pretrained=DIR", tasks=["arc_easy"])

Requests are laid out exactly as the harness' own `hf` model with `backend=seq2seq` lays them out,
so the two give the same numbers on the same checkpoint: a context goes into the encoder (bos, then
its text, left-truncated to `max_length`); its continuation (no bos, no eos) is scored by the
decoder after the start token; `is_greedy` says whether each teacher-forced step's argmax is the
continuation's token. A rolling log-likelihood splits the document (bos, then its text) into the
harness' disjoint windows of `max_length` tokens, each window's few context tokens into the encoder
and its tokens scored by the decoder. `generate_until` encodes the context the same way and decodes
with `generation.generate` (greedy, or sampling with `do_sample`/`temperature`/`top_k`/`top_p`),
cutting the text at the first stop string.

Requests are sorted by length and padded to a few bucket lengths, in batches of one size (the last
one filled with copies of a real row), so a task compiles a handful of programs. Parameters are
sharded over a mesh of every device by default (`mesh=N`: the first N devices), the batch split
over it.

Model arguments and what to know on a TPU VM: docs/evaluation.md.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

import jax
import lm_eval.models  # noqa: F401  (registers the harness' own models before ours: the registry
                       # imports them only while it is empty)
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from lm_eval import utils as harness_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from t5gemma2_jax import cli
from t5gemma2_jax.configlib import ConfigError
from t5gemma2_jax.evaluation.placement import compiled, place
from t5gemma2_jax.generation import generate
from t5gemma2_jax.generation.scoring import score_continuations
from t5gemma2_jax.generation.texts import completion_ids, cut_at_stop
from t5gemma2_jax.loading import find_source, load, load_tokenizer_for
from t5gemma2_jax.parallel import MeshConfig, make_mesh, sharding_rules
from t5gemma2_jax.sharding import Rules, axis_rules

NAME = "t5gemma2_jax"
# What the harness' command line passes every model besides its model_args; JAX picks its devices.
HARNESS_ARGS = ("device", "max_batch_size", "trust_remote_code")
# Generation options the harness' tasks pass that `generate` understands (besides until,
# max_gen_toks, do_sample and temperature).
GENERATE_OPTIONS = ("top_k", "top_p", "repetition_penalty", "min_new_tokens")


def bucket(n: int, minimum: int = 16) -> int:
    """The padded length of a sequence of `n` tokens: a multiple of an eighth of the next power of
    two (at least `minimum`), so a task's lengths share a few compiled shapes (about 8 per doubling)
    while padding wastes at most an eighth."""
    step = max(minimum, (1 << max(n - 1, 1).bit_length()) // 8)
    return max(minimum, -(-n // step) * step)


class T5Gemma2LM(TemplateLM):
    """The harness' model interface over a loaded `T5Gemma2` (see the module docstring)."""

    backend = "seq2seq"   # TemplateLM encodes a context and its continuation apart

    def __init__(self, pretrained: str, dtype: str | None = None, batch_size: int | str = 16,
                 max_length: int | None = None, max_gen_toks: int = 256, tokenizer: str | None = None,
                 add_bos_token: bool = True, mode: str | None = None, mesh: str | int | Mesh = "auto",
                 rules: Rules | None = None, seed: int = 0, adapter: str | None = None,
                 attention_backend: str | None = None, **harness: Any):
        super().__init__()
        unknown = sorted(set(harness) - set(HARNESS_ARGS))
        if unknown:
            raise ConfigError(f"model_args: unknown argument(s) {unknown} for {NAME}")
        if str(batch_size).startswith("auto"):
            raise ConfigError(f"batch_size: {batch_size!r} is not supported by {NAME} (each batch shape is a "
                              "compiled program); give a number")
        src = find_source(pretrained, what="pretrained")
        self.mesh, self.rules = _mesh(mesh, rules)
        self.model = load(src, dtype=None if dtype in (None, "auto") else str(dtype), text_only=True,
                          adapter=adapter, mesh=self.mesh, rules=self.rules,
                          attention_backend=attention_backend or None)
        self.tok = load_tokenizer_for(src, self.model.config, tokenizer)
        cfg, s = self.model.config, self.tok.special
        self.add_bos_token = _flag(add_bos_token, "add_bos_token")
        self.mode_id = None if mode in (None, "") else s.modes.get(mode)
        if mode not in (None, "") and self.mode_id is None:
            raise ConfigError(f"mode: {mode!r} is not a mode token of this tokenizer ({sorted(s.modes)})")
        self._max_length = int(max_length) if max_length else cfg.encoder.max_position_embeddings
        self._max_gen_toks = int(max_gen_toks)
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        # Every batch shard gets the same number of rows.
        self._batch_size = -(-int(batch_size) // shards) * shards
        if self._batch_size < 1 or self._max_length < 1 or self._max_gen_toks < 1:
            raise ConfigError(f"batch_size, max_length and max_gen_toks must be positive, got "
                              f"{batch_size}, {max_length}, {max_gen_toks}")
        self.seed = int(seed)
        self._placed = place(self.model, self.mesh, self.rules)
        self._score = compiled(self._placed[0], score_continuations, self.mesh, self.rules)
        self._decoder = nnx.merge(*self._placed)
        self._bos_text = self.tok.id_to_piece(s.bos)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "T5Gemma2LM":
        return cls.create_from_arg_obj(harness_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "T5Gemma2LM":
        # The harness' command line passes its own --batch_size (default 1) beside model_args;
        # a batch_size in model_args wins, so `--model_args pretrained=...,batch_size=32` works.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # ---- what the harness reads ----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.special.eos

    @property
    def prefix_token_id(self) -> int:
        return self.tok.special.bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.path).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(self.model, nnx.Param)))),
                "model_dtype": self.model.config.dtype, "tokenizer": str(self.tok.path)}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `string`, after bos unless `add_special_tokens=False` (or add_bos_token=false).
        A string that starts with bos's text gets the bos id for it, as a Hugging Face tokenizer gives."""
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and string.startswith(self._bos_text):
            string, add = string[len(self._bos_text):], True
        ids = [int(i) for i in self.tok.encode(string)]
        return [self.tok.special.bos] + ids if add else ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(tokens)

    # ---- log-likelihoods -------------------------------------------------------------------------
    def _encoder_ids(self, ids: Sequence[int]) -> list[int]:
        """The encoder input of a context: its last `max_length` tokens (the harness' seq2seq
        truncation), with the mode token after a leading bos when one is set."""
        ids = list(ids)[-self.max_length:]
        if self.mode_id is None:
            return ids
        head = ids[:1] if ids[:1] == [self.tok.special.bos] else []
        body = ids[len(head):][-(self.max_length - len(head) - 1):] if self.max_length > len(head) + 1 else []
        return head + [self.mode_id] + body

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError(f"{NAME}: a loglikelihood request with an empty context or continuation")
            rows.append((self._encoder_ids(context), list(continuation)[-self.max_length:]))
        with tqdm(total=len(rows), disable=disable_tqdm or self.rank != 0,
                  desc="Running loglikelihood requests") as bar:
            sums, greedy = self._score_rows(rows, bar.update)
        out = []
        for (request, _, _), s, g in zip(requests, sums, greedy):
            answer = (float(s), bool(g))
            if request is not None:   # rolling windows have none: loglikelihood_rolling caches the document
                self.cache_hook.add_partial("loglikelihood", request, answer)
            out.append(answer)
        return out

    def _score_rows(self, rows: list[tuple[list[int], list[int]]], progress) -> tuple[np.ndarray, np.ndarray]:
        """Summed log-likelihood and is-greedy of each (encoder ids, target ids), longest first in
        batches of `batch_size` padded to bucket lengths."""
        n, B, pad = len(rows), self.batch_size, self.tok.special.pad
        order = sorted(range(n), key=lambda i: (-len(rows[i][0]), -len(rows[i][1])))
        sums, greedy = np.zeros(n, np.float64), np.zeros(n, bool)
        graphdef, state = self._placed
        for lo in range(0, n, B):
            chunk = order[lo:lo + B]
            batch = chunk + [chunk[0]] * (B - len(chunk))   # filler rows repeat a real one
            P = bucket(max(len(rows[i][0]) for i in chunk))
            T = bucket(max(len(rows[i][1]) for i in chunk))
            ids, mask = np.full((B, P), pad, np.int32), np.zeros((B, P), np.int32)
            tgt, tmask = np.full((B, T), pad, np.int32), np.zeros((B, T), np.int32)
            for r, i in enumerate(batch):
                enc, cont = rows[i]
                ids[r, :len(enc)], mask[r, :len(enc)] = enc, 1
                tgt[r, :len(cont)], tmask[r, :len(cont)] = cont, 1
            s, g = self._score(state, ids, tgt, mask, tmask)
            sums[chunk], greedy[chunk] = np.asarray(s)[:len(chunk)], np.asarray(g)[:len(chunk)]
            progress(len(chunk))
        return sums, greedy

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(harness_utils.make_disjoint_window, harness_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(k)
        totals = np.zeros(len(requests), np.float64)
        if windows:   # all documents' windows together: full batches, sorted by length
            for k, (ll, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
                totals[k] += ll
        out = []
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
            out.append(float(total))
        return out

    # ---- generation ------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for k, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(k)
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                  desc="Running generate_until requests") as bar:
            for members in groups.values():
                gen_kwargs = requests[members[0]].args[1]
                texts = self._generate([requests[k].args[0] for k in members], gen_kwargs, bar.update)
                for k, text in zip(members, texts):
                    out[k] = text
                    self.cache_hook.add_partial("generate_until", requests[k].args, text)
        return out

    def _generate(self, contexts: list[str], gen_kwargs: dict, progress) -> list[str]:
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=None)   # generation stops at eos itself
        max_new = int(kwargs.pop("max_gen_toks"))
        do_sample, temperature = bool(kwargs.pop("do_sample", False)), float(kwargs.pop("temperature", 0.0))
        options = {k: kwargs.pop(k) for k in GENERATE_OPTIONS if kwargs.get(k) is not None}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if kwargs:
            raise ConfigError(f"generation_kwargs: {sorted(kwargs)} not supported by {NAME} "
                              f"(it takes until, max_gen_toks, do_sample, temperature, {', '.join(GENERATE_OPTIONS)})")
        method = "sample" if do_sample and temperature > 0 else "greedy"
        cfg, B = self.model.config, self.batch_size
        prompts = [self._encoder_ids(self.tok_encode(c)) for c in contexts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        texts: list[str] = [""] * len(prompts)
        for b, lo in enumerate(range(0, len(order), B)):
            chunk = order[lo:lo + B]
            batch = chunk + [chunk[0]] * (B - len(chunk))
            P = bucket(max(len(prompts[i]) for i in chunk))
            ids, mask = np.full((B, P), cfg.pad_token_id, np.int32), np.zeros((B, P), np.int32)
            for r, i in enumerate(batch):
                ids[r, :len(prompts[i])], mask[r, :len(prompts[i])] = prompts[i], 1
            with jax.set_mesh(self.mesh), axis_rules(self.rules):
                tokens = generate(self._decoder, ids, mask, max_new_tokens=max_new, method=method,
                                  temperature=temperature if method == "sample" else 1.0,
                                  rng=self.seed + b, **options)
            for r, i in enumerate(chunk):
                row = np.asarray(tokens)[r]
                texts[i] = cut_at_stop(self.tok.decode(completion_ids(row, cfg.eos_token_id, cfg.pad_token_id)), until)
            progress(len(chunk))
        return texts


# Registered by its import path, not by the class object: `python -m` runs this file as __main__,
# and the harness then imports it under its own name; both register the same entry.
model_registry.register(NAME, target="t5gemma2_jax.evaluation.lm_eval:T5Gemma2LM")


def _mesh(mesh: str | int | Mesh, rules: Rules | None) -> tuple[Mesh, Rules]:
    """The mesh the model is sharded over: every device ("auto"), the first N, or a given Mesh;
    its batch over `fsdp` with parameters sharded along it (the trainer's default layout)."""
    cfg = MeshConfig()
    if isinstance(mesh, Mesh):
        return mesh, rules if rules is not None else sharding_rules(cfg)
    devices = jax.devices()
    if mesh != "auto":
        try:
            count = int(mesh)
        except (TypeError, ValueError):
            count = 0
        if not 1 <= count <= len(devices):
            raise ConfigError(f"mesh: {mesh!r} must be 'auto' or a number of devices from 1 to {len(devices)}")
        devices = devices[:count]
    return make_mesh(cfg, devices), rules if rules is not None else sharding_rules(cfg)


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's own command line (`lm-eval run ...`) with `--model t5gemma2_jax` unless another
    model is named; a checkpoint that is not there is one `error:` line (exit 2) before any task loads."""
    from lm_eval._cli import HarnessCLI

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["ls"], ["validate"]):
        return cli.run(lambda: _harness(HarnessCLI(), args))
    if args[:1] == ["run"]:
        args = args[1:]
    if not any(a in ("--model", "-M") or a.startswith("--model=") for a in args):
        args = ["--model", NAME, *args]
    return cli.run(lambda: _harness(HarnessCLI(), ["run", *args], check=True))


def _harness(parser, args: list[str], check: bool = False) -> int:
    harness_utils.setup_logging()
    saved = sys.argv
    sys.argv = ["lm-eval", *args]   # HarnessCLI reads sys.argv
    try:
        ns = parser.parse_args()
    finally:
        sys.argv = saved
    if check and ns.model == NAME:
        pretrained = (ns.model_args or {}).get("pretrained")
        if not pretrained:
            raise ConfigError("--model_args: pretrained=PATH is required (a work directory, step, export, "
                              "Hugging Face directory or LoRA run)")
        find_source(str(pretrained), what="pretrained")
    parser.execute(ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
