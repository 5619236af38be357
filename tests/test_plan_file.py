"""plan.yaml: stable keys, round trip, and refusal of plans that no longer fit or match."""
from __future__ import annotations

import yaml
import pytest
from hypothesis import given, settings, strategies as st

from planner.cli import main
from planner.plan import PlanFileError, load_plan, write_plan

STABLE = ["schema_version", "mode", "model.name", "model.params", "gpu.name", "gpu.count", "gpu.memory_bytes",
          "weights.avg_bpw", "weights.bytes", "weights.layers", "context.length", "kv_cache.dtype", "kv_cache.bytes",
          "memory.budget_bytes", "memory.total_bytes", "memory.items", "predicted.decode_tokens_per_s",
          "predicted.prefill_tokens_per_s", "predicted.time_to_first_token_s"]


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    assert main(["plan", "--gpu", "rtx3090", "--model", "llama2-13b", "-o", str(path), "--quiet"]) == 0
    return path


def get(doc, dotted):
    for key in dotted.split("."):
        doc = doc[key]
    return doc


def test_stable_keys_are_present(plan_path):
    doc = yaml.safe_load(plan_path.read_text())
    for key in STABLE:
        get(doc, key)
    assert sum(doc["memory"]["items"].values()) == doc["memory"]["total_bytes"] <= doc["memory"]["budget_bytes"]
    row = doc["weights"]["layers"][0]
    assert set(row) == {"name", "option", "bpw", "bytes"}
    assert doc["weights"]["quantized_bytes"] == sum(r["bytes"] for r in doc["weights"]["layers"])


def test_round_trip(plan_path, tmp_path):
    plan = load_plan(plan_path)
    again = tmp_path / "again.yaml"
    write_plan(plan.doc, again)
    assert load_plan(again).doc == plan.doc
    assert load_plan(again).layout == plan.layout


def edit(plan_path, tmp_path, change):
    doc = yaml.safe_load(plan_path.read_text())
    change(doc)
    out = tmp_path / "edited.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def test_edited_option_is_refused(plan_path, tmp_path):
    def bump(doc):
        doc["weights"]["layers"][0]["option"] = "1:2b g128"
    with pytest.raises(PlanFileError, match="the file was edited"):
        load_plan(edit(plan_path, tmp_path, bump))


def test_plan_that_no_longer_fits_is_refused(plan_path, tmp_path):
    def shrink(doc):
        doc["gpu"]["spec"]["memory_bytes"] = doc["gpu"]["spec"]["memory_bytes"] // 2
    with pytest.raises(PlanFileError, match="no longer fits"):
        load_plan(edit(plan_path, tmp_path, shrink))


def test_plan_for_another_model_is_refused(plan_path, tmp_path):
    def other(doc):
        doc["model"]["spec"]["num_layers"] = 41
    with pytest.raises(PlanFileError, match="does not match its model"):
        load_plan(edit(plan_path, tmp_path, other))


@given(st.text(max_size=300))
@settings(max_examples=200, deadline=None)
def test_random_text_never_raises_anything_but_a_plan_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "plan.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PlanFileError) as exc:
        load_plan(path)
    assert "\n" not in str(exc.value)


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_damaged_plans_never_raise_anything_but_a_plan_error(plan_path, tmp_path_factory, data):
    """Delete or retype a random key of a real plan: a one-line PlanFileError, never a traceback."""
    doc = yaml.safe_load(plan_path.read_text())
    node, path = doc, []
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(list(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append((node, key))
        node = node[key]
    if not path:
        return
    parent, key = path[-1]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        del parent[key]
    else:
        parent[key] = data.draw(st.sampled_from([None, "x", -1, [], {}, 1.5, True]))
    out = tmp_path_factory.mktemp("damaged") / "plan.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        load_plan(out)
    except PlanFileError as exc:
        assert "\n" not in str(exc)


def test_host_experts_round_trip_and_are_refused_where_they_cannot_run(plan_path, tmp_path):
    """An MoE offload plan keeping experts in host memory records placement.host_experts and reads back the same
    layout; the key on a dense model's plan is refused in one line."""
    moe = tmp_path / "moe.yaml"
    assert main(["plan", "--gpu", "rtx4060", "--model", "qwen3-30b-a3b", "--ram", "256GiB", "-o", str(moe),
                 "--quiet"]) == 0
    plan = load_plan(moe)
    assert plan.layout.host_experts == plan.doc["placement"]["host_experts"] > 0
    again = tmp_path / "again.yaml"
    write_plan(plan.doc, again)
    assert load_plan(again).layout == plan.layout

    def dense(doc):
        doc["placement"]["host_experts"] = 3
    with pytest.raises(PlanFileError, match="host_experts 3 needs an MoE offload plan"):
        load_plan(edit(plan_path, tmp_path, dense))
