"""What `train` returns: how far a run got, its last losses, how it stopped and where its outputs are."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class RunSummary:
    start_step: int
    step: int
    # None: ran to train.steps (or had already); "divergence"; else the signal or notice that stopped
    # it ("SIGTERM", "SIGINT", "preemption"), after a checkpoint at `step`.
    stopped_by: str | None = None
    loss: float | None = None                   # the last logged train loss
    eval_loss: float | None = None              # the last evaluation's
    heldout: dict[str, Any] = dataclasses.field(default_factory=dict)   # the last generation evaluation's
    nonfinite_steps: int = 0
    last_applied_step: int | None = None
    broken_at_step: int | None = None
    data_stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    skip_summary: str | None = None
    checkpoints: str | None = None
    last_checkpoint: int | None = None
    export: str | None = None                   # the full model, when it saves its base
    adapter: str | None = None                  # the PEFT adapter, when it trains LoRA adapters
    workdir: str | None = None
    wall_time_s: float | None = None            # None when the work directory held a finished run

    @property
    def preempted(self) -> bool:
        return self.stopped_by not in (None, "divergence")

    @property
    def diverged(self) -> bool:
        return self.stopped_by == "divergence"

    def describe(self) -> str:
        """A few lines: how far it got, the losses, the data it skipped, where its checkpoints and
        export are, and how it stopped."""
        if self.wall_time_s is None:
            return f"already complete at step {self.step}; nothing to do"
        lines = [f"steps {self.start_step} -> {self.step} in {self.wall_time_s:.0f} s"
                 + (f"; train loss {self.loss:.4f}" if self.loss is not None else "")
                 + (f"; eval loss {self.eval_loss:.4f}" if self.eval_loss is not None else "")]
        if "records_seen" in self.data_stats:
            lines.append(f"data: {self.data_stats['examples']} examples from {self.data_stats['records_seen']} "
                         f"records; {self.skip_summary or ''}")
        if self.nonfinite_steps:
            lines.append(f"non-finite steps not applied: {self.nonfinite_steps}")
        lines.append(f"checkpoints: {self.checkpoints} (latest step {self.last_checkpoint})"
                     + (f"; export: {self.export}" if self.export else "")
                     + (f"; adapter (PEFT): {self.adapter}" if self.adapter else ""))
        if self.diverged:
            if self.broken_at_step is not None:
                why = (f"step {self.broken_at_step} left the parameters non-finite (not saved; "
                       f"last good step {self.last_applied_step})")
            else:
                why = (f"the loss or gradient was not finite for {self.nonfinite_steps} steps "
                       f"(last applied step {self.last_applied_step})")
            lines.append(f"error: stopped: {why}; lower optim.learning_rate or set optim.clip_norm, then rerun "
                         "to resume from the latest checkpoint")
        elif self.stopped_by is not None:
            lines.append(f"stopped at step {self.step} on {self.stopped_by}; rerun the same command to resume")
        return "\n".join(lines)
