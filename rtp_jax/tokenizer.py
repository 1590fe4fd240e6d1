"""Tokenizer, chat template and incremental detokenizer, from an HF directory or a GGUF file.

The encoder is always a `tokenizers.Tokenizer`: loaded from tokenizer.json for HF directories, or
rebuilt from GGUF metadata (byte-level BPE vocab + merges + the pre-tokenizer llama.cpp names in
`tokenizer.ggml.pre`). Chat templates render with jinja2 under the same sandbox and settings as
HF transformers' `apply_chat_template`, so prompts match token for token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

# --- GGUF -> tokenizers ---------------------------------------------------------------------------

# Split regexes from the HF tokenizer.json files that llama.cpp's pre-tokenizer names stand for
# (llama-vocab.cpp keeps hand-adapted copies of the same patterns).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
# llama.cpp pre-tokenizer name -> pre-tokenizer family.
_PRE_FAMILIES = {
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), "digits"
    ),
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais", "phi-2", "trillion"), "gpt2"),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), "llama3"),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez", "hunyuan"), "qwen2"),
}

# Texts of the end-of-generation control tokens llama.cpp adds to its stop set (llama-vocab.cpp).
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>", "<|eom_id|>",
              "</s>", "<end_of_turn>", "<|return|>", "<|call|>")

_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def gguf_pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """The tokenizers pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` name, and BPE's ignore_merges.

    ignore_merges is True for the llama3 family, whose tokenizer.json sets it (a whole pre-token
    found in the vocab is taken as is, even when merges would not build it).
    """
    family = _PRE_FAMILIES.get(pre)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if family == "digits":  # SmolLM2's tokenizer.json: single digits, then GPT-2's regex
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        ), False
    if family == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if family in ("llama3", "qwen2"):
        regex = _LLAMA3_REGEX if family == "llama3" else _QWEN2_REGEX
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, byte_level]), family == "llama3"
    raise ValueError(
        f"GGUF tokenizer.ggml.pre {pre!r} is not supported (known: {sorted(_PRE_FAMILIES)})"
    )


def tokenizer_from_gguf_metadata(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """Builds a byte-level BPE `tokenizers.Tokenizer` from GGUF `tokenizer.ggml.*` metadata.

    Control tokens (type 3) become special added tokens (never split, skipped when decoding with
    skip_special_tokens); user-defined tokens (type 4) become non-special added tokens.
    """
    model_type = meta.get("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {model_type!r} is not supported (only 'gpt2' byte-level BPE); "
            "use the HF checkpoint directory with its tokenizer.json instead"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre, ignore_merges = gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    added = [
        AddedToken(t, special=ty == _TOKEN_CONTROL, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_text = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_text} $A", pair=f"{bos_text} $A {bos_text} $B", special_tokens=[(bos_text, bos)]
        )
    return tok


def gguf_tokenizer_metadata(path: str | Path) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a GGUF file as plain Python values."""
    from rtp_jax.loader.gguf import open_gguf  # the loader pulls in gguf/numpy; keep it lazy

    reader = open_gguf(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


# --- chat templates -------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """Accepts HF's `{% generation %}...{% endgeneration %}` (assistant-mask markers); renders the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF's override: jinja's own tojson HTML-escapes, which would change prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compiles a chat template in the environment transformers uses (sandboxed, trim/lstrip blocks)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _read_hf_chat_template(directory: Path, tok_config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja, chat_template.json, or tokenizer_config.json's entry (str or named list)."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    template = tok_config.get("chat_template")
    if template is None and (directory / "chat_template.json").is_file():
        template = json.loads((directory / "chat_template.json").read_text()).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _token_text(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _unique(ids: Sequence[int | None]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


# --- the tokenizer --------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids, chat template, and the stop tokens of a model.

    `eos_token_ids` is the stop set: generation_config's eos ids, the tokenizer's eos, and (for
    GGUF, as llama.cpp does) the end-of-generation control tokens present in the vocab.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        chat_template: str | None,
        special_tokens: Mapping[str, str | None] | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = _unique(eos_token_ids)
        self.chat_template = chat_template
        # bos_token, eos_token, pad_token, unk_token as template variables (HF passes them all).
        self.special_tokens: dict[str, str | None] = dict(special_tokens or {})

    @property
    def eos_token_id(self) -> int | None:
        """The primary stop token (first of `eos_token_ids`)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (added tokens included)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """Loads from an HF directory (tokenizer.json [+ tokenizer_config.json, generation_config.json])
        or a .gguf file."""
        path = Path(path)
        if path.is_dir():
            return cls._from_hf_dir(path)
        if path.is_file():
            return cls.from_gguf_metadata(gguf_tokenizer_metadata(path))
        raise FileNotFoundError(f"no tokenizer at {str(path)!r} (expected an HF directory or a .gguf file)")

    @classmethod
    def _from_hf_dir(cls, directory: Path) -> Tokenizer:
        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{directory}: no tokenizer.json (only fast tokenizers are supported)")
        backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))

        def read_json(name: str) -> dict[str, Any]:
            p = directory / name
            return json.loads(p.read_text()) if p.is_file() else {}

        tok_config = read_json("tokenizer_config.json")
        gen_config = read_json("generation_config.json")
        special = {
            k: _token_text(tok_config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        bos_id = backend.token_to_id(special["bos_token"]) if special["bos_token"] else None
        eos_id = backend.token_to_id(special["eos_token"]) if special["eos_token"] else None
        gen_eos = gen_config.get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        if bos_id is None:
            bos_id = gen_config.get("bos_token_id")
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=[*gen_eos, eos_id],
            chat_template=_read_hf_chat_template(directory, tok_config),
            special_tokens=special,
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Builds the tokenizer from GGUF `tokenizer.*` metadata (see `tokenizer_from_gguf_metadata`)."""
        backend = tokenizer_from_gguf_metadata(meta)
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)

        def text(key: str) -> str | None:
            i = meta.get(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        eog = [i for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
               if ty == _TOKEN_CONTROL and t in _EOG_TEXTS]
        return cls(
            backend,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[
                meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id"), *eog
            ],
            chat_template=meta.get("tokenizer.chat_template"),
            special_tokens={
                "bos_token": text("tokenizer.ggml.bos_token_id"),
                "eos_token": text("tokenizer.ggml.eos_token_id"),
                "pad_token": text("tokenizer.ggml.padding_token_id"),
                "unk_token": text("tokenizer.ggml.unknown_token_id"),
            },
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text map to their ids.

        add_special_tokens adds what the tokenizer's post-processor adds (e.g. Llama 3's BOS). A
        rendered chat prompt usually already holds its BOS: encode it with add_special_tokens=False.
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; incomplete UTF-8 sequences decode to U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Renders a conversation to a prompt string as HF `apply_chat_template(tokenize=False)` does.

        Template variables: messages, tools, add_generation_prompt, the special token texts
        (bos_token, eos_token, ...) and any extra `kwargs` (e.g. enable_thinking).
        """
        source = chat_template or self.chat_template
        if source is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template= or use a plain prompt")
        variables = {k: v for k, v in self.special_tokens.items() if v is not None}
        variables.update(kwargs)
        return compile_chat_template(source).render(
            messages=[dict(m) for m in messages],
            tools=None if tools is None else [dict(t) for t in tools],
            add_generation_prompt=add_generation_prompt,
            **variables,
        )


# --- incremental detokenization -------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns a growing token sequence into text deltas, one sequence per instance.

    vLLM's prefix/read-offset scheme: decode the window tokens[prefix_offset:] and emit what it adds
    beyond tokens[prefix_offset:read_offset], unless it ends in U+FFFD (a UTF-8 character still
    split across tokens: wait for the rest). Windows start at character boundaries, so the deltas
    concatenate to the full decode; `flush()` gives whatever is held back when the sequence ends.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True,
                 prompt_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        # Prompt tokens are context only (some decoders, e.g. SentencePiece, drop a leading space
        # at the start of a window); their text is never emitted.
        self._ids: list[int] = list(prompt_ids)
        self._prefix_offset = max(len(self._ids) - 5, 0)
        self._read_offset = len(self._ids)
        self._start = len(self._ids)
        self._text: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._text)

    @property
    def token_ids(self) -> list[int]:
        """Tokens added so far (prompt context excluded)."""
        return self._ids[self._start:]

    def add(self, token_ids: Sequence[int]) -> str:
        """Appends tokens; returns the newly completed text (possibly empty)."""
        out = []
        for t in token_ids:
            self._ids.append(int(t))
            out.append(self._step())
        delta = "".join(out)
        self._text.append(delta)
        return delta

    def _step(self) -> str:
        prefix = self._tok.decode(self._ids[self._prefix_offset:self._read_offset], self._skip)
        full = self._tok.decode(self._ids[self._prefix_offset:], self._skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Emits the held-back tail (an incomplete character becomes U+FFFD); call when the sequence ends."""
        prefix = self._tok.decode(self._ids[self._prefix_offset:self._read_offset], self._skip)
        full = self._tok.decode(self._ids[self._prefix_offset:], self._skip)
        self._prefix_offset = self._read_offset = len(self._ids)
        delta = full[len(prefix):]
        self._text.append(delta)
        return delta
