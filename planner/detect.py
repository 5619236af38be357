"""What this machine has: its NVIDIA GPUs (NVML if installed, else nvidia-smi) and its RAM."""
from __future__ import annotations

import os
import shutil
import subprocess


class DetectError(RuntimeError):
    """No GPU could be detected."""


def _nvml() -> list[tuple[str, int]] | None:
    try:
        import pynvml  # optional: nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            out.append((name.decode() if isinstance(name, bytes) else name, int(pynvml.nvmlDeviceGetMemoryInfo(h).total)))
        return out or None
    except pynvml.NVMLError:
        return None


def parse_nvidia_smi(text: str) -> list[tuple[str, int]]:
    """'NVIDIA GeForce RTX 4090, 24564' lines (csv,noheader,nounits) -> [(name, bytes)]. A GPU on unified memory
    (the GB10 of a DGX Spark) reports no total ('[N/A]'): it is listed with 0 bytes, meaning not reported."""
    out = []
    for line in text.strip().splitlines():
        name, _, mib = line.rpartition(",")
        mib = mib.strip()
        if name.strip() and (mib.isdigit() or mib.strip("[]") in ("N/A", "Not Supported")):
            out.append((name.strip(), int(mib) * 1024 * 1024 if mib.isdigit() else 0))
    return out


def detect_gpus() -> list[tuple[str, int]]:
    """(name, total memory bytes) per GPU; raises DetectError when none is found."""
    found = _nvml()
    if found:
        return found
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise DetectError("--gpu auto found no GPU (no NVML, no nvidia-smi); name the card with --gpu NAME")
    try:
        res = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DetectError(f"--gpu auto: nvidia-smi failed ({exc}); name the card with --gpu NAME") from None
    found = parse_nvidia_smi(res.stdout) if res.returncode == 0 else []
    if not found:
        raise DetectError("--gpu auto: nvidia-smi lists no GPU; name the card with --gpu NAME")
    return found


def host_ram_bytes() -> int:
    """This machine's physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30     # unknown platform: a common desktop size; --ram overrides
