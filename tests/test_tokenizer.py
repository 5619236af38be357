"""Tokenizers: tiny GGUF vocabularies written here (byte-level BPE and SentencePiece), SmolLM2's real one."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest

from refengine.errors import ModelNotFoundError, TokenizerError, WeightsError
from refengine.models import PACKAGED, find_model_file
from refengine.tokenizer import BPE_PRE, CONTROL, NORMAL, Tokenizer, for_checkpoint, from_gguf_metadata

SMOL = PACKAGED["smollm2-135m"]
VARIED = ["Hello, world!", "héllo wörld — naïve café", "emoji 🎉🚀👩‍👩‍👧 ok", "日本語のテキスト、中文，한국어",
          "def f(x):\n\treturn x ** 2  # square\n", "   leading and trailing   ", "tabs\t\tand\n\n\nnewlines\r\n",
          "numbers 12345 3.14159 -7e10", "it's we're they'll I'd", "", " ", "\n", "a" * 300]


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 bytes (the byte-level BPE base vocabulary)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def bpe_meta(pre: str) -> dict:
    """A byte-level BPE vocabulary: 3 specials, the 256 byte symbols, and merges for 'Ġhello' and '12'."""
    merges = ["h e", "l l", "he ll", "hell o", "Ġ hello", "1 2"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_alphabet(),
              "he", "ll", "hell", "hello", "Ġhello", "12"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [CONTROL] * 3 + [NORMAL] * (len(tokens) - 3),
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": "{{ messages }}"}


def add_bpe_tokenizer(w, meta: dict, pre: str) -> None:
    """A byte-level BPE vocabulary (bpe_meta's arrays) into a GGUFWriter, as llama.cpp's converter writes it."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])


def test_byte_level_bpe_from_metadata_and_pre_tokenizer_table():
    tok = from_gguf_metadata(bpe_meta("smollm"), "tiny")
    ids = tok.encode("hello hello")
    assert [tok.token(i) for i in ids] == ["hello", "Ġhello"]
    assert [tok.token(i) for i in tok.encode("12")] == ["1", "2"]          # smollm: each digit alone
    gpt2 = from_gguf_metadata(bpe_meta("gpt-2"), "tiny")
    assert [gpt2.token(i) for i in gpt2.encode("12")] == ["12"]            # gpt-2: digit runs merge
    assert tok.encode("<|im_start|>hello<|im_end|>") == [1, tok.encode("hello")[0], 2]
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template) == (1, 2, False, "{{ messages }}")
    assert tok.encode("hello", bos=True)[0] == 1
    for text in VARIED:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("<|im_end|>x"), skip_special=True) == "x"


def test_unsupported_tokenizers_are_named():
    with pytest.raises(TokenizerError, match=r"pre-tokenizer 'mystery' is not supported \(supported: .*smollm"):
        from_gguf_metadata(bpe_meta("mystery"), "tiny")
    with pytest.raises(TokenizerError, match="tokenizer model 'bert' is not supported"):
        from_gguf_metadata(dict(bpe_meta("smollm"), **{"tokenizer.ggml.model": "bert"}), "tiny")
    meta = bpe_meta("smollm")
    del meta["tokenizer.ggml.merges"]
    with pytest.raises(TokenizerError, match="lacks 'tokenizer.ggml.merges'"):
        from_gguf_metadata(meta, "tiny")
    assert {"smollm", "gpt-2", "llama-bpe", "qwen2", "default"} <= set(BPE_PRE)


def spm_meta() -> dict:
    """A SentencePiece vocabulary; scores decide the merge order as in llama.cpp's llm_tokenizer_spm."""
    pieces = {"▁": -1.0, "h": -2.0, "e": -3.0, "l": -4.0, "o": -5.0, "he": -6.0, "ll": -7.0, "llo": -8.0,
              "hello": -9.0, "▁hello": -10.0, "▁he": -20.0}
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    types = [2, CONTROL, CONTROL, *[6] * 256, *[NORMAL] * len(pieces)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": [0.0] * 259 + list(pieces.values()), "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}


def test_sentencepiece_merges_by_score_with_byte_fallback():
    tok = from_gguf_metadata(spm_meta(), "spm")
    assert tok.add_bos                                      # llama.cpp's default for SentencePiece
    # "▁hello": he(-6), ll(-7), llo(-8), hello(-9), ▁hello(-10): one token; ▁he(-20) never wins
    assert [tok.token(i) for i in tok.encode("hello", bos=False)] == ["▁hello"]
    assert tok.encode("hello")[0] == 1
    pieces = [tok.token(i) for i in tok.encode("hi é", bos=False)]
    assert pieces == ["▁", "h", "<0x69>", "▁", "<0xC3>", "<0xA9>"]      # unknown characters -> UTF-8 bytes
    assert [tok.token(i) for i in tok.encode("<s>hello", bos=False)] == ["<s>", "▁hello"]
    for text in VARIED:
        assert tok.decode(tok.encode(text, bos=False)) == text


def test_tokenizer_json_round_trip(tmp_path):
    """A tokenizer.json (with tokenizer_config.json) gives the same ids as the GGUF metadata it came from."""
    ref = from_gguf_metadata(bpe_meta("smollm"), "tiny")
    ref.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": "T"}))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template) == (1, 2, False, "T")
    for text in VARIED + ["<|im_start|>hello 12<|im_end|>"]:
        assert tok.encode(text) == ref.encode(text)
    with pytest.raises(TokenizerError, match="tokenizer.json: not found"):
        Tokenizer.from_file(tmp_path / "nowhere" / "tokenizer.json")


# --- SmolLM2-135M-Instruct --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    try:
        path = find_model_file("smollm2-135m")
    except ModelNotFoundError:
        pytest.skip(f"SmolLM2 weights not installed ({SMOL.install})")
    return Tokenizer.from_gguf(path)


# SmolLM2 token ids as other SmolLM2 implementations publish them (prompts checked against Hugging Face
# transformers, and the context Ollama's llama.cpp returned); the pieces are the vocabulary's own strings.
SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
          [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
           8182, 2, 198])
CHATS = {   # user message -> its ids between "<|im_start|>user\n" and "<|im_end|>\n<|im_start|>assistant\n"
    "What is the capital of France?": [1780, 314, 260, 3575, 282, 4649, 47],
    "Quelle est la capitale de la France ? Réponds en une phrase.":
        [65, 2726, 290, 1264, 2618, 47765, 1121, 367, 2618, 4649, 9148, 428, 2756, 96, 19870, 430, 16520, 8715, 30],
    "Hello": [19556],
    "Write a short story: Once upon a time": [19161, 253, 1890, 1977, 42, 4027, 1980, 253, 655],
}
KNOWN = {
    "Hello, we can use": ([19556, 28, 392, 416, 722], ["Hello", ",", "Ġwe", "Ġcan", "Ġuse"]),
    "The capital of France is": ([504, 3575, 282, 4649, 314], ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]),
    "Hello world! 123": ([19556, 905, 17, 216, 33, 34, 35], ["Hello", "Ġworld", "!", "Ġ", "1", "2", "3"]),
    "  multiple   spaces": ([216, 2701, 256, 5600], ["Ġ", "Ġmultiple", "ĠĠ", "Ġspaces"]),
    "Café déjà vu.": ([51, 1939, 2756, 32564, 90, 16739, 386, 101, 30],
                      ["C", "af", "Ã©", "ĠdÃ©", "j", "Ãł", "Ġv", "u", "."]),
    "\n": ([198], ["Ċ"]),
}


def test_smollm2_known_ids(smol):
    for text, (ids, pieces) in KNOWN.items():
        assert smol.encode(text) == ids, text
        assert [smol.token(i) for i in ids] == pieces, text
    assert smol.encode("Hello")[0] == smol.backend.token_to_id("Hello")


def test_smollm2_chat_prompts(smol):
    for user, ids in CHATS.items():
        prompt = f"{SYSTEM[0]}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        assert smol.encode(prompt) == [*SYSTEM[1], 1, 4093, 198, *ids, 2, 198, 1, 520, 9531, 198], user


def test_smollm2_specials_and_conventions(smol):
    assert (smol.bos_id, smol.eos_id, smol.add_bos, smol.vocab_size) == (1, 2, False, 49152)
    assert "<|im_start|>" in smol.chat_template
    for i, name in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
        assert smol.encode(name) == [i] and smol.decode([i]) == name
    chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = smol.encode(chat)
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1 and smol.decode(ids) == chat


def test_smollm2_round_trips(smol):
    for text in VARIED:
        assert smol.decode(smol.encode(text)) == text, text


def test_smollm2_matches_llama_cpp(smol):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the published ids "
                                    "above stand in for it)")
    model = llama_cpp.Llama(model_path=str(find_model_file("smollm2-135m")), vocab_only=True, verbose=False)
    for text in [*KNOWN, *VARIED, "<|im_start|>user\nhi<|im_end|>"]:
        assert smol.encode(text) == model.tokenize(text.encode(), add_bos=False, special=True), text


def test_gguf_file_and_checkpoint_sources(tmp_path):
    """Tokenizer.from_gguf reads the file's arrays; for_checkpoint picks GGUF metadata or tokenizer.json."""
    meta = bpe_meta("smollm")
    w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    add_bpe_tokenizer(w, meta, "smollm")
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{{ messages }}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = from_gguf_metadata(meta, "tiny")
    tok = Tokenizer.from_gguf(tmp_path / "tok.gguf")
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template) == (1, 2, False, "{{ messages }}")
    assert all(tok.encode(t) == ref.encode(t) for t in VARIED)
    assert for_checkpoint(SimpleNamespace(format="gguf", metadata=meta, path=Path("m.gguf"))).encode("hello 12") \
        == ref.encode("hello 12")
    ref.backend.save(str(tmp_path / "tokenizer.json"))
    hf = for_checkpoint(SimpleNamespace(format="safetensors", path=tmp_path))
    assert hf.encode("<|im_start|>hello") == ref.encode("<|im_start|>hello")
    data = (tmp_path / "tok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.gguf: not a readable GGUF file"):
        Tokenizer.from_gguf(tmp_path / "cut.gguf")
