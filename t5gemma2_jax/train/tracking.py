"""Experiment tracking: which code a run ran (`git_state`, recorded in every checkpoint's metadata)
and optional Weights & Biases logging (`train.wandb`, off by default) beside TensorBoard.

    train.wandb.enabled=true train.wandb.project=ablations train.wandb.name=merged-attn
    train.wandb.mode=offline            # no network: `wandb sync WORKDIR/wandb/offline-run-*` later

The W&B run gets the resolved config and the git state as its config and the metrics.jsonl rows
under TensorBoard's tags; its id is kept in `WORKDIR/wandb_run_id`, so a resumed run continues
the same W&B run. Only process 0 logs.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any, Mapping

from t5gemma2_jax import configlib
from t5gemma2_jax.experiment import WandbConfig

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"
# The checkout the package is imported from (an installed copy has no .git above it).
SOURCE_DIR = Path(__file__).resolve().parents[2]


def git_state(directory: str | Path = SOURCE_DIR) -> dict[str, Any] | None:
    """{commit, branch, dirty} of the git checkout holding `directory`; None outside one (or
    without git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "branch": branch, "dirty": dirty}


class WandbRun:
    """A W&B run logging what `MetricsWriter` writes (metrics by tag, sample tables)."""

    def __init__(self, cfg: WandbConfig, workdir: Path, config: Mapping[str, Any]):
        try:
            import wandb
        except ImportError:
            raise configlib.ConfigError("train.wandb.enabled: the wandb package is not installed "
                                        "(pip install 't5gemma2-jax[wandb]')") from None
        self._wandb = wandb
        id_file = workdir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        directory = Path(cfg.dir) if cfg.dir else workdir
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or workdir.name,
                              group=cfg.group, tags=list(cfg.tags), notes=cfg.notes, mode=cfg.mode,
                              dir=str(directory), id=run_id, resume="allow", config=dict(config))
        id_file.write_text(self.run.id + "\n")

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def log_rows(self, step: int, tag: str, rows: list[dict]) -> None:
        columns = list(rows[0])
        self.run.log({tag: self._wandb.Table(columns=columns, data=[[str(r.get(c)) for c in columns] for r in rows])},
                     step=step)

    def close(self) -> None:
        self.run.finish()
