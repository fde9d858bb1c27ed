#!/usr/bin/env python
"""Train T5Gemma 2 (UL2 pretraining or SFT), sharded, resumable.

    python scripts/train.py --config configs/tiny.yaml --workdir /tmp/run [key=value ...]

Overrides are dotted keys of the config (`train.steps=200 mesh.fsdp=4 optim.learning_rate=1e-4
model.remat=full data.batch_size=64`). Rerunning the same command resumes from the last complete
checkpoint in WORKDIR/checkpoints. Everything is validated before anything is compiled; a bad
config, a config that does not fit the machine, missing data or a checkpoint that cannot be read
or written exits with status 2 and one line naming the problem. `--check` stops after validation
(data files, the tokenizer against the model, and `train.init_from`'s kind and architecture, which
the model takes; its weights are not read). SIGTERM and Ctrl-C save a checkpoint and exit with
status 143 and 130; a run that keeps producing non-finite losses stops with status 3, its
checkpoints as they were.

Fake CPU devices for trying meshes on one machine: `--cpu_devices 8` (or
XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""

from __future__ import annotations

import hugepages  # first, so that a restart comes before the heavy imports

if __name__ == "__main__":
    hugepages.restart_with_huge_pages()

import argparse
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML experiment config (see configs/)")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard, export")
    p.add_argument("--check", action="store_true", help="validate config and machine, then exit")
    p.add_argument("--cpu_devices", type=int, default=0, help="use N fake CPU devices")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    if args.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from t5gemma2_jax import cli

    cli.configure_logging()
    return cli.run(lambda: _run(args))


def _run(args) -> int:
    from t5gemma2_jax.cli import start_processes
    from t5gemma2_jax.train import load_config, prepare, train

    cfg = load_config(args.config, args.overrides)
    start_processes(cfg.train.distributed)
    workdir, trainer = prepare(cfg, args.workdir)
    if args.check:
        mesh = trainer.mesh
        print(f"ok: mesh {dict(mesh.shape)} on {mesh.size} {mesh.devices.flat[0].platform} "
              f"devices, global batch {cfg.data.batch_size}, workdir {workdir}" + _init_from(cfg))
        return 0
    summary = train(cfg, workdir)
    print(summary.describe(), file=sys.stderr)
    stopped = summary.stopped_by
    if stopped == "divergence":
        return DIVERGED
    if stopped is not None:
        return 130 if stopped == "SIGINT" else 143
    return 0


DIVERGED = 3


def _init_from(cfg) -> str:
    """What --check read of train.init_from (its config, not its weights)."""
    if cfg.train.init_from is None:
        return ""
    src = cfg.init_source
    return f", model from train.init_from ({src.kind}: {src.path})"


if __name__ == "__main__":
    sys.exit(main())
