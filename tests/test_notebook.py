"""The quickstart notebook runs top to bottom (code cells executed in order, as a kernel would)."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    nb = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    script = tmp_path / "quickstart.py"
    script.write_text("\n\n".join(cells))
    env = {**os.environ, "QUICKSTART_STEPS": "30", "QUICKSTART_WORKDIR": str(tmp_path / "run")}
    env.pop("XLA_FLAGS", None)                      # one CPU device, as on a laptop
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT / "notebooks", env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, textwrap.shorten(proc.stderr[-4000:], 4000)
    assert "loss " in proc.stdout and "->" in proc.stdout
    assert (tmp_path / "run" / "loss.png").exists()
    assert (tmp_path / "run" / "hf" / "config.json").exists()
    match = re.search(r"^loss ([\d.]+) -> ([\d.]+) over", proc.stdout, re.M)
    assert match, proc.stdout[-2000:]
    assert float(match.group(2)) < float(match.group(1))
