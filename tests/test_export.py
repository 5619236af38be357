"""`vramwise export`: pasteable commands whose every option the target documents for its named version."""
from __future__ import annotations

import shlex

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from planner import export
from planner.cli import main
from planner.targets import engine_data


def _plan(tmp_path, *args) -> str:
    path = str(tmp_path / "p.yaml")
    assert main(["plan", *args, "--quiet", "-o", path]) == 0
    return path


def _export(capsys, path) -> list[str]:
    capsys.readouterr()
    assert main(["export", "--plan", path]) == 0
    return capsys.readouterr().out.strip().splitlines()


def _check_documented(lines: list[str], target: str) -> None:
    tools = engine_data(target)["tools"]
    commands = [ln for ln in lines if not ln.startswith("#")]
    assert commands
    for line in commands:
        shlex.split(line)                                   # pasteable: quotes balance
        tool = export.tool_of(line, tools)
        for opt in export.options_of(line):
            assert opt in tools[tool], f"{opt} is not documented for {tool} ({engine_data(target)['version']})"


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(["llama.cpp", "exllamav2", "vllm"]),
       case=st.sampled_from([("rtx4090", "llama2-70b", "1"), ("rtx3090", "llama2-70b", "2"), ("rtx4060", "mixtral-8x7b", "1"),
                             ("h100-sxm", "llama3.1-8b", "1"), ("t4", "qwen2.5-1.5b", "1"), ("a100-80gb-sxm", "llama2-13b", "4")]),
       kv=st.sampled_from([None, "q8", "q4", "fp8"]))
def test_exported_options_are_all_documented(tmp_path_factory, capsys, target, case, kv):
    gpu, model, cards = case
    path = str(tmp_path_factory.mktemp("x") / "p.yaml")
    argv = ["plan", "--gpu", gpu, "--model", model, "--gpus", cards, "--target", target, "--quiet", "-o", path]
    if main(argv + (["--kv", kv] if kv else [])) != 0:
        return                                              # a request the target refuses (tested elsewhere)
    _check_documented(_export(capsys, path), target)


def test_llamacpp_export_matches_the_plan(tmp_path, capsys):
    path = _plan(tmp_path, "--gpu", "rtx4090", "--model", "llama2-70b", "--target", "llama.cpp")
    s = yaml.safe_load(open(path))["target"]["settings"]
    lines = _export(capsys, path)
    server = next(ln for ln in lines if ln.startswith("llama-server"))
    assert f"-c {s['ctx']}" in server and f"-ngl {s['n_gpu_layers']}" in server and "-fa on" in server
    assert "-np 1" in server      # the plan keeps one sequence's cache; llama-server's default is 4 slots
    assert any(ln.startswith("llama-quantize") and ln.endswith(s["ftype"]) for ln in lines)


def test_a_context_past_the_native_one_exports_yarn(tmp_path, capsys):
    """Qwen3 8B at 131072 (native 32768): llama-server gets YaRN factor 4 over 32768, and the plan says why."""
    path = _plan(tmp_path, "--gpu", "rtx4090", "--model", "qwen3-8b", "--ctx", "131072", "--target", "llama.cpp")
    why = next(d["why"] for d in yaml.safe_load(open(path))["decisions"] if d["what"] == "context")
    assert "beyond the native 32768, needs RoPE scaling, e.g. YaRN factor 4" in why
    lines = _export(capsys, path)
    assert "--rope-scaling yarn --rope-scale 4 --yarn-orig-ctx 32768" in next(ln for ln in lines
                                                                            if ln.startswith("llama-server"))
    _check_documented(lines, "llama.cpp")
    native = _plan(tmp_path, "--gpu", "rtx4090", "--model", "qwen3-8b", "--ctx", "32768", "--target", "llama.cpp")
    assert not any("--rope-scaling" in ln for ln in _export(capsys, native))


def test_vllm_multinode_export_uses_ray(tmp_path, capsys):
    path = _plan(tmp_path, "--gpu", "h100-sxm", "--gpus", "8", "--nodes", "2", "--model", "llama3.1-405b", "--target", "vllm")
    lines = _export(capsys, path)
    assert "ray start --head --port 6379" in lines
    serve = lines[-1]
    assert "--tensor-parallel-size 8" in serve and "--pipeline-parallel-size 2" in serve
    assert "--distributed-executor-backend ray" in serve
    _check_documented(lines, "vllm")


def test_gpt_oss_exports_its_shipped_formats(tmp_path, capsys):
    """gpt-oss: llama.cpp's MXFP4_MOE type and the checkpoint itself for vLLM, whose config.json names its MXFP4
    quantization (no --quantization flag to get wrong)."""
    lines = _export(capsys, _plan(tmp_path, "--gpu", "rtx4090", "--model", "gpt-oss-20b", "--target", "llama.cpp"))
    assert any(ln.startswith("llama-quantize") and ln.endswith("MXFP4_MOE") for ln in lines)
    _check_documented(lines, "llama.cpp")
    lines = _export(capsys, _plan(tmp_path, "--gpu", "h100-sxm", "--model", "gpt-oss-20b", "--target", "vllm"))
    assert lines[-1].startswith("vllm serve openai/gpt-oss-20b ") and "--quantization" not in lines[-1]
    _check_documented(lines, "vllm")


def test_exllamav2_export(tmp_path, capsys):
    path = _plan(tmp_path, "--gpu", "rtx4090", "--model", "llama2-70b", "--target", "exllamav2")
    lines = _export(capsys, path)
    assert any(ln.startswith("python convert.py") and "-b 2.50 -hb 6" in ln for ln in lines)
    _check_documented(lines, "exllamav2")


def test_default_target_exports_vramwise_run(tmp_path, capsys):
    path = _plan(tmp_path, "--gpu", "rtx4060", "--model", "smollm2-135m")
    assert _export(capsys, path)[-1] == f"vramwise run --plan {path}"


def test_a_hand_edited_target_plan_is_refused(tmp_path, capsys):
    path = _plan(tmp_path, "--gpu", "rtx4090", "--model", "llama3.1-8b", "--target", "llama.cpp")
    doc = yaml.safe_load(open(path))
    doc["target"]["settings"]["ctx"] = 1_000_000
    open(path, "w").write(yaml.safe_dump(doc))
    capsys.readouterr()
    assert main(["export", "--plan", path]) == 2
    err = capsys.readouterr().err
    assert "was edited" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content, message", [("nope: 1\n", "not a vramwise plan"), ("[", "malformed YAML")])
def test_export_of_a_bad_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert main(["export", "--plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
