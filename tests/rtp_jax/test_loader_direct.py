"""Direct transfers from the page cache (`rtp_jax.loader.direct`), driven on the CPU by a host-memory
stand-in for the CUDA driver that enforces the driver's rules: registrations page-aligned and disjoint,
every copy inside one live registration, nothing left registered after a load."""

from __future__ import annotations

import mmap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from host_dma import HostMemoryDma

from rtp_jax.loader import direct as direct_mod
from rtp_jax.loader.cuda_dma import host_dma
from rtp_jax.loader.direct import DirectConfig, PageCacheSource, choose_direct, open_page_cache, resident
from rtp_jax.loader.fast import FastLoader, plan_checkpoint
from rtp_jax.loader.safetensors_io import iter_safetensors
from rtp_jax.loader.shards import _shard_reads

# small chunks and a window, unpinned before the load returns (so a test can see that nothing is left)
SMALL_CHUNKS = dict(direct_config=DirectConfig(chunk_bytes=2 * 4096, window_bytes=8 * 4096),
                    release_in_background=False)
cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu",
                              reason="the host-memory stand-in writes into CPU device buffers")


def _same(a, b) -> bool:
    a = np.asarray(a)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


@cpu_only
def test_direct_loads_every_tensor_bit_for_bit_and_unpins_everything(tiny_hf_model):
    """Small chunks and pieces, so tensors span several pinned chunks and are split into row pieces:
    every tensor arrives bit-identical, all bytes go the direct way, pinned memory stays below the
    checkpoint's size, and nothing is left registered."""
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    ref = dict(iter_safetensors(path))
    total = sum(x.nbytes for x in ref.values())
    dma = HostMemoryDma()
    loader = FastLoader(path, num_workers=3, split_bytes=3 * 4096, max_inflight_bytes=4 * 4096, direct=dma,
                        **SMALL_CHUNKS)
    got = dict(loader.iter_device())
    assert list(got) == list(ref)
    for name, a in got.items():
        assert isinstance(a, jax.Array) and _same(a, ref[name]), name
    extra = loader.stats.extra
    assert extra["staging"] == "direct" and extra["direct_bytes"] == total and extra["direct_failed"] is None
    assert 0 < extra["pinned_peak_bytes"] < total // 2
    assert dma.live == {} and dma.registrations > len(plan_checkpoint(path))
    cast = dict(FastLoader(path, split_bytes=3 * 4096, direct=HostMemoryDma(), **SMALL_CHUNKS)
                .iter_device(dtype=jnp.float32))
    for name, a in cast.items():
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), ref[name].astype(np.float32))


@cpu_only
def test_row_shards_go_direct_and_column_slices_through_the_slab(tiny_hf_model, rows_and_columns_sharding):
    """Row-split and replicated tensors are copied from the page cache to each device that holds them;
    a column split needs a host slice, so it takes the slab; all land in their shardings."""
    sharding_for = rows_and_columns_sharding
    path = tiny_hf_model("llama", sharded=True, dtype="float32")
    ref = dict(iter_safetensors(path))
    dma = HostMemoryDma()
    loader = FastLoader(path, split_bytes=1 << 14, direct=dma, **SMALL_CHUNKS)
    for name, a in loader.iter_device(sharding_for=sharding_for):
        np.testing.assert_array_equal(np.asarray(a), ref[name])
        assert a.sharding == sharding_for(name, a.shape), name
    extra = loader.stats.extra
    assert extra["staging"].startswith("direct+slab")
    columns = sum(x.nbytes for n, x in ref.items() if "o_proj" in n)
    assert extra["direct_bytes"] > 0
    assert loader.stats.bytes_read == sum(x.nbytes for x in ref.values()) + columns
    assert dma.live == {}


@cpu_only
def test_a_refused_registration_falls_back_to_the_host_path(tiny_hf_model):
    """When pinning fails part-way (as an unsupported mapping would), that job and every later one are
    read through the host path; the load still returns every tensor, and says why."""
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    ref = dict(iter_safetensors(path))
    dma = HostMemoryDma(fail_after=12)  # the first tensor spans 9 chunks
    loader = FastLoader(path, num_workers=2, split_bytes=3 * 4096, direct=dma, release_in_background=False,
                        direct_config=DirectConfig(chunk_bytes=8192, window_bytes=6 * 4096, pin_threads=1))
    got = dict(loader.iter_device())
    for name, a in got.items():
        assert _same(a, ref[name]), name
    assert "CUDA_ERROR_NOT_SUPPORTED" in loader.stats.extra["direct_failed"]
    assert 0 < loader.stats.extra["direct_bytes"] < sum(x.nbytes for x in ref.values())
    assert dma.live == {}


@cpu_only
@pytest.mark.parametrize("share,tail", [(1.0, False), (0.5, False), (0.5, True)])
def test_without_a_window_everything_stays_pinned_until_the_pass_ends(tiny_hf_model, share, tail):
    """The default: pin ahead with no limit and unpin after the pass (no unpinning beside the copies);
    with share 0.5 about half the bytes take the slab beside the direct copies (interleaved, or with
    `tail` the first half of the plan through the slab and the second direct)."""
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    ref = dict(iter_safetensors(path))
    total = sum(x.nbytes for x in ref.values())
    dma = HostMemoryDma()
    loader = FastLoader(path, split_bytes=3 * 4096, direct=dma, release_in_background=False,
                        direct_config=DirectConfig(chunk_bytes=2 * 4096, share=share, tail=tail))
    got = dict(loader.iter_device())
    for name, a in got.items():
        assert _same(a, ref[name]), name
    extra = loader.stats.extra
    assert dma.live == {} and extra["unpin_busy_s"] == 0.0  # nothing was unpinned during the pass
    if share == 1.0:
        assert extra["staging"] == "direct" and extra["direct_bytes"] == total
    else:
        assert extra["staging"].startswith("direct+slab")
        assert 0.3 * total < extra["direct_bytes"] < 0.7 * total
    if tail:  # the direct tensors are the last ones of the plan
        plan = plan_checkpoint(path)
        names = [t.name for t in plan]
        source = open_page_cache(plan, dma, loader.direct_config)
        direct_names = choose_direct(plan, source, {t.name: _shard_reads(t, None) for t in plan},
                                     loader.direct_config)
        source.close()
        first = min(names.index(n) for n in direct_names)
        assert direct_names == set(names[first:])


@cpu_only
def test_an_early_exit_drains_the_workers_before_unpinning(tiny_hf_model):
    """Closing the iterator after one tensor waits for the jobs in flight, then unpins and unmaps: nothing
    stays registered and the budget is back to zero (a worker copying from an unpinned page would be a
    use after free on a GPU)."""
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    dma = HostMemoryDma()
    loader = FastLoader(path, num_workers=4, split_bytes=3 * 4096, direct=dma, **SMALL_CHUNKS)
    it = loader.iter_device()
    next(it)
    it.close()
    assert dma.live == {} and loader.budget.in_use == 0


@cpu_only
def test_files_not_in_the_page_cache_take_the_slab(tiny_hf_model, monkeypatch):
    """Residency is judged per file: a cold file is read by the readers (pinning it would fault it in
    one page at a time), the warm ones are copied directly."""
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    files = sorted({t.path for t in plan_checkpoint(path)})
    assert len(files) > 1
    cold_fd = files[0]
    real = direct_mod.resident
    seen = []

    def fake_resident(mapping, *a, **k):
        seen.append(mapping)
        return len(seen) > 1 and real(mapping, *a, **k)  # the first file opened counts as cold

    monkeypatch.setattr(direct_mod, "resident", fake_resident)
    ref = dict(iter_safetensors(path))
    loader = FastLoader(path, direct=HostMemoryDma())
    got = dict(loader.iter_device())
    for name, a in got.items():
        assert _same(a, ref[name]), name
    cold = sum(t.nbytes for t in plan_checkpoint(path) if t.path == cold_fd)
    assert loader.stats.extra["direct_bytes"] == sum(x.nbytes for x in ref.values()) - cold
    assert loader.stats.extra["direct_files"] == len(files) - 1


def test_resident_sees_a_freshly_written_file(tmp_path):
    """mincore-based residency: a file just written sits in the page cache; an empty mapping is not
    worth pinning."""
    p = tmp_path / "f.bin"
    p.write_bytes(np.arange(1 << 20, dtype=np.uint8).tobytes())
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert resident(m)


@cpu_only
def test_source_pins_chunks_ahead_within_its_window_and_unpins_after_the_last_use(tmp_path):
    """Pinning runs ahead of the jobs in the order they need the chunks, never holding more than the
    window; a chunk used twice stays pinned until its second use ends; acquire splits at chunk edges."""
    page = mmap.PAGESIZE
    p = tmp_path / "f.bin"
    p.write_bytes(bytes(12 * page))
    dma = HostMemoryDma()
    src = PageCacheSource([p], dma, chunk_bytes=2 * page, window_bytes=6 * page, threads=2)
    src.expect(p, 100, 200)
    src.expect(p, 3000, 6000)  # spans chunks 0 and 1
    for k in range(2, 6):
        src.expect(p, k * 2 * page, 2 * page)
    src.start()
    pieces = src.acquire(p, 3000, 6000)
    assert [n for _, n in pieces] == [2 * page - 3000, 6000 - (2 * page - 3000)]
    src.release(p, 3000, 6000)
    src.acquire(p, 100, 200)
    src.release(p, 100, 200)  # chunk 0's last use
    for k in range(2, 6):
        src.acquire(p, k * 2 * page, 2 * page)
        src.release(p, k * 2 * page, 2 * page)
    src.close()
    assert dma.live == {} and dma.registrations == 6
    assert src.peak_pinned <= 6 * page and src.pinned == 0


def test_no_direct_path_on_the_cpu_backend():
    """host_dma() offers the CUDA driver only where every local device is a CUDA GPU."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU backend only")
    assert host_dma() is None


def test_cuda_direct_copies_match_the_slab_path(tiny_hf_model):
    """On a CUDA GPU that can pin read-only host memory: a resident checkpoint loads by DMA from the page
    cache (small chunks and pieces, so copies span registrations) with the same bits as the slab path."""
    if host_dma() is None:
        pytest.skip("needs a CUDA GPU with read-only host registration")
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    ref = dict(FastLoader(path).iter_device())
    loader = FastLoader(path, split_bytes=3 * 4096, max_inflight_bytes=8 * 4096, direct=True, **SMALL_CHUNKS)
    got = dict(loader.iter_device())
    assert loader.stats.extra["staging"] == "direct", loader.stats.extra
    assert list(got) == list(ref)
    for name, a in got.items():
        assert a.dtype == ref[name].dtype and bool(jnp.array_equal(a, ref[name])), name
