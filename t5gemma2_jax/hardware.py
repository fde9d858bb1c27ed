"""Whether a TPU is attached, read from the machine's device tree without starting any backend.

Multi-host start-up (`parallel.maybe_initialize_distributed`) has to decide before JAX touches a
device, and the quickstart notebook before JAX is even installed (it runs this file from the
checkout: the module imports the standard library only). The evidence, in the order checked:

- a PCI function of Google's vendor id 0x1ae0 whose device id is a TPU chip's (how JAX's own
  `hardware_utils` counts TPU chips; the vendor alone is not enough, Google's virtual NIC and
  local SSDs carry it too);
- `/dev/accel*` (TPU v2 to v4 VMs);
- numbered VFIO groups `/dev/vfio/<n>` (TPU v5e, v5p, v6e VMs and current Colab TPU runtimes;
  `/dev/vfio/vfio` alone is the kernel's container device and appears on any host with VFIO loaded).

`root` is the file system root to read (`/`; tests pass a fake tree).
"""

from __future__ import annotations

import os
from pathlib import Path

GOOGLE_PCI_VENDOR = "0x1ae0"
# TPU chips' PCI device ids, as JAX's `jax._src.hardware_utils` lists them (copied because this
# must run where JAX is not installed yet).
TPU_PCI_DEVICES = {
    "0x0027": "v3", "0x0056": "plc", "0x005e": "v4", "0x0062": "v5p", "0x0063": "v5e",
    "0x006f": "v6e", "0x0076": "tpu7x",
}


def _read(path: Path) -> str:
    try:
        return path.read_text().strip().lower()
    except OSError:
        return ""


def tpu_pci_chips(root: str | os.PathLike = "/") -> list[str]:
    """The TPU generation of each TPU chip on the PCI bus (`['v5e', 'v5e', ...]`)."""
    chips = []
    devices = Path(root, "sys/bus/pci/devices")
    if not devices.is_dir():
        return chips
    for dev in sorted(devices.iterdir()):
        if _read(dev / "vendor") == GOOGLE_PCI_VENDOR and _read(dev / "device") in TPU_PCI_DEVICES:
            chips.append(TPU_PCI_DEVICES[_read(dev / "device")])
    return chips


def tpu_evidence(root: str | os.PathLike = "/") -> str | None:
    """What shows a TPU attached (one phrase for logs), or None."""
    chips = tpu_pci_chips(root)
    if chips:
        return f"{len(chips)} TPU {chips[0]} chip(s) on the PCI bus (vendor {GOOGLE_PCI_VENDOR})"
    dev = Path(root, "dev")
    accel = sorted(p.name for p in dev.glob("accel*")) if dev.is_dir() else []
    if accel:
        return f"TPU device files /dev/{accel[0]} ({len(accel)} in all)"
    vfio = Path(dev, "vfio")
    groups = sorted(p.name for p in vfio.iterdir() if p.name.isdigit()) if vfio.is_dir() else []
    if groups:
        return f"VFIO device groups /dev/vfio/{groups[0]} ({len(groups)} in all)"
    return None


def tpu_attached(root: str | os.PathLike = "/") -> bool:
    return tpu_evidence(root) is not None


def gpu_attached(root: str | os.PathLike = "/") -> bool:
    """An NVIDIA (`/dev/nvidiactl`) or AMD (`/dev/kfd`) GPU driver's control device is present."""
    return Path(root, "dev/nvidiactl").exists() or Path(root, "dev/kfd").exists()


def accelerator(environ=os.environ, root: str | os.PathLike = "/") -> str | None:
    """The accelerator JAX would run on here ("tpu", "gpu", or the first non-CPU name of
    `JAX_PLATFORMS` when that is set), or None for a CPU-only host."""
    names = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if names:
        return next((n for n in names if n != "cpu"), None)
    if tpu_attached(root):
        return "tpu"
    return "gpu" if gpu_attached(root) else None
