"""What the benchmark scripts share: the CPU's name and an atomic JSON write."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from planner.yamlout import write_atomic  # noqa: E402


def cpu_name() -> str:
    """/proc/cpuinfo's model name (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(doc: dict, path: Path) -> None:
    """Indented JSON, written atomically (a temporary file, then a rename)."""
    write_atomic(path, json.dumps(doc, indent=1) + "\n")
