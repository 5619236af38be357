"""Published runs (benchmarks/published/measurements.yaml) matched to hwdb: which card, which model, or why not.

calibrate_speed.py fits the roofline's efficiency factors to some of these rows; validate_published.py predicts
the rest with the planner's engine models. Both read the rows through `load()`, so a row is matched the same way
in each.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

import hwdb
from hwdb import GPUSpec, ModelSpec

DATA = Path(__file__).resolve().parent / "published" / "measurements.yaml"

# The backends a vendor's users run llama.cpp on; other pairs (an NVIDIA card on Vulkan) measure a backend
# no plan would choose for that card.
NATIVE_BACKENDS = {"nvidia": ("cuda",), "apple": ("metal",), "amd": ("rocm", "vulkan"), "intel": ("vulkan", "sycl")}
# Names hwdb would resolve (its 'h100' alias means the SXM card) but whose rows do not say which form factor
# ran (published/README.md, group 1): H100 SXM and PCIe differ by 68% in bandwidth. ('A100 80GB' stays: its
# SXM4 and PCIe cards share the 1,410 MHz clock and differ by 5% in bandwidth, 2,039 against 1,935 GB/s; it is
# matched as the SXM4 card, which the database's alias means.)
FORM_FACTOR_UNKNOWN = {"NVIDIA H100 80GB"}
# Model names as the sources write them, where hwdb's own names and aliases do not match. LLaMA (v1) 7B and 13B
# have Llama 2 7B's and 13B's tensors exactly (same widths, layers and 32,000-token vocabulary); only the native
# context differs, which a decode benchmark does not reach.
MODEL_NAMES = {"LLaMA 7B": "llama2-7b", "LLaMA 13B": "llama2-13b", "Meta Llama 3.1 8B Instruct": "llama3.1-8b",
               "Mistral 7B Instruct v0.3": "mistral-7b-v0.3", "gemma-2 9B": "gemma2-9b"}


@dataclass(frozen=True)
class Row:
    """One published measurement and what it was matched to; `skip` says why it cannot be used ('' if it can)."""

    m: dict                         # the entry, as measurements.yaml has it
    gpu: Optional[GPUSpec]          # hwdb's card, or one built from the source's own bandwidth (Apple tables)
    model: Optional[ModelSpec]
    skip: str = ""

    @property
    def decode(self) -> bool:
        return self.m["test"] in ("tg128", "tg512", "decode")


def _gpu(db: hwdb.Database, m: dict) -> tuple[Optional[GPUSpec], str]:
    name = m["gpu"]
    if name in FORM_FACTOR_UNKNOWN:
        return None, "form factor not stated (SXM or PCIe)"
    try:
        gpu = db.find_gpu(name)
    except hwdb.HwdbError:
        same_chip = _apple_chip(db, name)
        if same_chip is not None:
            return same_chip, ""
        if m.get("source_bandwidth_gbs") and m["backend"] == "metal":
            # Apple's tables list each chip's bandwidth and GPU cores; nothing else of the card is used here
            gpu = GPUSpec(id="published", name=name, vendor="apple", architecture="Apple GPU",
                          compute_capability="apple", memory_bytes=2**40, memory_type="unified",
                          bandwidth_gb_s=float(m["source_bandwidth_gbs"]), fp16_tflops=1.0, int8_tops=0.0,
                          sm_count=int(m.get("gpu_cores") or 1), host_link="unified memory",
                          host_link_gb_s=float(m["source_bandwidth_gbs"]), display=True, source=m["source"])
            return gpu, ""
        return None, "card not in hwdb"
    if m["backend"] not in NATIVE_BACKENDS[gpu.vendor]:
        return None, f"{m['backend']} backend on an {gpu.vendor} card"
    return gpu, ""


def _apple_chip(db: hwdb.Database, name: str) -> Optional[GPUSpec]:
    """'Apple M3 Max 40-Core GPU 64GB' as hwdb's entry for the same chip and GPU core count with another memory
    size: Apple gives one memory bandwidth per chip and core count (M3 Max 40-core: 400 GB/s with 48 to 128 GB),
    and nothing else of the card is used here."""
    hit = re.match(r"Apple (M\d(?: Pro| Max| Ultra)?) \(?(\d+)-core GPU", name, re.IGNORECASE)
    if not hit:
        return None
    prefix = f"apple {hit.group(1).lower()} ({hit.group(2)}-core gpu"
    same = [g for g in db.gpus.values() if g.vendor == "apple" and g.name.lower().startswith(prefix)]
    return same[0] if len(same) == 1 else None


def _model(db: hwdb.Database, name: str) -> Optional[ModelSpec]:
    for key in (MODEL_NAMES.get(name), name, re.sub(r"\s*\(.*\)$", "", name)):
        if key:
            try:
                return db.find_model(key)
            except hwdb.HwdbError:
                pass
    return None


def load(db: Optional[hwdb.Database] = None) -> list[Row]:
    """Every single-sequence measurement, matched (or not) to a card and a model."""
    db = db or hwdb.load()
    data = yaml.safe_load(DATA.read_text())
    rows = []
    for m in data["measurements"]:
        gpu, why = _gpu(db, m)
        model = _model(db, m["model"])
        if not why and model is None:
            why = "model not in hwdb"
        rows.append(Row(m, gpu, model, why))
    return rows


def spilled(row: Row, weights_bytes: float) -> bool:
    """Whether the run's weights exceed its cards' memory: it spilled (swapped, or the driver paged), so it measures
    something no plan would choose. The fit and the validation both leave such rows out."""
    return weights_bytes > row.gpu.memory_bytes * row.m["gpu_count"]
