#!/usr/bin/env python
"""Generate text from a trained or released T5Gemma 2, streaming tokens as they come.

    # a checkpoint written by scripts/train.py: its workdir (the newest complete step, also of a
    # run stopped early), one step directory, or the workdir's export/ folder
    python scripts/generate.py --checkpoint /tmp/tiny --prompt "a red circle" --mode "[S2S]"
    python scripts/generate.py --checkpoint /tmp/tiny/checkpoints/100 --prompt "a red circle" --mode "[S2S]"
    # an SFT model, with an image and Gemma's chat template
    python scripts/generate.py --checkpoint /tmp/tiny_sft --chat --image scene.png \
        --prompt "What colour is the circle?"
    # a Hugging Face directory (config.json + *.safetensors) and its tokenizer.model
    python scripts/generate.py --hf DIR --tokenizer DIR/tokenizer.model --prompt "..."
    # a LoRA run (its base from the run's train.init_from, its WORKDIR/adapter applied, unmerged)
    python scripts/generate.py --checkpoint /tmp/tiny_lora --chat --prompt "..."
    # any PEFT adapter directory on a base, with the base stored int8 (QLoRA)
    python scripts/generate.py --hf DIR --adapter ADAPTER --quantize-base int8 --prompt "..."

`<start_of_image>` in the prompt marks where each `--image` goes (else images come first).
Greedy and sampling stream token by token; beam search prints the best beam at the end.
"""

from __future__ import annotations

import hugepages  # first, so that a restart comes before the heavy imports

if __name__ == "__main__":
    hugepages.restart_with_huge_pages()

import argparse
import sys

import numpy as np


def _load_model(a, with_images: bool):
    """(model, where it came from): the checkpoint, quantised and with an adapter when asked for."""
    import t5gemma2_jax as tg

    src = tg.find_source(a.hf or a.checkpoint, what="--hf" if a.hf else "--checkpoint")
    if a.hf and src.kind != "hf":
        from t5gemma2_jax.configlib import ConfigError
        raise ConfigError(f"--hf {a.hf}: not a Hugging Face directory (config.json); use --checkpoint")
    model = tg.load(src, dtype=a.dtype, text_only=not with_images, adapter=a.adapter, quantize_base=a.quantize_base,
                    attention_backend=a.attention_backend)
    return model, src


def main(argv=None) -> int:
    """The command line: the generated text on stdout, or `error: ...` and exit status 2."""
    from t5gemma2_jax import cli

    return cli.run(lambda: generate_text(argv))


def generate_text(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training workdir (its newest complete checkpoint), a step directory "
                     "(WORKDIR/checkpoints/<step>), a params export or a Hugging Face directory (a LoRA run's "
                     "workdir: its base with its adapters)")
    src.add_argument("--hf", help="a Hugging Face T5Gemma 2 directory")
    p.add_argument("--adapter", help="a PEFT LoRA directory to apply (unmerged), e.g. a LoRA run's WORKDIR/adapter")
    p.add_argument("--quantize-base", choices=("none", "int8", "nf4"),
                   help="store the base's text projections quantised (QLoRA; default: as the LoRA run did)")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the one the training run used)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's user/model turn template")
    p.add_argument("--mode", help="UL2 mode token to prepend, e.g. [S2S] (for UL2-pretrained models)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--method", default="greedy", choices=("greedy", "sample", "beam"))
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-new-tokens", type=int, default=0, help="no eos before this many tokens")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers' repetition penalty (1: off)")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--allow-special", action="store_true", help="let completions contain UL2 sentinels, mode "
                   "and image tokens, pad and bos (suppressed by default)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attention-backend", help="replace the attention backend the checkpoint was trained with (auto, dense, blockwise, splash, cudnn)")
    a = p.parse_args(argv)

    import t5gemma2_jax as tg
    from t5gemma2_jax.configlib import ConfigError
    from t5gemma2_jax.data.images import ImageError, load_image, preprocess_image
    from t5gemma2_jax.data.prompts import default_suppress_tokens, encode_prompt

    model, src = _load_model(a, with_images=bool(a.image))
    cfg = model.config
    tok = tg.load_tokenizer_for(src, cfg, a.tokenizer)
    pixels = None
    if a.image:
        try:
            pixels = np.stack([preprocess_image(load_image(path), cfg.vision.image_size) for path in a.image])
        except ImageError as e:
            raise ImageError(f"--image: {e}", e.reason) from None
    try:
        ids = encode_prompt(tok, a.prompt, images=len(a.image), mm_tokens_per_image=cfg.mm_tokens_per_image,
                            chat=a.chat, mode=a.mode)[None]
    except ConfigError as e:
        raise ConfigError(f"--{e}") from None
    controls = dict(suppress_tokens=None if a.allow_special else default_suppress_tokens(tok),
                    min_new_tokens=a.min_new_tokens, repetition_penalty=a.repetition_penalty)
    try:
        return _emit(model, tok, ids, pixels, a, controls)
    except ValueError as e:                      # a control out of range, named by generate
        raise ConfigError(f"generate: {e}") from None


def _emit(model, tok, ids, pixels, a, controls) -> str:
    """Prints the completion (streamed unless beam search) and returns it, cut at a stop string."""
    import t5gemma2_jax as tg
    from t5gemma2_jax.generation import generate_stream
    from t5gemma2_jax.generation.texts import completion_ids, cut_at_stop

    cfg = model.config
    if a.method == "beam":
        tokens = np.asarray(tg.generate(model, ids, pixel_values=pixels, max_new_tokens=a.max_new_tokens,
                                        method="beam", num_beams=a.num_beams, **controls))[0]
        text = cut_at_stop(tok.decode(completion_ids(tokens, cfg.eos_token_id, cfg.pad_token_id)), a.stop)
        print(text)
        return text
    out: list[int] = []
    printed = ""
    for step in generate_stream(model, ids, pixel_values=pixels, max_new_tokens=a.max_new_tokens,
                                method=a.method, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                rng=a.seed, **controls):
        t = int(step[0])
        if t in (cfg.eos_token_id, cfg.pad_token_id):
            break
        out.append(t)
        text = cut_at_stop(tok.decode(out), a.stop)   # decode the whole prefix: pieces merge across tokens
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
        if len(text) < len(tok.decode(out)):          # a stop string appeared
            break
    sys.stdout.write("\n")
    return printed


if __name__ == "__main__":
    sys.exit(main())
