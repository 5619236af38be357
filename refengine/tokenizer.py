"""Tokenizers from a GGUF file's metadata or a Hugging Face tokenizer.json, token for token as llama.cpp / HF.

GGUF `tokenizer.ggml.model`:
  gpt2   byte-level BPE (tokens + merges). The pre-tokenizer is the regex list llama.cpp applies for the
         file's `tokenizer.ggml.pre` (llama-vocab.cpp, llm_tokenizer_bpe), each regex splitting the pieces
         of the previous one, then bytes -> GPT-2's printable alphabet. SmolLM2 ("smollm", as StarCoder):
         every digit alone, then the GPT-2 regex; its tokenizer.json says the same (Digits + ByteLevel).
  llama  SentencePiece (tokens + scores): "▁" for spaces (and one in front of each text run), then any
         adjacent pair whose concatenation is a token merges, highest score first (llama.cpp
         llm_tokenizer_spm); here as BPE merges ranked by score, with <0xXX> byte fallback.
Control (type 3) and user-defined (type 4) tokens match whole in the text, as HF does (llama.cpp with
parse_special=true), so `<|im_start|>` is one id.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from refengine.errors import TokenizerError, WeightsError, one_line

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6   # tokenizer.ggml.token_type

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class BpePre:
    """How a byte-level BPE model splits text before merging (llama.cpp's pre-tokenizer types)."""

    regexes: tuple[str, ...]     # applied in turn, each match an isolated piece
    ignore_merges: bool = False  # a piece that is already a token is not merged (Llama 3)
    add_bos: bool = False        # llama.cpp's default when the file does not say


_GPT2_PRE = BpePre((_GPT2,))
_DIGITS_PRE = BpePre((r"\p{N}", _GPT2))
_LLAMA3_PRE = BpePre((_LLAMA3,), ignore_merges=True, add_bos=True)

# tokenizer.ggml.pre -> pre-tokenizer, as llama.cpp's llama_vocab::load maps the names.
BPE_PRE: dict[str, BpePre] = {
    "default": BpePre((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
    "gpt-2": _GPT2_PRE, "phi-2": _GPT2_PRE, "mpt": _GPT2_PRE, "olmo": _GPT2_PRE, "jais": _GPT2_PRE,
    "smollm": _DIGITS_PRE, "starcoder": _DIGITS_PRE, "refact": _DIGITS_PRE, "command-r": _DIGITS_PRE,
    "codeshell": _DIGITS_PRE, "exaone": _DIGITS_PRE, "minerva-7b": _DIGITS_PRE,
    "llama3": _LLAMA3_PRE, "llama-v3": _LLAMA3_PRE, "llama-bpe": _LLAMA3_PRE, "falcon3": _LLAMA3_PRE,
    "dbrx": BpePre((_LLAMA3,)), "smaug-bpe": BpePre((_LLAMA3,)),
    "qwen2": BpePre((_QWEN2,)), "deepseek-r1-qwen": BpePre((_QWEN2,)), "stablelm2": BpePre((_QWEN2,)),
}


@dataclass(frozen=True)
class Tokenizer:
    """Text <-> token ids for one model, with the model's own BOS/EOS conventions and chat template."""

    backend: Any                 # a tokenizers.Tokenizer
    bos_id: Optional[int]
    eos_id: Optional[int]
    add_bos: bool                # prepend BOS to a prompt (GGUF tokenizer.ggml.add_bos_token)
    chat_template: Optional[str]
    source: str

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, bos: Optional[bool] = None) -> list[int]:
        """Token ids of `text`; BOS in front when `bos` (default: as the model says)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        want = self.add_bos if bos is None else bos
        return [self.bos_id, *ids] if want and self.bos_id is not None else list(ids)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """The text of `ids` (special tokens written out unless `skip_special`)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token(self, token_id: int) -> str:
        """The vocabulary entry of one id, as stored (byte-level BPE: GPT-2's printable bytes)."""
        return self.backend.id_to_token(int(token_id))

    @classmethod
    def from_gguf(cls, path: Union[str, Path]) -> "Tokenizer":
        """The tokenizer stored in a GGUF file's metadata."""
        from gguf import GGUFReader

        try:
            fields = GGUFReader(str(path), "r").fields
        except (ValueError, OSError, KeyError, IndexError, EOFError) as exc:
            raise WeightsError(f"{path}: not a readable GGUF file, truncated or corrupt ({one_line(exc)})") from None
        return from_gguf_metadata({k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.")},
                                  str(path))

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "Tokenizer":
        """A Hugging Face tokenizer.json (and tokenizer_config.json / config.json beside it)."""
        return from_tokenizer_json(Path(path))


def for_checkpoint(ckpt: Any) -> Tokenizer:
    """The tokenizer of a loaded refengine.weights.Checkpoint: its GGUF metadata or its tokenizer.json."""
    if ckpt.format == "gguf":
        return from_gguf_metadata(ckpt.metadata, str(ckpt.path))
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    return from_tokenizer_json(folder / "tokenizer.json")


# --- GGUF ---------------------------------------------------------------------------------------

def _meta(meta: Mapping[str, Any], key: str, where: str, default: Any = ...) -> Any:
    if key in meta:
        return meta[key]
    if default is ...:
        raise TokenizerError(f"{where}: GGUF metadata lacks {key!r}, so the tokenizer cannot be built")
    return default


def _gguf_backend(meta: Mapping[str, Any], kind: str, tokens: list, types: list, where: str) -> tuple[Any, bool]:
    """The tokenizers backend for a GGUF `tokenizer.ggml.model`, and whether that kind adds BOS by default."""
    if kind == "gpt2":
        pre_name = _meta(meta, "tokenizer.ggml.pre", where, "default")
        pre = BPE_PRE.get(pre_name)
        if pre is None:
            raise TokenizerError(f"{where}: pre-tokenizer {pre_name!r} is not supported "
                                 f"(supported: {', '.join(sorted(BPE_PRE))})")
        backend = _byte_level_bpe(tokens, list(_meta(meta, "tokenizer.ggml.merges", where)), pre)
        default_bos = pre.add_bos
    elif kind == "llama":
        scores = list(_meta(meta, "tokenizer.ggml.scores", where))
        unk = int(_meta(meta, "tokenizer.ggml.unknown_token_id", where, 0))
        prefix = bool(_meta(meta, "tokenizer.ggml.add_space_prefix", where, True))
        backend = _sentencepiece_bpe(tokens, scores, types, tokens[unk], prefix)
        default_bos = True
    else:
        raise TokenizerError(f"{where}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    _add_specials(backend, tokens, types)
    return backend, default_bos


def from_gguf_metadata(meta: Mapping[str, Any], where: str) -> Tokenizer:
    """A Tokenizer from GGUF `tokenizer.*` key/values (decoded values, as GGUFReader's contents())."""
    kind = _meta(meta, "tokenizer.ggml.model", where)
    tokens = list(_meta(meta, "tokenizer.ggml.tokens", where))
    types = list(_meta(meta, "tokenizer.ggml.token_type", where, [NORMAL] * len(tokens)))
    try:
        backend, default_bos = _gguf_backend(meta, kind, tokens, types, where)
    except TokenizerError:
        raise
    except Exception as exc:              # the tokenizers library raises plain Exception on bad vocab/merges
        raise TokenizerError(f"{where}: the GGUF tokenizer data is inconsistent ({one_line(exc)}); the file is "
                             "corrupt, re-download it") from None
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return Tokenizer(backend, None if bos is None else int(bos), None if eos is None else int(eos),
                     bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
                     meta.get("tokenizer.chat_template"), where)


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: BpePre) -> Any:
    from tokenizers import Regex, Tokenizer as Backend, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]   # byte-level tokens hold no real space
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int], unk: str, prefix: bool) -> Any:
    from tokenizers import Tokenizer as Backend, decoders, models, normalizers

    vocab = {tok: i for i, tok in enumerate(tokens)}
    mergeable = {t: scores[i] for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    ranked = []                          # every split of a token into two tokens, best-scoring token first
    for tok, score in mergeable.items():
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    model = models.BPE(vocab=vocab, merges=[(r[3], r[4]) for r in ranked], unk_token=unk,
                       fuse_unk=True, byte_fallback=True)
    backend = Backend(model)
    steps = [normalizers.Prepend("▁")] if prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    undo = [decoders.Strip(" ", 1, 0)] if prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *undo])
    return backend


def _add_specials(backend: Any, tokens: list[str], types: list[int]) -> None:
    """Control and user-defined tokens match whole, before any pre-tokenization; their ids are the vocab's."""
    from tokenizers import AddedToken

    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    backend.add_special_tokens(control)
    backend.add_tokens(user)


# --- Hugging Face tokenizer.json ----------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: not readable JSON ({one_line(exc)})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> Optional[str]:
    return value.get("content") if isinstance(value, dict) else value


def from_tokenizer_json(path: Path) -> Tokenizer:
    """tokenizer.json; BOS/EOS ids from config.json (else tokenizer_config.json), template from the latter."""
    from tokenizers import Tokenizer as Backend

    if not path.is_file():
        raise TokenizerError(f"{path}: not found; a Hugging Face checkpoint needs its tokenizer.json")
    try:
        backend = Backend.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the Rust library raises plain Exception for a malformed file
        raise TokenizerError(f"{path}: not a readable tokenizer.json ({one_line(exc)})") from None
    tcfg = _read_json(path.parent / "tokenizer_config.json")
    cfg = _read_json(path.parent / "config.json")

    def token_id(kind: str) -> Optional[int]:
        value = cfg.get(f"{kind}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None and _token_text(tcfg.get(f"{kind}_token")) is not None:
            value = backend.token_to_id(_token_text(tcfg[f"{kind}_token"]))
        return None if value is None else int(value)

    bos = token_id("bos")
    add_bos = tcfg.get("add_bos_token")
    if add_bos is None:                  # the post-processor's template says whether BOS is prepended
        probe = backend.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and bool(probe) and probe[0] == bos
    template = tcfg.get("chat_template")
    if isinstance(template, list):       # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return Tokenizer(backend, bos, token_id("eos"), bool(add_bos), template, str(path))


__all__ = ["BPE_PRE", "BpePre", "Tokenizer", "for_checkpoint", "from_gguf_metadata", "from_tokenizer_json"]
