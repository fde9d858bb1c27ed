#!/usr/bin/env python
"""Draw a run's loss curve, or one metric across several runs, from their metrics.jsonl.

    .venv/bin/python scripts/plot.py WORKDIR                      # WORKDIR/loss.png: loss, eval loss, lr
    .venv/bin/python scripts/plot.py RUN_A RUN_B --out ab.png     # train loss of both runs, one axis
    .venv/bin/python scripts/plot.py RUN_A RUN_B --metric eval_loss --out eval.png

With one WORKDIR and no --metric the picture is the one training writes at each evaluation. With
--metric (or several work directories) the metric of every run is drawn on one axis, each named
by its directory; one work directory then writes WORKDIR/<metric>.png unless --out says otherwise.
A missing directory, a directory without metrics.jsonl or a metric no row has exits with status 2
and one line naming it.
"""

from __future__ import annotations

import argparse


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="work directories of training runs")
    p.add_argument("--out", help="the PNG to write (a path or a gs:// URL)")
    p.add_argument("--metric", help="a key of metrics.jsonl (loss, eval_loss, lr, loss_avg, tokens_per_s, ...)")
    return p.parse_args(argv)


def plot(argv=None):
    from t5gemma2_jax import storage
    from t5gemma2_jax.train.plots import PlotError, plot_run, plot_runs

    args = parse_args(argv)
    workdirs = [storage.as_path(w) for w in args.workdirs]
    if len(workdirs) == 1 and args.metric is None:
        return plot_run(workdirs[0], args.out)
    if args.out is None and len(workdirs) > 1:
        raise PlotError("--out: name the PNG to write when plotting several work directories")
    metric = args.metric or "loss"
    default = workdirs[0] / f"{metric.replace('/', '_')}.png"     # skipped/<reason> is one file, not a folder
    return plot_runs(workdirs, args.out or default, metric)


def main(argv=None) -> int:
    from t5gemma2_jax import cli

    def run() -> int:
        print(f"wrote {plot(argv)}")
        return 0

    return cli.run(run)


if __name__ == "__main__":
    raise SystemExit(main())
