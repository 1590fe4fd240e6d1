"""The ring of pinned slots (`rtp_jax.loader.ring`, the fast loader's default staging on CUDA), driven on
the CPU by host-memory stand-ins for the CUDA driver: copies that land only when waited for (so a slot
reused too early hands over the wrong bytes), registrations checked, nothing left registered after a load."""

from __future__ import annotations

import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from host_dma import DeferredDma, HostMemoryDma

from rtp_jax.loader import direct as direct_mod
from rtp_jax.loader.cuda_dma import host_dma
from rtp_jax.loader.fast import FastLoader, RingConfig, plan_checkpoint
from rtp_jax.loader.safetensors_io import iter_safetensors

cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu",
                              reason="the host-memory stand-ins write into CPU device buffers")
# Chunks of a page and a bit less, so tensors span many chunks and slots are reused many times over.
SMALL_RING = RingConfig(threads=3, slots=2, chunk_bytes=4096)


def _same(a, b) -> bool:
    a = np.asarray(a)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


@cpu_only
@pytest.mark.parametrize("config", [SMALL_RING, RingConfig(threads=1, slots=1, chunk_bytes=12288),
                                    RingConfig(threads=4, slots=3, chunk_bytes=1 << 20)])
def test_ring_loads_every_tensor_bit_for_bit_and_unregisters(tiny_hf_model, config):
    """Every tensor arrives bit-identical through the ring, whole (no row pieces), all bytes by the ring,
    from one registration per ring thread (its slots), all gone after the load; with the copies landing
    only when waited for, so a slot refilled before its copy completed would corrupt a tensor."""
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    ref = dict(iter_safetensors(path))
    dma = DeferredDma()
    loader = FastLoader(path, split_bytes=3 * 4096, ring=dma, ring_config=config, release_in_background=False)
    got = dict(loader.iter_device())
    assert list(got) == list(ref)
    for name, a in got.items():
        assert isinstance(a, jax.Array) and _same(a, ref[name]), name
    extra = loader.stats.extra
    assert extra["staging"] == "ring" and extra["ring_bytes"] == sum(x.nbytes for x in ref.values())
    assert dma.live == {} and dma.registrations == config.threads and not dma.queued
    assert extra["ring_register_failures"] == 0
    assert loader.budget.peak == 0  # no host bytes were staged in the slab


@cpu_only
def test_ring_casts_on_the_device_and_goes_back_in_the_background(tiny_hf_model):
    """A dtype asked for is applied on the device after the ring's copy, as on the slab path; by default
    the slots are unregistered by a background thread once the pass is over."""
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    ref = dict(iter_safetensors(path))
    dma = DeferredDma()
    got = dict(FastLoader(path, ring=dma, ring_config=SMALL_RING).iter_device(dtype=jnp.float32))
    for name, a in got.items():
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), ref[name].astype(np.float32))
    deadline = time.monotonic() + 10
    while dma.live and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dma.registrations == SMALL_RING.threads and dma.live == {}


@cpu_only
def test_row_shards_go_through_the_ring_and_column_slices_through_the_slab(tiny_hf_model,
                                                                          rows_and_columns_sharding):
    """Row-split and replicated tensors are copied to each device that holds them; a column split needs a
    host-side slice, so it takes the slab; all land in their shardings."""
    sharding_for = rows_and_columns_sharding
    path = tiny_hf_model("llama", sharded=True, dtype="float32")
    ref = dict(iter_safetensors(path))
    dma = DeferredDma()
    loader = FastLoader(path, split_bytes=1 << 14, ring=dma, ring_config=SMALL_RING,
                        release_in_background=False)
    for name, a in loader.iter_device(sharding_for=sharding_for):
        np.testing.assert_array_equal(np.asarray(a), ref[name])
        assert a.sharding == sharding_for(name, a.shape), name
    extra = loader.stats.extra
    assert extra["staging"].startswith("ring+slab"), extra["staging"]
    columns = sum(x.nbytes for n, x in ref.items() if "o_proj" in n)
    replicated = sum(x.nbytes for n, x in ref.items() if "q_proj" not in n and "o_proj" not in n)
    rows = sum(x.nbytes for n, x in ref.items() if "q_proj" in n)
    # Replicated tensors go to all 4 devices, a row shard's halves to 2 devices each.
    assert extra["ring_bytes"] == 4 * replicated + 2 * rows
    assert loader.stats.bytes_read == sum(x.nbytes for x in ref.values()) + columns
    assert dma.live == {}


@cpu_only
def test_an_early_exit_cancels_the_rest_and_unregisters(tiny_hf_model):
    """Closing the iterator after one tensor returns promptly: what the ring had not copied is cancelled,
    every queued copy is waited for before the slots are unregistered, and the budget is back to zero."""
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    dma = DeferredDma()
    loader = FastLoader(path, num_workers=4, ring=dma, ring_config=SMALL_RING, release_in_background=False)
    it = loader.iter_device()
    next(it)
    it.close()
    assert dma.live == {} and not dma.queued and loader.budget.in_use == 0


@cpu_only
def test_a_truncated_file_raises_its_error_and_releases_the_ring(tiny_hf_model, tmp_path):
    """A file that ends before its data does fails the load with the reader's ValueError (not a hang or
    a cancelled job), and the ring is still unregistered."""
    src = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    path = tmp_path / "truncated"
    shutil.copytree(src, path)
    last = sorted(path.glob("*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-5000])
    dma = HostMemoryDma()
    with pytest.raises(ValueError, match="truncated checkpoint"):
        dict(FastLoader(path, ring=dma, ring_config=SMALL_RING, release_in_background=False).iter_device())
    assert dma.live == {}


@cpu_only
def test_files_not_in_the_page_cache_take_the_slab(tiny_hf_model, monkeypatch):
    """Residency is judged per file: a cold file's tensors are read by the slab's large parallel reads
    (faster from disk than the ring's small chunks), the warm files' go through the ring."""
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    plan = plan_checkpoint(path)
    files = sorted({t.path for t in plan})
    assert len(files) > 1
    monkeypatch.setattr(direct_mod, "file_resident", lambda p: p != files[0])
    ref = dict(iter_safetensors(path))
    loader = FastLoader(path, ring=DeferredDma(), ring_config=SMALL_RING)
    got = dict(loader.iter_device())
    assert all(_same(a, ref[n]) for n, a in got.items())
    cold = sum(t.nbytes for t in plan if t.path == files[0])
    assert loader.stats.extra["ring_bytes"] == sum(x.nbytes for x in ref.values()) - cold > 0
    assert loader.stats.extra["staging"].startswith("ring+slab")


@cpu_only
def test_a_refused_registration_leaves_everything_to_the_slab(tiny_hf_model):
    """Where the slots cannot be pinned, the load goes through the slab and still returns every tensor."""
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    ref = dict(iter_safetensors(path))
    dma = HostMemoryDma(fail_after=0)
    dma.copied.set()  # refuse at once
    loader = FastLoader(path, ring=dma, ring_config=SMALL_RING)
    got = dict(loader.iter_device())
    assert all(_same(a, ref[n]) for n, a in got.items())
    assert loader.stats.extra["staging"].startswith("slab") and dma.copies == 0


@cpu_only
def test_load_model_state_takes_the_ring_prepared_beside_the_abstract_model(tiny_hf_model):
    """load_model_state sets the ring up in the background (`prepare`) while it builds the abstract model;
    the pass uses that one ring (one registration per thread, released after) and the state equals the slab
    path's."""
    from flax import nnx

    from rtp_jax.loader import load_model_config
    from rtp_jax.loader.fast import load_model_state

    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    config = load_model_config(path)
    dma, stats = DeferredDma(), {}
    _, state = load_model_state(path, config, jnp.float32, stats=stats, ring=dma, ring_config=SMALL_RING,
                                release_in_background=False)
    _, ref = load_model_state(path, config, jnp.float32, staging="slab")
    got, want = nnx.to_pure_dict(state), nnx.to_pure_dict(ref)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == jnp.float32 and bool(jnp.array_equal(a, b))
    assert stats["staging"] == "ring" and dma.registrations == SMALL_RING.threads and dma.live == {}


@cpu_only
def test_a_prepared_ring_is_released_when_no_pass_takes_it(tiny_hf_model):
    """A ring set up ahead (`prepare`) goes back when the caller fails before loading (`close`), and when
    the pass itself fails before its jobs start (here `sharding_for` raises): nothing stays pinned."""
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    dma = DeferredDma()
    loader = FastLoader(path, ring=dma, ring_config=SMALL_RING)
    loader.prepare()
    loader.close()
    assert dma.registrations == 1 and dma.live == {}  # thread 0's slots: the others pin when copying

    def bad_sharding(name, shape):
        raise ValueError(f"no sharding for {name}")

    loader = FastLoader(path, ring=dma, ring_config=SMALL_RING)
    loader.prepare()
    with pytest.raises(ValueError, match="no sharding for"):
        next(loader.iter_device(sharding_for=bad_sharding))
    loader.close()  # nothing left to close: the pass took the ring
    assert dma.registrations == 2 and dma.live == {}


@cpu_only
def test_a_thread_whose_slots_cannot_be_pinned_leaves_its_chunks_to_the_others(tiny_hf_model):
    """Thread 0's slots are registered up front (a refusal there sends the load to the slab); each other
    thread registers its own when it starts. When those later registrations are refused, the threads that
    could pin copy every chunk: all tensors arrive, the failures are counted, nothing stays pinned."""
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    ref = dict(iter_safetensors(path))
    dma = HostMemoryDma(fail_after=1)
    loader = FastLoader(path, ring=dma, ring_config=SMALL_RING, release_in_background=False)
    got = dict(loader.iter_device())
    assert list(got) == list(ref) and all(_same(a, ref[n]) for n, a in got.items())
    extra = loader.stats.extra
    assert extra["staging"] == "ring" and extra["ring_bytes"] == sum(x.nbytes for x in ref.values())
    assert extra["ring_register_failures"] == SMALL_RING.threads - 1 and dma.live == {}


def test_ring_config_names_the_bad_field():
    """Bad ring shapes and staging names are refused with the field and what was expected."""
    from rtp_jax.bench_cli import parse_ring_config

    assert parse_ring_config("12x2x4") == RingConfig(threads=12, slots=2, chunk_bytes=4 << 20)
    with pytest.raises(ValueError, match="--ring-config must be THREADSxSLOTSxMIB"):
        parse_ring_config("12x2")
    with pytest.raises(ValueError, match="RingConfig.slots must be >= 1"):
        parse_ring_config("12x0x4")
    with pytest.raises(ValueError, match="RingConfig.chunk_bytes must be >= 1"):
        RingConfig(chunk_bytes=0)
    with pytest.raises(ValueError, match="staging must be 'ring', 'slab'"):
        FastLoader(".", staging="rings")


def test_cuda_ring_matches_the_slab_path(tiny_hf_model):
    """On a CUDA GPU: the default staging is the ring (4 KiB chunks here, so copies span slots and reuse
    them), with the same bits as the slab path."""
    if host_dma() is None:
        pytest.skip("needs a CUDA GPU with read-only host registration")
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    ref = dict(FastLoader(path, staging="slab").iter_device())
    loader = FastLoader(path, ring_config=SMALL_RING, release_in_background=False)
    got = dict(loader.iter_device())
    assert loader.stats.extra["staging"] == "ring", loader.stats.extra
    assert list(got) == list(ref) and len(plan_checkpoint(path)) == len(got)
    for name, a in got.items():
        assert a.dtype == ref[name].dtype and bool(jnp.array_equal(a, ref[name])), name
