"""Speed predictions: decode is bound by bytes moved per token, prefill by tensor throughput.

  decode s/token = sum over tiers (VRAM, host link, CPU RAM, disk) of bytes / (efficiency x peak)
                   + a fixed per-token overhead (kernel launches, synchronization, sampling)
  prefill s/chunk = max(GEMM FLOPs / (efficiency x fp16 peak), weight bytes / (efficiency x bandwidth))

The efficiency factors are fit by benchmarks/calibrate_speed.py to published llama.cpp runs
(benchmarks/published/measurements.yaml): Llama 2 7B llama-bench tg128 and pp512 rows, per GPU
vendor. They stand for a mature engine until vramwise's own engines are measured (GPU speed issue).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Efficiency:
    """How close an engine gets to a device's peaks; each field says how it was measured."""

    decode_bandwidth: float       # share of peak memory bandwidth while streaming weights in decode
    token_overhead_s: float       # fixed seconds per decoded token
    prefill_compute: float        # share of dense fp16 tensor peak in prefill GEMMs
    fit: str                      # the data and residual of the fit


# Fit by `python benchmarks/calibrate_speed.py` (output: benchmarks/results/calibration.json) on
# llama.cpp llama-bench runs of Llama 2 7B (Q4_0 / Q8_0 / F16), tg128 and pp512. Prefill efficiency
# is relative to the fp16 (fp32-accumulate) peak; llama.cpp's int8 MMQ kernels can exceed it.
EFFICIENCY = {
    "nvidia": Efficiency(0.842, 0.00094, 0.978, "6 CUDA GPUs (RTX 3090-5090); decode median |err| 1.4%, max 10%"),
    "apple": Efficiency(0.919, 0.00591, 0.694, "Metal, 79 decode / 27 prefill rows (M1-M4); median |err| 3.2% / 3.3%"),
    "amd": Efficiency(0.869, 0.00094, 0.405, "one row (RX 7900 XTX, Vulkan); overhead borrowed from NVIDIA"),
    "intel": Efficiency(0.842, 0.00094, 0.978, "no published rows matched hwdb: NVIDIA's factors"),
}

# Host side. Copies over PCIe run at hwdb's practical host_link_gb_s (already ~80% of the link).
# CPU decode of offloaded layers reads them from RAM; llama.cpp's CPU backend reaches about 60%
# of STREAM-measured DRAM bandwidth in decode (ggml-org/llama.cpp discussions on CPU inference).
CPU_DECODE_BANDWIDTH_EFFICIENCY = 0.6
# Defaults when the user does not say: dual-channel DDR5-4800 (2 x 38.4 GB/s theoretical) and a
# PCIe 3.0 x4 NVMe SSD's sequential read (3.5 GB/s, e.g. Samsung 970 EVO Plus datasheet).
DEFAULT_CPU_BANDWIDTH_GB_S = 76.8
DEFAULT_DISK_GB_S = 3.5


@dataclass(frozen=True)
class Traffic:
    """Bytes one decoded token moves through each tier, and seconds of fixed overhead."""

    vram_bytes: float = 0.0
    link_bytes: float = 0.0
    cpu_bytes: float = 0.0
    disk_bytes: float = 0.0
    overhead_s: float = 0.0


def decode_seconds(t: Traffic, eff: Efficiency, bandwidth_gb_s: float, link_gb_s: float,
                   cpu_gb_s: float, disk_gb_s: float, overlap: bool = False) -> float:
    """Seconds per token. overlap: transfers run beside compute (prefetch), so the slower one counts."""
    gpu = t.vram_bytes / (eff.decode_bandwidth * bandwidth_gb_s * 1e9)
    link = t.link_bytes / (link_gb_s * 1e9)
    cpu = t.cpu_bytes / (CPU_DECODE_BANDWIDTH_EFFICIENCY * cpu_gb_s * 1e9)
    disk = t.disk_bytes / (disk_gb_s * 1e9)
    moved = max(gpu, link + disk) if overlap else gpu + link + disk
    return moved + cpu + t.overhead_s


def prefill_seconds(flops: float, weight_bytes: float, eff: Efficiency, tflops: float,
                    bandwidth_gb_s: float) -> float:
    """Seconds for one prefill chunk on the device: compute- or bandwidth-bound, whichever is slower."""
    compute = flops / (eff.prefill_compute * tflops * 1e12)
    memory = weight_bytes / (eff.decode_bandwidth * bandwidth_gb_s * 1e9)
    return max(compute, memory)
