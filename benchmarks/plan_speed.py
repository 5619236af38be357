"""Planner speed: the exact knapsack on an 80-layer model, and `vramwise plan` end to end.

Targets (issue 2): the optimizer well under 100 ms on 80 layers x ~25 options; `vramwise plan`
under 0.5 s on the 2-core CI machine, numba and cupy never imported.
Prints a table; writes benchmarks/results/plan_speed.json.
Usage: python benchmarks/plan_speed.py [--quick]
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hwdb  # noqa: E402
from planner.knapsack import solve  # noqa: E402
from planner.optimize import _items  # noqa: E402


def optimizer_times(model: str, budgets_bpw: np.ndarray, measured_like: bool) -> list[float]:
    """Milliseconds per exact solve over a sweep of budgets (prior errors, or noisy 'measured' ones)."""
    spec = hwdb.load().find_model(model)
    items = _items(spec, None)
    errors = items.errors
    if measured_like:           # per-layer noise, as real measurements have: no two layers alike
        rng = np.random.default_rng(0)
        errors = tuple(e * rng.uniform(0.7, 1.4, size=len(e)) for e in errors)
    out = []
    for bpw in budgets_bpw:
        t = time.perf_counter()
        sol = solve(items.sizes, errors, int(bpw * items.params / 8))
        out.append((time.perf_counter() - t) * 1e3)
        assert sol is not None and sol.exact
    return out


def cli_times(args: list[str], repeats: int) -> list[float]:
    """Seconds for `vramwise plan ...` as a fresh process (imports included)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "planner.cli", "plan", *args, "-o", f"{tmp}/plan.yaml", "--quiet"],
                           check=True, cwd=ROOT, capture_output=True)
            out.append(time.perf_counter() - t)
    return out


def main() -> None:
    quick = "--quick" in sys.argv
    budgets = np.linspace(2.2, 8.0, 12 if quick else 40)
    rows = []
    for model in ("llama2-70b", "llama3.1-405b"):
        for measured in (False, True):
            ms = optimizer_times(model, budgets, measured)
            rows.append({"what": f"knapsack {model} ({'measured-like' if measured else 'prior'} errors)",
                         "n": len(ms), "median": statistics.median(ms), "p90": float(np.percentile(ms, 90)),
                         "max": max(ms), "unit": "ms"})
    for args in (["--gpu", "rtx4090", "--model", "llama2-70b"], ["--gpu", "rtx3090", "--gpus", "2", "--model", "llama2-70b"],
                 ["--vram", "8GiB", "--bandwidth", "448GB/s", "--model", "llama3.1-405b"]):
        s = cli_times(args, 3 if quick else 7)
        rows.append({"what": "vramwise plan " + " ".join(args), "n": len(s), "median": statistics.median(s),
                     "p90": float(np.percentile(s, 90)), "max": max(s), "unit": "s"})
    print(f"{'what':78s} {'n':>3s} {'median':>9s} {'p90':>9s} {'max':>9s}")
    for r in rows:
        print(f"{r['what'][:78]:78s} {r['n']:3d} {r['median']:9.3f} {r['p90']:9.3f} {r['max']:9.3f} {r['unit']}")
    out = ROOT / "benchmarks/results/plan_speed.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                           "processor": platform.processor() or platform.machine()},
                               "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
