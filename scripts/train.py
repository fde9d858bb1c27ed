#!/usr/bin/env python
"""Train T5Gemma 2 (UL2 pretraining or SFT), sharded, resumable.

    python scripts/train.py --config configs/tiny.yaml --workdir /tmp/run [key=value ...]

Overrides are dotted keys of the config (`train.steps=200 mesh.fsdp=4 optim.learning_rate=1e-4
model.remat=full data.batch_size=64`). Rerunning the same command resumes from the last complete
checkpoint in WORKDIR/checkpoints. Everything is validated before anything is compiled; a bad
config or a config that does not fit the machine exits with status 2 and a message naming the
problem. `--check` stops after validation. A SIGTERM saves a checkpoint and exits with status 143.

Fake CPU devices for trying meshes on one machine: `--cpu_devices 8` (or
XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import jax

    if args.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from t5gemma2_jax.config import ConfigError
    from t5gemma2_jax.train import SetupError, load_config, maybe_initialize_distributed, prepare, train

    try:
        cfg = load_config(args.config, args.overrides)
        maybe_initialize_distributed(cfg.train.distributed)
        workdir, trainer = prepare(cfg, args.workdir)
    except (ConfigError, SetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        mesh = trainer.mesh
        print(f"ok: mesh {dict(mesh.shape)} on {mesh.size} {mesh.devices.flat[0].platform} "
              f"devices, global batch {cfg.data.batch_size}, workdir {workdir}")
        return 0
    summary = train(cfg, Path(args.workdir))
    if summary["preempted"]:
        print(f"stopped at step {summary['step']} on SIGTERM; rerun the same command to resume", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
