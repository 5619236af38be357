"""Speed predictions: decode is bound by bytes moved per token, prefill by tensor throughput.

  decode s/token = sum over tiers (VRAM, host link, CPU RAM, disk) of bytes / (efficiency x peak)
                   + layers x a fixed cost per layer in GPU clock cycles (kernel launches and latencies)
  prefill s/chunk = max(GEMM FLOPs / (efficiency x fp16 peak), weight bytes / (efficiency x bandwidth))

The efficiency factors are fit by benchmarks/calibrate_speed.py to published llama.cpp runs
(benchmarks/published/measurements.yaml): Llama 2 7B llama-bench tg128 and pp512 rows, per GPU
vendor, and AMD's GCN-lineage chips apart (efficiency_group). Plans for vramwise's own CUDA engine (an NVIDIA card) use its measured model instead
(EngineSpeed, VRAMWISE_CUDA: benchmarks/calibrate_engine.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hwdb import GPUSpec


@dataclass(frozen=True)
class Efficiency:
    """How close an engine gets to a device's peaks; each field says how it was measured."""

    decode_bandwidth: float       # share of peak memory bandwidth while streaming weights in decode
    layer_cycles: float           # fixed GPU clock cycles per decoded layer (kernel launches and latencies)
    prefill_compute: float        # share of dense fp16 tensor peak in prefill GEMMs
    fit: str                      # the data and residual of the fit
    reference_clock_mhz: float    # the clock taken for a card with none in hwdb (Apple): the fit took it too

    def clock_hz(self, gpu: "GPUSpec") -> float:
        """The clock this card's cycle counts are priced at: its rated boost clock, else the fit's reference."""
        return (gpu.boost_clock_mhz or self.reference_clock_mhz) * 1e6

    def layer_seconds(self, gpu: "GPUSpec") -> float:
        """Fixed seconds a decoded layer costs on this card: the fitted cycles at its rated boost clock."""
        return self.layer_cycles / self.clock_hz(gpu)

    def decode_overhead_s(self, gpu: "GPUSpec", layers: int) -> float:
        """Fixed seconds per decoded token of a model with this many layers."""
        return layers * self.layer_seconds(gpu)


# Fit by `python benchmarks/calibrate_speed.py` (output: benchmarks/results/calibration.json) on
# llama.cpp llama-bench runs of Llama 2 7B (Q4_0 / Q8_0 / F16), tg128 and pp512:
#   seconds per token = bytes read / (decode_bandwidth x peak bandwidth) + layers x layer_cycles / boost clock.
# The fixed part is counted in clock cycles a layer: on published runs it explains why cards with fast memory
# and slow clocks (A100 at 1,410 MHz) fall furthest short of their bandwidth, and why a 70B model (80 layers)
# pays more than a 7B one (32), where a fixed time per token did not (benchmarks/validate_published.py: held-out
# rows). Prefill efficiency is relative to the fp16 (fp32-accumulate) peak; llama.cpp's int8 MMQ kernels can
# exceed it on GeForce cards, whose fp32-accumulate rate is half their tensor rate, and reach far less of it on
# full-rate cards (A100: 21%, RTX PRO 6000: 40-44%; calibration.json). NVIDIA's figure prices nothing: plans for
# NVIDIA cards use vramwise's engine model below, and the other targets predict decode only.
EFFICIENCY = {
    "nvidia": Efficiency(0.903, 106000, 0.971, "llama-bench, 10 CUDA cards (Tesla P40 to RTX 5090, A100, RTX PRO 6000); "
                         "decode median |err| 3.5%, max 23%", 2429.5),
    "apple": Efficiency(0.922, 187000, 0.694, "Metal, 77 decode / 65 prefill rows (M1-M4); median |err| 3.3% / 3.1%; "
                        "no clocks: 187 us a layer", 1000.0),
    "amd": Efficiency(0.950, 167000, 0.329, "ROCm and Vulkan, 6 rows (RX 7900 XTX, RX 9070 / 9070 XT, W7900, R9700); "
                      "bandwidth held at the 95% cap; decode median |err| 14%, max 49%", 2510.0),
    "intel": Efficiency(0.543, 106000, 0.090, "Vulkan, 2 rows (Arc A770, B580), cycles borrowed from NVIDIA; "
                        "decode |err| 14% and 36%", 2385.0),
    # AMD's wave64 GCN-lineage chips in llama.cpp's ROCm build (GCN_DECODE_ARCHS): published runs read well under
    # half their HBM2 bandwidth in decode, where RDNA cards reach the 95% cap; fit apart, with AMD's cycles.
    "amd-gcn": Efficiency(0.533, 167000, 0.619, "ROCm, 2 rows (MI50, MI100; the MI100's a transcription), cycles "
                          "borrowed from AMD; decode |err| 3.1% and 3.0%; 1 prefill row (MI50)", 1613.5),
}
# The chips the "amd-gcn" factors price (hwdb compute_capability): Vega 20 (Radeon VII, MI50/MI60) and CDNA 1
# (MI100), the ones with published llama.cpp runs. CDNA 2/3 (MI210, MI250X, MI300X) keep AMD's factors: no
# published llama.cpp decode run of theirs was found to say whether they share the shortfall.
GCN_DECODE_ARCHS = ("gfx906", "gfx908")


def efficiency_group(gpu: "GPUSpec") -> str:
    """The EFFICIENCY key that prices this card: its vendor's, or AMD's GCN-lineage group."""
    return "amd-gcn" if gpu.vendor == "amd" and gpu.compute_capability in GCN_DECODE_ARCHS else gpu.vendor


def efficiency(gpu: "GPUSpec") -> Efficiency:
    """The efficiency factors that price this card (efficiency_group)."""
    return EFFICIENCY[efficiency_group(gpu)]


def memory_bandwidth(gpu: GPUSpec, eff: Efficiency) -> float:
    """The bandwidth decode is priced against: the rated one, unless a measured copy rate (hwdb's
    measured_copy_gb_s) shows the memory delivers less than eff.decode_bandwidth of it; then that rate is the
    ceiling of decode's reads (the Strix Halo iGPU copies at 212 of its 256 GB/s, where discrete cards reach
    85-93%)."""
    if gpu.measured_copy_gb_s:
        return min(gpu.bandwidth_gb_s, gpu.measured_copy_gb_s / eff.decode_bandwidth)
    return gpu.bandwidth_gb_s


@dataclass(frozen=True)
class EngineSpeed:
    """vramwise's own CUDA engine (gpuengine), as measured: its decode matvecs are bound by decoding codes
    (instruction issue and latency), not by bytes, on a card as fast as an H200, so a step costs the larger
    of its weight bytes at the bandwidth its kernels reach and its weights at the rate they decode, plus
    the KV cache at attention's rate and a cost per layer (launches, norms, RoPE and cache store) and per
    token (final norm, head launch, the host's step). Each field says how it was measured."""

    values_per_s_per_sm: float    # packed weights decoded per second per SM (scaled by hwdb sm_count)
    weight_bandwidth: float       # share of peak bandwidth the matvecs reach where bytes bind
    kv_read_per_s_per_sm: float   # cache bytes decode attention reads per second per SM, a KV head's rows
                                  # counted once per query head (a block per query head reads them so)
    layer_overhead_s: float       # per layer per decoded token
    token_overhead_s: float       # per decoded token
    prefill_compute: float        # share of fp16 peak in prefill FLOPs
    prefill_layer_s: float        # per layer per prefill chunk (tile dequantization, attention, launches)
    fit: str
    # The rated boost clock of the card the fit was measured on. On another card the decode rate per SM and the
    # fixed costs scale with its own boost clock (both are instruction issue and latency, counted in cycles);
    # a card with no clock in hwdb is taken at this one.
    clock_mhz: float = 1980.0
    # Whether the engine copies streamed layers beside compute (gpuengine.schedule): the engine's default
    # (gpuengine.model.OVERLAP) is this, so a plan prices streaming the way the engine runs it.
    overlap_streaming: bool = False
    # One small launch more a layer, for a kernel the fit's models did not run (Qwen3's two head norms, a mixed
    # option's gather): the top of the range the H200 measured for its small kernels graph-replayed (RoPE, cache
    # store, SwiGLU, an empty launch: 1.6 to 3.8 us, benchmarks/results/gpu_kernels.json).
    small_launch_s: float = 2.7e-6
    # Routed experts (benchmarks/calibrate_engine.py's MoE fit, exact on two runs: Qwen3-30B-A3B and a Mixtral
    # 8x7B shape built with 8 layers, benchmarks/results/gpu_decode_moe.json). Decode: the experts' weights a
    # token multiplies, decoded at their own rate per SM (qmatvec_moe), and a cost per MoE layer (routing, the
    # weighted sum, the expert table's loads) in place of a Llama MLP's. Prefill as slots: a cost per slot per
    # layer beyond its values at the decode rate; grouped: a cost per expert some token took (the host's
    # ordering, its launches) and its values dequantized at their rate per SM (GEMM FLOPs are the chunk's).
    expert_values_per_s_per_sm: float = 0.0      # 0: values_per_s_per_sm
    moe_layer_s: float = 0.0
    moe_slot_s: float = 0.0
    moe_expert_s: float = 0.0
    dequant_values_per_s_per_sm: float = float("inf")


# Fit by `python benchmarks/calibrate_engine.py` (output benchmarks/results/engine_calibration.json) to
# benchmarks/results/gpu_decode.json, gpu_decode_moe.json and gpu_kernels.json: NVIDIA H200, 2026-11-28, runs 9
# and 10 (the unit-a-lane matvec, 8 rows x 4 warps). weight_bandwidth: the measured device copy rate (4,236
# GB/s) over the H200's 4,800 GB/s, the ceiling where bytes bind (they do not on the H200: untested);
# kv_read_per_s_per_sm: decode attention over 2,048 fp16 positions, 32 query heads on 32 KV heads (1,100 GB/s)
# over 132 SMs (32 on 8 KV heads took as long: run 9); the decode rate and overheads: least squares over
# SmolLM2-135M, the Llama-2-7B shape at 4.0 and 2.5 bpw and the Llama-2-70B shape built with 10 and 20 layers,
# decoding at 512 positions (the per-token cost came out negative, so it is 0: the head is in the weights
# term); prefill: solved on the 7B shape and SmolLM2 at 512 tokens; routed experts: solved on Qwen3-30B-A3B and
# an 8-layer Mixtral 8x7B shape (EngineSpeed's comments). Held out (gpu_decode.json's architectures): Llama 3
# 8B decode +5.7%, Qwen3-8B +4.2%, Gemma-2-9B +18.2% (its head dim of 256 and 256k vocabulary; prefill +71%:
# its attention takes the per-query kernel). Other NVIDIA cards: the H200's rates per SM and fixed costs,
# scaled by their rated boost clock over the H200's 1,980 MHz (EngineSpeed.clock_mhz; not measured on another
# card: their sustained clocks may sit above or below the rated boost).
VRAMWISE_CUDA = EngineSpeed(
    values_per_s_per_sm=3.278e+10, weight_bandwidth=0.8826, kv_read_per_s_per_sm=8.332e+09,
    layer_overhead_s=5.147e-05, token_overhead_s=0, prefill_compute=0.1979,
    prefill_layer_s=0.001017, overlap_streaming=True,
    expert_values_per_s_per_sm=2.341e+10, moe_layer_s=3.629e-05, moe_slot_s=2.098e-06,
    moe_expert_s=1.162e-05, dequant_values_per_s_per_sm=1.834e+09,
    fit="vramwise CUDA engine, NVIDIA H200 2026-11-28 (run 10): decode fit to 4 models, prefill to 2, routed experts to 2")


# vramwise's own engine by vendor: CUDA (CuPy) runs on NVIDIA cards; elsewhere plans keep the vendor factors
# above (the engine that would run them there is not measured).
ENGINE_SPEED = {"nvidia": VRAMWISE_CUDA}


def clock_ratio(e: EngineSpeed, gpu: "GPUSpec") -> float:
    return (gpu.boost_clock_mhz or e.clock_mhz) / e.clock_mhz


def engine_decode_seconds(e: EngineSpeed, weight_bytes: float, weight_values: float, kv_bytes: float,
                          layers: int, gpu: "GPUSpec", extra_launches: float = 0, expert_values: float = 0.0,
                          moe_layers: int = 0, kv_group: float = 1.0) -> float:
    """Device seconds of one decoded token on vramwise's CUDA engine (link and host time apart); extra_launches:
    small kernels a layer beyond the fitted models' (Qwen3's head norms: 2); expert_values: the share of
    weight_values that are routed experts' (decoded at their own rate), in moe_layers layers; kv_group: query
    heads a KV head (attention reads the cache once from memory, once per query head in its blocks)."""
    bw, clock = gpu.bandwidth_gb_s * 1e9, clock_ratio(e, gpu)
    per_layer = e.layer_overhead_s + extra_launches * e.small_launch_s
    dense_equivalent = weight_values + expert_values * (e.values_per_s_per_sm / _expert_rate(e) - 1)
    attention = max(kv_bytes / (e.weight_bandwidth * bw),
                    kv_bytes * kv_group / (e.kv_read_per_s_per_sm * gpu.sm_count * clock))
    return (engine_matvec_seconds(e, weight_bytes, dense_equivalent, gpu) + attention
            + (layers * per_layer + moe_layers * e.moe_layer_s + e.token_overhead_s) / clock)


def _expert_rate(e: EngineSpeed) -> float:
    return e.expert_values_per_s_per_sm or e.values_per_s_per_sm


def engine_matvec_seconds(e: EngineSpeed, weight_bytes: float, weight_values: float, gpu: "GPUSpec") -> float:
    """Device seconds of the decode matvecs over these weights: their bytes at the bandwidth the kernels reach,
    or their values at the rate they decode, whichever binds."""
    return max(weight_bytes / (e.weight_bandwidth * gpu.bandwidth_gb_s * 1e9),
               weight_values / (e.values_per_s_per_sm * gpu.sm_count * clock_ratio(e, gpu)))


def moe_prefill_seconds(e: EngineSpeed, tokens: int, k: int, experts: int, expert_values: float, sms: int,
                        clock: float = 1.0) -> tuple[float, float]:
    """Seconds of one layer's routed experts over a prefill chunk of `tokens`, (as slots, grouped); expert_values:
    one expert's gate, up and down weights; sms, clock: the card's SM count and its clock over the fit's. As
    slots (decode's expert launches) each of the tokens' k slots decodes its expert's values; grouped, each
    expert some token took (at most min(E, tokens k)) is dequantized once (its GEMMs' FLOPs are priced with
    the chunk's)."""
    slots = tokens * k * (e.moe_slot_s / clock + expert_values / (_expert_rate(e) * sms * clock))
    grouped = min(experts, tokens * k) * (e.moe_expert_s / clock
                                          + expert_values / (e.dequant_values_per_s_per_sm * sms * clock))
    return slots, grouped


def moe_prefill_grouped(e: EngineSpeed, tokens: int, k: int, experts: int, expert_values: float, sms: int) -> bool:
    """Whether the engine runs a prefill chunk's routed experts grouped (each expert's tokens in one GEMM) rather
    than as slots: whichever moe_prefill_seconds prices faster. The engine asks it with the device's SM count,
    a plan with hwdb's."""
    slots, grouped = moe_prefill_seconds(e, tokens, k, experts, expert_values, sms)
    return tokens > 1 and grouped < slots


def engine_prefill_seconds(e: EngineSpeed, flops: float, layers: int, gpu: "GPUSpec") -> float:
    """Device seconds of one prefill chunk on vramwise's CUDA engine (routed experts apart: moe_prefill_seconds)."""
    return flops / (e.prefill_compute * gpu.fp16_tflops * 1e12) + layers * e.prefill_layer_s / clock_ratio(e, gpu)


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
    in_place_bytes: float = 0.0     # of link_bytes: read over the link by the kernels as they run (routed experts
                                    # in host memory), so never overlapped with compute as copies can be


def decode_seconds(t: Traffic, eff: Efficiency, bandwidth_gb_s: float, link_gb_s: float,
                   cpu_gb_s: float, disk_gb_s: float, overlap: bool = False, gpu_s: float | None = None) -> float:
    """Seconds per token. overlap: transfers run beside compute (prefetch), so the slower one counts.
    gpu_s: the device's seconds where an engine model gives them (engine_decode_seconds; overheads included)."""
    if gpu_s is not None:
        t = dataclasses.replace(t, overhead_s=0.0)
    gpu = t.vram_bytes / (eff.decode_bandwidth * bandwidth_gb_s * 1e9) if gpu_s is None else gpu_s
    link = (t.link_bytes - t.in_place_bytes) / (link_gb_s * 1e9)
    in_place = t.in_place_bytes / (link_gb_s * 1e9)
    cpu = t.cpu_bytes / (CPU_DECODE_BANDWIDTH_EFFICIENCY * cpu_gb_s * 1e9)
    disk = t.disk_bytes / (disk_gb_s * 1e9)
    moved = (max(gpu, link + disk) if overlap else gpu + link + disk) + in_place
    return moved + cpu + t.overhead_s


def prefill_seconds(flops: float, weight_bytes: float, eff: Efficiency, tflops: float,
                    bandwidth_gb_s: float) -> float:
    """Seconds for one prefill chunk on the device: compute- or bandwidth-bound, whichever is slower."""
    compute = flops / (eff.prefill_compute * tflops * 1e12)
    memory = weight_bytes / (eff.decode_bandwidth * bandwidth_gb_s * 1e9)
    return max(compute, memory)
