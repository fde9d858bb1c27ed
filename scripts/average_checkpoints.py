#!/usr/bin/env python
"""Average the parameters of several checkpoints into one params export.

    # the last 5 checkpoints of a run (keep them with train.keep_checkpoints=5)
    python scripts/average_checkpoints.py workdirs/run --last 5 --out workdirs/run/export_avg5
    # any checkpoints of one architecture: step directories, exports, Hugging Face directories
    python scripts/average_checkpoints.py workdirs/run/checkpoints/9000 workdirs/run/checkpoints/10000 \
        --out /tmp/avg

The export loads wherever a checkpoint path is taken: `t5gemma2_jax.load`, `train.init_from`,
scripts/generate.py and scripts/evaluate.py --checkpoint. Checkpoints of different shapes or
architectures, too few checkpoints for --last, or a path that is no checkpoint exit with status 2
and one line naming the problem.
"""

from __future__ import annotations

import hugepages  # first, so that a restart comes before the heavy imports

if __name__ == "__main__":
    hugepages.restart_with_huge_pages()

import argparse
import sys


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="checkpoints, or one work directory with --last")
    p.add_argument("--last", type=int, help="average the newest N complete checkpoints of the one work directory")
    p.add_argument("--out", required=True, help="the export directory to write")
    a = p.parse_args(argv)

    from t5gemma2_jax.averaging import average_checkpoints, last_checkpoints
    from t5gemma2_jax.configlib import ConfigError

    if a.last is not None:
        if len(a.paths) != 1:
            raise ConfigError(f"--last: takes one work directory, got {len(a.paths)} paths")
        paths = last_checkpoints(a.paths[0], a.last)
    else:
        paths = a.paths
    out = average_checkpoints(paths, a.out)
    print(f"wrote {out}: the mean of {len(paths)} checkpoints ({', '.join(map(str, paths))})")
    return out


def main(argv=None) -> int:
    from t5gemma2_jax import cli

    return cli.run(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
