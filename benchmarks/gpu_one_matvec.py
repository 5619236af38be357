"""Launch one decode matvec (Llama-2-7B's 4096x4096 at 1:4b g128) a few times, in the block shape
gpu_kernels.py chose: a target for a profiler (ncu -k regex:qmatvec ... python3 benchmarks/gpu_one_matvec.py).
Neither a test nor a benchmark: it prints nothing but the shape it ran."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchlib import ROOT

from gpu_decode import random_linear  # noqa: E402
from planner.formats import parse_option  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matvec-from", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_kernels.json",
                    help="gpu_kernels.py's JSON")
    ap.add_argument("--launches", type=int, default=5)
    args = ap.parse_args(argv)
    import cupy as cp

    from gpuengine import launch
    from gpuengine.layout import build_image, views
    best = json.loads(args.matvec_from.read_text())["matvec_best"]
    launch.MATVEC = launch.MatvecShape.from_json(best)
    rng = np.random.default_rng(0)
    image = build_image({"w": random_linear(rng, parse_option("1:4b g128"), 4096, 4096)})
    w = views(cp.asarray(image.data), image)["w"]
    x, y = cp.asarray(rng.standard_normal(4096).astype(np.float32)), cp.empty(4096, cp.float32)
    for _ in range(args.launches):
        launch.matvec(x, y, w, None)
    cp.cuda.Device().synchronize()
    print("ran", best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
