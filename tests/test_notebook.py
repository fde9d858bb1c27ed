"""The quickstart notebook runs top to bottom (code cells executed in order, as a kernel would):
in the test environment, and from its install cell on in a fresh virtual environment."""

import importlib.metadata
import json
import re
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from xla_env import user_env

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _code_cells() -> list[str]:
    nb = json.loads(NOTEBOOK.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def _run_notebook(python: str, repo: Path, tmp_path: Path, timeout: int) -> subprocess.CompletedProcess:
    script = tmp_path / "quickstart.py"
    script.write_text("\n\n".join(_code_cells()))
    env = {**user_env(), "QUICKSTART_STEPS": "30", "QUICKSTART_WORKDIR": str(tmp_path / "run")}   # as on a laptop
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, str(script)], cwd=repo / "notebooks", env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, textwrap.shorten(proc.stderr[-4000:], 4000)
    return proc


def _assert_trained(proc: subprocess.CompletedProcess, tmp_path: Path) -> None:
    assert (tmp_path / "run" / "loss.png").exists()
    assert (tmp_path / "run" / "hf" / "config.json").exists()
    match = re.search(r"^loss ([\d.]+) -> ([\d.]+) over", proc.stdout, re.M)
    assert match, proc.stdout[-2000:]
    assert float(match.group(2)) < float(match.group(1))


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    _assert_trained(_run_notebook(sys.executable, ROOT, tmp_path, timeout=900), tmp_path)


def _copy_checkout(dest: Path) -> Path:
    """The working tree's tracked and not-ignored files, as a fresh clone with local changes would
    have them (a copy, so that pip's in-tree build leaves this checkout alone)."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


@pytest.mark.slow
@pytest.mark.heavy
def test_quickstart_notebook_installs_itself_in_a_fresh_venv(tmp_path):
    """A kernel with nothing installed: the install cell installs the checkout (not editable) and
    the next cell imports it from the venv's site-packages, in the same process."""
    repo = _copy_checkout(tmp_path / "repo")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   check=True, capture_output=True, text=True).stdout.strip()
    assert site_packages != sysconfig.get_path("purelib")
    probe = subprocess.run([python, "-c", "import importlib.util; print(importlib.util.find_spec('jax'))"],
                           check=True, capture_output=True, text=True)
    assert probe.stdout.strip() == "None"        # truly fresh: the install cell has everything to do
    proc = _run_notebook(python, repo, tmp_path, timeout=1500)
    found = re.search(r"^t5gemma2_jax from (.+)$", proc.stdout, re.M)
    assert found, proc.stdout[-2000:]
    assert Path(found.group(1)) == Path(site_packages) / "t5gemma2_jax"
    _assert_trained(proc, tmp_path)


def test_outside_a_checkout_the_install_cell_asks_for_the_repository_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("T5GEMMA2_REPO_URL", raising=False)
    if Path("/content").is_dir():
        pytest.skip("/content exists here (a Colab runtime): the clone directory is not under HOME")
    with pytest.raises(RuntimeError, match="not inside a checkout of t5gemma2-jax: set REPO_URL"):
        exec(compile(_code_cells()[0], "install cell", "exec"), {})


def _install_command(tmp_path: Path, monkeypatch, device_tree: Path) -> list[str]:
    """The pip command the install cell runs, in a copy of the checkout whose `hardware.py` reads
    `device_tree` instead of `/` (the TPU this machine lacks); pip itself is recorded, not run."""
    repo = tmp_path / "repo"
    for name in ("pyproject.toml", "configs/tiny.yaml", "constraints.txt"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes((ROOT / name).read_bytes())
    hardware = repo / "t5gemma2_jax" / "hardware.py"
    hardware.parent.mkdir(parents=True)
    reads_tree = f"\n_tpu_attached = tpu_attached\ntpu_attached = lambda root={str(device_tree)!r}: _tpu_attached(root)\n"
    hardware.write_text((ROOT / "t5gemma2_jax" / "hardware.py").read_text() + reads_tree)
    commands = []

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.chdir(repo)
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: commands.append(cmd))
    exec(compile(_code_cells()[0], "install cell", "exec"), {})
    (pip,) = commands
    return pip


def test_the_install_cell_adds_jax_tpu_at_the_tested_version_on_a_tpu(tmp_path, monkeypatch):
    tree = tmp_path / "tpu"
    (tree / "dev" / "vfio").mkdir(parents=True)
    (tree / "dev" / "vfio" / "0").write_text("")                # a Colab v5e-1 runtime
    jax_pin = next(ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln.startswith("jax=="))
    pip = _install_command(tmp_path, monkeypatch, tree)
    assert pip[-1] == "jax[tpu]==" + jax_pin.split("==")[1] and pip[pip.index("-c") + 1].endswith("constraints.txt")


def test_the_install_cell_installs_no_tpu_build_without_a_tpu(tmp_path, monkeypatch):
    tree = tmp_path / "cpu"
    (tree / "dev" / "vfio").mkdir(parents=True)
    (tree / "dev" / "vfio" / "vfio").write_text("")             # VFIO loaded, no device group
    pip = _install_command(tmp_path, monkeypatch, tree)
    assert not any("jax" in arg for arg in pip) and pip[-1] == str(tmp_path / "repo")
