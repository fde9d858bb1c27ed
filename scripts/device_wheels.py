#!/usr/bin/env python
"""The wheels a GPU machine's own Python lacks, taken there as files and installed without a registry.

    python scripts/device_wheels.py prepare [--dir .device/wheels]          # here, with PyPI
    python scripts/device_wheels.py install [--dir .device/wheels] --target /tmp/site   # there
    python scripts/device_wheels.py check                                    # there

The machine runs its image's own Python (3.12, manylinux x86_64: `scripts/gpu_image.txt` lists its
distributions), with no package registry. `prepare` resolves the package's requirements
(pyproject.toml) for that platform with pip, the image's known versions pinned, keeps every
distribution of the result the image does not hold, and downloads those wheels into one folder;
a requirement published only as a source archive (rouge-score) is built into a pure-Python wheel
first. `install` puts the folder's wheels into a directory for PYTHONPATH (`pip install --no-index
--no-deps --target`), leaving the image's own packages as they are. `check` says, one line per
requirement, which installed version meets it, and fails in one line naming those that none does.
The package itself is not a wheel: the commands run from the checkout, with it on PYTHONPATH.

Standard library only (and pip), so the same file runs here and on the machine's bare Python.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = Path(__file__).with_name("gpu_image.txt")
WHEELS = ROOT / ".device" / "wheels"
# What travels to the machine with the checkout is capped at 64 MiB in all; the wheels leave room
# for the tree itself.
MAX_BYTES = 56 * 2**20
PYTHON_VERSION = "3.12"
# pip matches manylinux tags exactly: every tag a wheel for the image's glibc may carry.
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64")


class WheelError(Exception):
    """A requirement that cannot be met (resolution, download, or what is installed)."""


def canonical(name: str) -> str:
    """PEP 503's normalised project name: the image's list and pip's report spell names differently."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The package's runtime requirements (not the extras: the test reference, torch and
    transformers, is the image's own)."""
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def image_packages(path: Path = IMAGE) -> dict[str, str | None]:
    """{canonical name: version or None} of the image's distributions."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonical(name)] = version or None
    return out


def missing(resolved: list[tuple[str, str]], image: dict[str, str | None]) -> list[tuple[str, str]]:
    """The (name, version) pairs of a resolution that the image does not hold, sorted by name."""
    return sorted((n, v) for n, v in resolved if canonical(n) not in image)


def _pip(*args: str, quiet: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args] + (["-q"] if quiet else [])
    return subprocess.run(cmd, capture_output=True, text=True)


def _target_flags() -> list[str]:
    flags = ["--python-version", PYTHON_VERSION, "--implementation", "cp", "--only-binary=:all:"]
    for p in PLATFORMS:
        flags += ["--platform", p]
    return flags


_NO_MATCH = re.compile(r"No matching distribution found for ([A-Za-z0-9_.\-]+)")


def resolve(reqs: list[str], image: dict[str, str | None], wheel_dir: Path,
            index_args: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Every distribution (name, version) that `reqs` need on the target platform, as pip resolves
    them with the image's known versions pinned. A requirement with no wheel for any platform is
    built here from its source archive into a pure-Python wheel in `wheel_dir`, which the next
    attempt finds. `index_args`: where pip looks (default: its configured index)."""
    built: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        pins = Path(tmp) / "image-pins.txt"
        pins.write_text("".join(f"{n}=={v}\n" for n, v in image.items() if v))
        report = Path(tmp) / "report.json"
        while True:
            r = _pip("install", "--dry-run", "--ignore-installed", "--report", str(report), "--target",
                     str(Path(tmp) / "target"), "--find-links", str(wheel_dir), "-c", str(pins),
                     *index_args, *_target_flags(), *reqs, quiet=False)   # its conflict report is not -q
            if r.returncode == 0:
                return [(i["metadata"]["name"], i["metadata"]["version"])
                        for i in json.loads(report.read_text())["install"]]
            m = _NO_MATCH.search(r.stderr)
            if not m or canonical(m.group(1)) in built:
                raise WheelError(f"pip could not resolve the requirements: {_last_line(r.stdout + r.stderr)}")
            built.add(canonical(m.group(1)))
            build_pure_wheel(m.group(1), wheel_dir, ("-c", str(pins), *index_args))


def build_pure_wheel(requirement: str, wheel_dir: Path, pip_args: tuple[str, ...] = ()) -> Path:
    """Build `requirement` from its source archive into `wheel_dir`; only a pure-Python wheel
    (py3-none-any) installs on the target platform, anything else is an error."""
    before = set(wheel_dir.glob("*.whl"))
    r = _pip("wheel", "--no-deps", "--no-binary", ":all:", "--wheel-dir", str(wheel_dir), *pip_args, requirement)
    built = sorted(set(wheel_dir.glob("*.whl")) - before)
    if r.returncode != 0 or not built:
        raise WheelError(f"no wheel of {requirement} for Python {PYTHON_VERSION}, and it does not build: "
                         f"{_last_line(r.stderr)}")
    if not built[0].name.endswith("-py3-none-any.whl") and not built[0].name.endswith("-py2.py3-none-any.whl"):
        built[0].unlink()
        raise WheelError(f"{requirement} has no wheel for Python {PYTHON_VERSION} and its build is not pure Python")
    return built[0]


def _wheel_name(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return canonical(name), version


def prepare(wheel_dir: Path = WHEELS, reqs: list[str] | None = None, image: dict[str, str | None] | None = None,
            max_bytes: int = MAX_BYTES, index_args: tuple[str, ...] = ()) -> list[Path]:
    """Download into `wheel_dir` the wheel of every distribution the image lacks; wheels of other
    distributions or versions left there by an earlier run are removed. Returns the wheels.
    `index_args`: where pip looks (default: its configured index)."""
    reqs = requirements() if reqs is None else reqs
    image = image_packages() if image is None else image
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wanted = missing(resolve(reqs, image, wheel_dir, index_args), image)
    keys = {(canonical(n), v) for n, v in wanted}
    for stale in [p for p in wheel_dir.glob("*.whl") if _wheel_name(p) not in keys]:
        stale.unlink()
    have = {_wheel_name(p) for p in wheel_dir.glob("*.whl")}
    todo = [f"{n}=={v}" for n, v in wanted if (canonical(n), v) not in have]
    if todo:
        r = _pip("download", "--no-deps", "--dest", str(wheel_dir), *index_args, *_target_flags(), *todo)
        if r.returncode != 0:
            raise WheelError(f"pip could not download {' '.join(todo)}: {_last_line(r.stderr)}")
    wheels = sorted(wheel_dir.glob("*.whl"))
    got = {_wheel_name(p) for p in wheels}
    if got != keys:
        raise WheelError(f"the wheel folder does not match the resolution: missing {sorted(keys - got)}")
    total = sum(p.stat().st_size for p in wheels)
    if total > max_bytes:
        raise WheelError(f"the wheels take {total / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB "
                         "that may travel with the checkout")
    return wheels


def install(wheel_dir: Path, target: Path) -> list[str]:
    """Install every wheel of `wheel_dir` into `target` from the folder alone (no index, no
    dependency resolution: the folder is the resolution). Returns the installed names."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise WheelError(f"no wheels in {wheel_dir}: run scripts/gpu_check.sh --prepare where PyPI is reachable")
    r = _pip("install", "--no-index", "--find-links", str(wheel_dir), "--no-deps", "--no-compile",
             "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels))
    if r.returncode != 0:
        raise WheelError(f"installing the wheels of {wheel_dir} failed: {_last_line(r.stderr)}")
    return [_wheel_name(p)[0] for p in wheels]


def check(reqs: list[str] | None = None) -> list[str]:
    """One line per requirement with the installed version that meets it; a WheelError naming
    every requirement that nothing installed meets (as the running interpreter sees them)."""
    from packaging.requirements import Requirement   # the image has packaging; pip needs no install

    lines, unmet = [], []
    for text in requirements() if reqs is None else reqs:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{text} (not installed)")
            continue
        if not req.specifier.contains(version, prereleases=True):
            unmet.append(f"{text} (installed {version})")
            continue
        lines.append(f"{req.name} {version}")
    if unmet:
        raise WheelError("unmet requirements: " + ", ".join(unmet))
    return lines


def _last_line(text: str) -> str:
    """pip's reason in one line: the conflict's causes where it names them, else its errors."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    if "The conflict is caused by:" in lines:
        causes = lines[lines.index("The conflict is caused by:") + 1:]
        causes = causes[:next((i for i, ln in enumerate(causes) if ln.startswith(("To fix", "Additionally"))), None)]
        return "conflict: " + "; ".join(causes)
    errors = [ln for ln in lines if ln.startswith("ERROR:") and "ResolutionImpossible" not in ln]
    return " ".join(errors) if errors else (lines[-1] if lines else "(no output)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="download the wheels the GPU image lacks (needs PyPI)")
    pp.add_argument("--dir", type=Path, default=WHEELS)
    pi = sub.add_parser("install", help="install a wheel folder into a PYTHONPATH directory, no index")
    pi.add_argument("--dir", type=Path, default=WHEELS)
    pi.add_argument("--target", type=Path, required=True)
    sub.add_parser("check", help="every requirement of pyproject.toml is met by what is installed")
    a = p.parse_args(argv)
    try:
        if a.command == "prepare":
            wheels = prepare(a.dir)
            total = sum(w.stat().st_size for w in wheels)
            print("\n".join(w.name for w in wheels))
            print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {a.dir}")
        elif a.command == "install":
            names = install(a.dir, a.target)
            print(f"installed into {a.target}: {' '.join(names)}")
        else:
            print("\n".join(check()))
    except WheelError as e:
        print(f"error: device_wheels.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
