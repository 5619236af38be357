"""Fit the error prior's constants (planner/errors.py) to ExLlamaV2's measurement table.

Model: rfn(uniform b bits, group g) = BASE_RFN[b] * GROUP_FACTOR[g]  (g64 = sqrt(g32 factor));
       rfn(mixed) = MIX_FACTOR * sqrt(sum_i p_i * rfn_i^2).
Least squares on log(rfn) over the 24 rows; 8 parameters (6 bit widths, the g32 factor, the mix factor).
Prints the fitted constants and per-row residuals; writes benchmarks/results/error_prior_fit.json.
Needs SciPy (pip install scipy) for its Nelder-Mead minimizer; the planner itself does not.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.errors import EXLLAMAV2_TABLE  # noqa: E402
from planner.formats import parse_option  # noqa: E402

BITS = (2, 3, 4, 5, 6, 8)


def model(p: np.ndarray, slices: tuple, group: int) -> float:
    base = dict(zip(BITS, np.exp(p[:6])))
    g = {128: 1.0, 64: np.sqrt(p[6]), 32: p[6]}[group]
    mean_sq = sum(f * (base[b] * g) ** 2 for f, b in slices)
    return (p[7] if len(slices) > 1 else 1.0) * np.sqrt(mean_sq)


def main() -> None:
    from scipy.optimize import minimize

    rows = [(parse_option(name), rfn) for name, rfn in EXLLAMAV2_TABLE]
    loss = lambda p: sum((np.log(model(p, o.slices, o.group_size)) - np.log(r)) ** 2 for o, r in rows)  # noqa: E731
    p0 = np.array([np.log(x) for x in (0.23, 0.11, 0.057, 0.029, 0.015, 0.0095)] + [0.93, 1.0])
    res = minimize(loss, p0, method="Nelder-Mead", options=dict(maxiter=20000, xatol=1e-7, fatol=1e-12))
    p = res.x
    fit = {"BASE_RFN": {b: round(float(np.exp(v)), 5) for b, v in zip(BITS, p[:6])},
           "GROUP_FACTOR_32": round(float(p[6]), 4), "MIX_FACTOR": round(float(p[7]), 4),
           "rms_log_error": round(float(np.sqrt(res.fun / len(rows))), 4)}
    resid = []
    for (name, rfn), (o, _) in zip(EXLLAMAV2_TABLE, rows):
        pred = model(p, o.slices, o.group_size)
        resid.append({"option": name, "measured": rfn, "prior": round(float(pred), 5), "rel_err": round(pred / rfn - 1, 4)})
        print(f"{name:30s} {rfn:8.5f} {pred:8.5f} {pred / rfn - 1:+6.1%}")
    print(json.dumps(fit))
    out = ROOT / "benchmarks/results/error_prior_fit.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fit": fit, "rows": resid}, indent=1))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
