"""The GPU and model databases: coverage, units, exact parameter counts, strict loading."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import hwdb
from hwdb import HwdbError
from planner.spec import param_count

DB = hwdb.load()

REQUIRED_GPUS = ["rtx3060", "rtx3090", "rtx4060", "rtx4090", "rtx5090", "t4", "v100", "a10", "a10g", "l4", "l40s",
                 "A100 40GB", "A100 80GB", "H100 PCIe", "H100 SXM", "h200", "b200", "rx7900xtx", "M2 Ultra",
                 "GTX 1080 Ti", "RTX 3050", "RTX 4060 Laptop", "Tesla P40", "Arc B580", "Apple M2 16GB"]
REQUIRED_MODELS = ["llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "llama3-70b", "llama3.1-8b", "llama3.1-70b",
                   "llama3.1-405b", "mistral-7b", "mixtral-8x7b", "falcon-180b", "qwen2.5-0.5b", "qwen2.5-72b",
                   "gemma2-9b", "phi3-mini", "tinyllama-1.1b", "smollm2-135m", "qwen3-8b", "qwen3-30b-a3b", "qwen3:235b",
                   "gemma3-27b", "gemma3-1b", "gpt-oss-20b", "gpt-oss-120b", "deepseek-r1", "glm-4.5-air",
                   "mistral-nemo-12b", "phi-4", "Llama 3.3 70B"]


def test_sizes_of_the_tables():
    assert len(DB.gpus) >= 35 and len(DB.models) >= 20


@pytest.mark.parametrize("name", REQUIRED_GPUS)
def test_required_gpus_resolve(name):
    assert DB.find_gpu(name).id


@pytest.mark.parametrize("name", REQUIRED_MODELS)
def test_required_models_resolve(name):
    assert DB.find_model(name).id


def test_nvidia_smi_names_resolve():
    assert DB.find_gpu("NVIDIA GeForce RTX 4090").id == "rtx4090"
    assert DB.find_gpu("Tesla T4").id == DB.find_gpu("t4").id


@pytest.mark.parametrize("gpu", list(DB.gpus.values()), ids=lambda g: g.id)
def test_gpu_units_are_sane(gpu):
    assert 4 * 2**30 <= gpu.memory_bytes <= 600 * 2**30
    assert 50 <= gpu.bandwidth_gb_s <= 10_000
    assert 1 <= gpu.fp16_tflops <= 3_000
    assert 1 <= gpu.host_link_gb_s <= gpu.bandwidth_gb_s
    assert gpu.source.strip()


@pytest.mark.parametrize("model", list(DB.models.values()), ids=lambda m: m.id)
def test_parameter_count_matches_published_total(model):
    assert model.published_params > 0, "every model states its published total"
    assert abs(param_count(model) / model.published_params - 1) <= 0.01


def test_aliases_are_unique_across_entries():
    for table in (DB.gpus, DB.models):
        seen: dict[str, str] = {}
        for entry in table.values():
            for name in {hwdb.normalize(n) for n in (entry.id, entry.name, *entry.aliases)}:
                assert seen.setdefault(name, entry.id) == entry.id, f"{name} names {seen[name]} and {entry.id}"


def test_unknown_name_lists_closest():
    with pytest.raises(HwdbError, match=r"unknown GPU 'rtx4091'.*closest: .*rtx4090"):
        DB.find_gpu("rtx4091")


@pytest.mark.parametrize("name,gpu_id", [
    ("NVIDIA GeForce RTX 3090 24GB", "rtx3090"), ("NVIDIA GeForce RTX 3080 10GB", "rtx3080-10gb"),
    ("NVIDIA GeForce RTX 2080 (8 GB)", "rtx2080"), ("NVIDIA RTX 6000 Ada 48GB", "rtx6000-ada"),
    ("rtx 4090 24 GB", "rtx4090"), ("NVIDIA H100 PCIe 80GB", "h100-pcie"), ("AMD Radeon RX 7900 XTX", "rx7900xtx"),
    ("Apple M2 16GB", "m2-16gb"), ("Apple M3 Pro 36GB", "m3-pro-36gb"), ("Apple M2 Ultra 192GB", "m2-ultra-192gb"),
    ("RTX 3060 8GB", "rtx3060-8gb"), ("NVIDIA GeForce RTX 3060 12GB", "rtx3060-12gb"), ("RTX 5060 Ti 8GB", "rtx5060ti-8gb"),
    ("NVIDIA GeForce RTX 5060 Ti 16GB", "rtx5060ti-16gb")])
def test_names_with_a_memory_size_find_the_card_of_that_size(name, gpu_id):
    # as benchmark tables write them: the vendor's name (maybe without 'NVIDIA'), then the memory
    assert DB.find_gpu(name).id == gpu_id


def test_a_memory_size_that_disagrees_is_refused_not_rounded_to_another_card():
    with pytest.raises(HwdbError, match=r"'RTX 3070 16GB': rtx3070 has 8 GiB, not 16 GB"):
        DB.find_gpu("RTX 3070 16GB")
    # an Apple name gives the machine's RAM, of which the GPU's working set (memory_bytes) is 2/3 or 3/4
    with pytest.raises(HwdbError, match=r"'Apple M2 8GB': m2-16gb has 16 GiB of RAM, not 8 GB"):
        DB.find_gpu("Apple M2 8GB")
    with pytest.raises(HwdbError, match=r"unknown GPU 'NVIDIA A100-SXM4-80GB \(power-limited"):
        DB.find_gpu("NVIDIA A100-SXM4-80GB (power-limited to 330 W)")     # only a size may follow the name


def test_user_file_adds_and_overrides(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("gpus:\n  rtx4090:\n    memory_bytes: 1000000000\n  mycard:\n    name: My Card\n    vendor: nvidia\n"
                 "    architecture: Ada\n    compute_capability: '8.9'\n    memory_bytes: 8589934592\n"
                 "    memory_type: GDDR6\n    bandwidth_gb_s: 272\n    fp16_tflops: 22\n    int8_tops: 88\n"
                 "    sm_count: 24\n    host_link: PCIe 4.0 x8\n    host_link_gb_s: 12.5\n    display: true\n"
                 "    source: my datasheet\n")
    db = hwdb.load(f)
    assert db.find_gpu("rtx4090").memory_bytes == 1_000_000_000
    assert db.find_gpu("rtx4090").bandwidth_gb_s == 1008.0      # untouched fields stay
    assert db.find_gpu("My Card").id == "mycard"


@pytest.mark.parametrize("text, pattern", [
    ("gpus: [1, 2", r"mine.yaml:.*malformed YAML"),
    ("gpus:\n  rtx4090:\n    memory_bytez: 1\n", r"entry 'rtx4090': unknown field 'memory_bytez'"),
    ("gpus:\n  newcard:\n    name: x\n", r"entry 'newcard': missing field"),
    ("gpus:\n  rtx4090:\n    bandwidth_gb_s: fast\n", r"entry 'rtx4090' field 'bandwidth_gb_s': expected a number"),
    ("models:\n  llama2-7b:\n    num_layers: -1\n", r"entry 'llama2-7b': field 'num_layers' must be positive"),
    ("colors: {}\n", r"unknown top-level key 'colors'"),
    ("schema_version: 7\n", r"schema_version 7 is not supported"),
])
def test_bad_user_file_gives_one_line(tmp_path, text, pattern):
    f = tmp_path / "mine.yaml"
    f.write_text(text)
    with pytest.raises(HwdbError, match=pattern) as exc:
        hwdb.load(f)
    assert "\n" not in str(exc.value)


def test_env_var_names_user_file(tmp_path, monkeypatch):
    f = tmp_path / "env.yaml"
    f.write_text("gpus:\n  t4:\n    memory_bytes: 123456789\n")
    monkeypatch.setenv(hwdb.ENV_VAR, str(f))
    assert hwdb.load().find_gpu("t4").memory_bytes == 123456789


from hypothesis import given, settings, strategies as st  # noqa: E402

_yamlish = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=12), kids, max_size=3),
                        max_leaves=12)


@given(st.text(max_size=200) | _yamlish.map(lambda x: __import__("yaml").safe_dump(x)) |
       st.builds(lambda k, v: __import__("yaml").safe_dump({"gpus": {"t4": {k: v}}}), st.text(max_size=12), _yamlish))
@settings(max_examples=300, deadline=None)
def test_random_user_files_never_raise_anything_but_hwdb_error(tmp_path_factory, text):
    f = tmp_path_factory.mktemp("fuzz") / "user.yaml"
    f.write_text(text, encoding="utf-8")
    try:
        hwdb.load(f)
    except HwdbError as exc:
        assert "\n" not in str(exc)


def test_cli_malformed_hwdb_exits_2(tmp_path, capsys):
    from planner.cli import main
    f = tmp_path / "bad.yaml"
    f.write_text("gpus:\n  rtx4090: [unclosed\n")
    assert main(["plan", "--gpu", "rtx4090", "--model", "llama2-7b", "--hwdb", str(f), "-o", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "malformed YAML" in err and "Traceback" not in err


def test_boost_clocks_are_the_sourced_ones():
    """hwdb's clocks (decode's fixed costs are priced in cycles) agree with their source record; Apple has none."""
    clocks = yaml.safe_load((Path(hwdb.__file__).resolve().parents[1] / "benchmarks/published/gpu_clocks.yaml")
                            .read_text())["clocks"]
    assert set(clocks) == set(DB.gpus)
    for gpu in DB.gpus.values():
        want = None if gpu.vendor == "apple" else clocks[gpu.id]["boost_clock_mhz"]
        assert gpu.boost_clock_mhz == want, gpu.id
        assert clocks[gpu.id]["source"], gpu.id
