"""The fast loader: same tensors as the plain iterator, bounded memory, sharded placement, orbax round trip,
and `rtp-jax bench load` on a tiny checkpoint."""

from __future__ import annotations

import json
import statistics
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rtp_jax.loader import iter_weights, load_model_config, resolve_model_path
from rtp_jax.loader.fast import (
    ByteBudget,
    FastLoader,
    StagingSlab,
    _split_jobs,
    abstract_state,
    load_model_state,
    plan_checkpoint,
)
from rtp_jax.loader.orbax_io import (
    is_orbax_checkpoint,
    iter_orbax_weights,
    restore_state,
    save_model_dir,
    save_state,
)
from rtp_jax.loader.safetensors_io import iter_safetensors
from rtp_jax.models.params import flat_param_shapes


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _sharding_by_name(specs: dict[str, PartitionSpec]):
    """A `sharding_for(name, shape)` over a 2x2 mesh ("a", "b") of 4 devices: the spec of the first key
    contained in the name, else replicated. Skips the test with fewer than 4 devices."""
    devices = np.array(jax.devices()[:4])
    if devices.size < 4:
        pytest.skip("needs 4 devices")
    mesh = Mesh(devices.reshape(2, 2), ("a", "b"))

    def sharding_for(name, shape):
        return NamedSharding(mesh, next((v for k, v in specs.items() if k in name), PartitionSpec()))

    return sharding_for


@pytest.mark.parametrize("family,dtype", [("llama", "bfloat16"), ("qwen3_moe", "float32")])
@pytest.mark.parametrize("use_mmap", [False, True])
def test_iter_host_matches_plain_iterator(tiny_hf_model, family, dtype, use_mmap):
    path = tiny_hf_model(family, sharded=True, dtype=dtype)
    ref = list(iter_safetensors(path))
    loader = FastLoader(path, num_readers=4, num_workers=3, chunk_bytes=1 << 16, max_inflight_bytes=1 << 17,
                        use_mmap=use_mmap)
    got = list(loader.iter_host())
    assert [n for n, _ in got] == [n for n, _ in ref]
    for (name, a), (_, b) in zip(got, ref, strict=True):
        assert _same(np.asarray(a), b), name


def test_iter_device_matches_plain_iterator(tiny_hf_model):
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    ref = dict(iter_safetensors(path))
    got = dict(FastLoader(path, chunk_bytes=1 << 16).iter_device())
    assert list(got) == list(ref)
    for name, a in got.items():
        assert isinstance(a, jax.Array)
        assert _same(np.asarray(a), ref[name]), name
    cast = dict(FastLoader(path).iter_device(dtype=jnp.float32))
    for name, a in cast.items():
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), ref[name].astype(np.float32))


@pytest.mark.parametrize("limit_of_largest", [0.5, 1.5, 4.0])
def test_iter_device_slab_matches_plain_iterator(tiny_hf_model, limit_of_largest):
    """The reused staging slab: bit-identical tensors while its ranges are recycled (a budget below the
    largest tensor sends that tensor through a fresh buffer), nothing aliases the slab afterwards."""
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    ref = dict(iter_safetensors(path))
    limit = int(max(x.nbytes for x in ref.values()) * limit_of_largest)
    loader = FastLoader(path, num_readers=4, num_workers=4, chunk_bytes=1 << 16, max_inflight_bytes=limit,
                        direct=False)
    got = dict(loader.iter_device())
    assert loader.stats.extra["staging"] in ("slab", "slab+dma")  # dma-mapped where the runtime can
    assert loader.stats.extra["slab_bytes"] <= limit + 4096
    assert 0 < loader.stats.extra["slab_peak_bytes"] <= loader.stats.extra["slab_bytes"]
    assert list(got) == list(ref)
    for name, a in got.items():
        assert _same(np.asarray(a), ref[name]), name
    cast = dict(FastLoader(path, max_inflight_bytes=limit).iter_device(dtype=jnp.float32))
    for name, a in cast.items():
        np.testing.assert_array_equal(np.asarray(a), ref[name].astype(np.float32))
    plain = dict(FastLoader(path, staging="none").iter_device())
    for name, a in plain.items():
        assert _same(np.asarray(a), ref[name]), name


def test_iter_device_mmap_path_before_the_slab_is_ready(tiny_hf_model, monkeypatch):
    """Tensors that start while the slab is still being set up go through an mmap of their bytes."""
    import rtp_jax.loader.fast as fast

    monkeypatch.setattr(fast._Ctx, "slab", lambda self: None)
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    ref = dict(iter_safetensors(path))
    got = dict(FastLoader(path, chunk_bytes=1 << 16, staging="slab_async").iter_device())
    assert list(got) == list(ref)
    for name, a in got.items():
        assert _same(np.asarray(a), ref[name]), name
    devices = np.array(jax.devices()[:2])
    if devices.size == 2:
        mesh = Mesh(devices, ("a",))
        for name, a in FastLoader(path, staging="slab_async").iter_device(
                sharding_for=lambda n, shape: NamedSharding(mesh, PartitionSpec(None, "a") if len(shape) == 2
                                                            else PartitionSpec())):
            np.testing.assert_array_equal(np.asarray(a), ref[name])


def test_split_jobs_cover_every_row_once(tiny_hf_model):
    path = tiny_hf_model("llama", sharded=True, dtype="float32")
    t = max(plan_checkpoint(path), key=lambda t: t.nbytes)
    rows, rb = t.entry.shape[0], t.nbytes // t.entry.shape[0]
    full = {None: (0, rows, (slice(None),))}
    (whole,) = _split_jobs(t, full, 0)
    assert whole.parts == 1 and whole.nbytes == t.nbytes
    for split in (rb, 3 * rb + 1, t.nbytes // 3, t.nbytes - 1):
        jobs = _split_jobs(t, full, split)
        assert [j.part for j in jobs] == list(range(len(jobs))) and all(j.parts == len(jobs) for j in jobs)
        assert all(0 < j.nbytes <= split for j in jobs)
        covered = [r for j in jobs for _, r0, r1, _ in j.ranges for r in range(r0, r1)]
        assert covered == list(range(rows))
    halves = {"a": (0, rows // 2, (slice(None),)), "b": (rows // 2, rows, (slice(None),))}
    jobs = _split_jobs(t, halves, rb * (rows // 4))
    assert sorted({j.ranges[0][0] for j in jobs}) == ["a", "b"] and sum(j.nbytes for j in jobs) == t.nbytes


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
@pytest.mark.parametrize("assemble", ["concat", "dus"])
def test_tensors_larger_than_a_piece_stream_through_a_small_slab(tiny_hf_model, assemble):
    """Tensors above `split_bytes` go through the slab in row pieces joined on the device: bit-identical,
    cast on the device, sharded (rows, columns, replicated), and no host buffer beyond the slab."""
    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    ref = dict(iter_safetensors(path))
    largest = max(x.nbytes for x in ref.values())
    split, limit = largest // 5, largest // 2  # the slab is smaller than the largest tensor
    kw = dict(num_readers=4, num_workers=4, chunk_bytes=1 << 12, max_inflight_bytes=limit, split_bytes=split,
              assemble=assemble, direct=False)
    loader = FastLoader(path, **kw)
    got = dict(loader.iter_device())
    assert list(got) == list(ref) and loader.stats.num_tensors == len(ref)
    for name, a in got.items():
        assert _same(np.asarray(a), ref[name]), name
    assert loader.stats.bytes_read == sum(x.nbytes for x in ref.values())
    assert loader.budget.peak <= limit and loader.stats.extra["slab_peak_bytes"] <= limit + 4096
    for name, a in FastLoader(path, **kw).iter_device(dtype=jnp.float32):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), ref[name].astype(np.float32))
    sharding_for = _sharding_by_name({"embed": PartitionSpec("a", None), "lm_head": PartitionSpec(None, "b"),
                                      "gate_proj": PartitionSpec(("a", "b"), None)})

    loader = FastLoader(path, **kw)
    for name, a in loader.iter_device(sharding_for=sharding_for, dtype=jnp.float32):
        assert a.sharding == sharding_for(name, a.shape) and a.dtype == jnp.float32, name
        np.testing.assert_array_equal(np.asarray(a), ref[name].astype(np.float32))
    assert loader.stats.num_tensors == len(ref)


def test_abstract_state_matches_abstract_model(tiny_hf_model):
    from rtp_jax.models.params import abstract_model

    for family in ("llama", "qwen2", "mixtral"):
        cfg = load_model_config(tiny_hf_model(family))
        g1, s1 = abstract_state(cfg, jnp.bfloat16)
        g2, s2 = abstract_model(cfg, jnp.bfloat16)
        assert g1 == g2 and jax.tree.structure(s1) == jax.tree.structure(s2)
        assert flat_param_shapes(s1) == flat_param_shapes(s2)


def test_staging_slab_allocator():
    slab = StagingSlab(5 * 4096, populate_threads=2)
    assert slab.size == 5 * 4096 and slab.address % 4096 == 0
    a = slab.alloc(1)  # page-rounded
    b = slab.alloc(4096 + 1)
    c = slab.alloc(2 * 4096)
    assert (a, b, c) == (0, 4096, 3 * 4096) and slab.in_use == slab.peak == 5 * 4096
    slab.view(b, 8)[:] = 7
    slab.free(a)
    slab.free(c)
    with pytest.raises(ValueError):
        slab.alloc(6 * 4096)
    got = []
    waiter = threading.Thread(target=lambda: got.append(slab.alloc(4 * 4096)))  # needs b's pages too
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got
    slab.free(b)  # holes merge into one: the waiter fits
    waiter.join(5)
    assert got == [0] and slab.in_use == 4 * 4096
    slab.free(0)
    assert slab.in_use == 0 and slab.peak == 5 * 4096
    slab.close()


def test_segmented_slab_allocates_each_segment_once_ready_and_never_across_an_edge():
    """A slab prepared in segments hands out ranges from a segment only after that segment is ready,
    rejects requests above one segment, and never merges freed holes across a segment edge (a transfer
    must lie within one registration)."""
    slab = StagingSlab(4 * 4096, populate_threads=1, segment_bytes=2 * 4096, prepare=False)
    assert slab.max_alloc == 2 * 4096
    with pytest.raises(ValueError, match="segment"):
        slab.alloc(3 * 4096)
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(slab.alloc(4096)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got  # nothing is ready before prepare
    slab.prepare()
    waiter.join(5)
    assert got == [0] and slab.setup_s > 0 and not slab.dma_mapped
    b, c, d = (slab.alloc(4096) for _ in range(3))
    assert (b, c, d) == (4096, 2 * 4096, 3 * 4096)
    slab.free(b)
    slab.free(c)  # two free pages side by side, but on either side of the edge at 2 pages
    waiter = threading.Thread(target=lambda: got.append(slab.alloc(2 * 4096)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()
    slab.free(d)  # the second segment is whole again
    waiter.join(5)
    assert got == [0, 2 * 4096]
    slab.close()


def test_sharded_placement_through_a_small_slab(tiny_hf_model):
    path = tiny_hf_model("llama", sharded=True, dtype="float32")
    sharding_for = _sharding_by_name({"q_proj": PartitionSpec("a", None), "o_proj": PartitionSpec(None, "b")})

    ref = dict(iter_safetensors(path))
    limit = 2 * max(x.nbytes for x in ref.values())
    loader = FastLoader(path, num_workers=4, max_inflight_bytes=limit, direct=False)
    for name, a in loader.iter_device(sharding_for=sharding_for):
        np.testing.assert_array_equal(np.asarray(a), ref[name])
        assert a.sharding == sharding_for(name, a.shape), name
    assert loader.stats.extra["staging"] in ("slab", "slab+dma")  # dma-mapped where the runtime can


def test_budget_bounds_bytes_in_flight(tiny_hf_model):
    """The instrumented counter never exceeds the limit (or one tensor, when a tensor is larger)."""
    path = tiny_hf_model("llama", sharded=True, dtype="float32")
    sizes = [t.nbytes for t in plan_checkpoint(path)]
    limit = 3 * max(sizes) // 2
    for mode in ("host", "device"):
        loader = FastLoader(path, num_readers=8, num_workers=8, chunk_bytes=1 << 12, max_inflight_bytes=limit)
        it = loader.iter_host() if mode == "host" else loader.iter_device()
        n = sum(1 for _ in it)
        assert n == len(sizes)
        assert 0 < loader.budget.peak <= limit, (mode, loader.budget.peak, limit)
        assert loader.budget.in_use == 0
    tiny = FastLoader(path, max_inflight_bytes=1)  # smaller than any tensor: one at a time
    assert sum(1 for _ in tiny.iter_host()) == len(sizes)
    assert tiny.budget.peak == max(sizes)


def test_budget_counter_blocks():
    b = ByteBudget(10)
    b.acquire(6)
    b.acquire(4)
    assert b.in_use == 10 and b.peak == 10
    b.release(10)
    b.acquire(25)  # alone: larger than the limit
    assert b.peak == 25
    b.release(25)


def test_early_exit_releases_everything(tiny_hf_model):
    path = tiny_hf_model("llama", sharded=True, dtype="float32")
    loader = FastLoader(path, max_inflight_bytes=1 << 16)
    it = loader.iter_host()
    next(it)
    it.close()
    assert loader.budget.in_use == 0


def test_sharded_placement_reads_only_local_shards(tiny_hf_model):
    path = tiny_hf_model("llama", sharded=True, dtype="float32")
    sharding_for = _sharding_by_name({"q_proj": PartitionSpec("a", None), "o_proj": PartitionSpec(None, "b"),
                                      "embed": PartitionSpec(("a", "b"), None)})

    ref = dict(iter_safetensors(path))
    loader = FastLoader(path)
    got = dict(loader.iter_device(sharding_for=sharding_for))
    for name, a in got.items():
        np.testing.assert_array_equal(np.asarray(a), ref[name])
        assert a.sharding == sharding_for(name, a.shape), name
    # Row splits read only their rows; replicated tensors are read once; a column split (o_proj over
    # "b") reads its covering rows once per distinct shard (2 here), then slices.
    extra = sum(x.nbytes for n, x in ref.items() if "o_proj" in n)
    assert loader.stats.bytes_read == sum(x.nbytes for x in ref.values()) + extra
    per_device = {"q_proj": 2, "o_proj": 2, "embed": 1}  # copies of the whole tensor sent to 4 devices
    assert loader.stats.bytes_to_device == sum(
        x.nbytes * next((c for k, c in per_device.items() if k in n), 4) for n, x in ref.items())


def test_load_model_state_matches_load_state(tiny_hf_model):
    from rtp_jax.models.params import load_state

    for family in ("llama", "qwen2", "mixtral"):
        path = tiny_hf_model(family, sharded=True)
        cfg = load_model_config(path)
        _, want = load_state(cfg, jnp.float32, iter_weights(path, cfg))
        stats = {}
        _, got = load_model_state(path, cfg, jnp.float32, stats=stats)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert stats["format"] == "safetensors" and stats["num_tensors"] > 0


def test_orbax_state_round_trip(tmp_path, tiny_hf_model):
    path = tiny_hf_model("llama", sharded=True)
    cfg = load_model_config(path)
    _, state = load_model_state(path, cfg, jnp.float32)
    save_state(state, tmp_path / "ckpt")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    back = restore_state(abstract, tmp_path / "ckpt")
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_orbax_model_dir_generates_the_same(tmp_path, tiny_hf_model):
    from rtp_jax import LLM, SamplingParams

    path = tiny_hf_model("llama", sharded=True)
    kw = dict(max_model_len=128, num_kv_blocks=64, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9]}, {"prompt_token_ids": [100, 3, 44]}]
    llm = LLM(str(path), **kw)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    out = save_model_dir(llm.engine.core.runner.state, path, tmp_path / "orbax-model")
    assert is_orbax_checkpoint(out)
    assert resolve_model_path(out) == out.resolve()
    restored = LLM(str(out), **kw)  # restore_model_state, straight onto the device
    assert [o.outputs[0].token_ids for o in restored.generate(prompts, params, use_tqdm=False)] == want
    # The plain iterator over the orbax directory yields the same tensors the engine ran with.
    original = flat_param_shapes(llm.engine.core.runner.state)  # names of every parameter
    plain = dict(iter_orbax_weights(out))
    assert set(plain) == set(original)
    state = nnx.to_pure_dict(llm.engine.core.runner.state)
    np.testing.assert_array_equal(plain["model.embed_tokens.weight"],
                                  np.asarray(state["model"]["embed_tokens"]["weight"]))


def test_bench_load_cli(tmp_path, tiny_hf_model, capsys):
    from rtp_jax.cli import main

    path = tiny_hf_model("llama", sharded=True, dtype="bfloat16")
    out_json, out_md = tmp_path / "load.json", tmp_path / "load.md"
    rc = main(["bench", "load", "--model", str(path), "--repeats", "3", "--cold-repeats", "3",
               "--output-json", str(out_json), "--output-md", str(out_md)])
    assert rc == 0
    rep = json.loads(out_json.read_text())
    for key in ("bytes", "load_s", "warm_load_s", "naive_load_s", "disk_read_GBps", "peak_host_rss_GB",
                "cache_drop", "git_sha", "jax"):
        assert key in rep, key
    # The first warm load after the cold one is reported alone too, and the steady median without it.
    first, *rest = rep["warm_load_all_s"]
    assert rep["warm_first_load_s"] == first and rep["warm_steady_load_s"] == statistics.median(rest)
    assert [run["seconds"] for run in rep["warm_runs"]] == rep["warm_load_all_s"]
    # Disk reads and cold loads alternate; each side's median is reported, every run kept with its phases.
    assert len(rep["disk_read_all_s"]) == len(rep["load_all_s"]) == len(rep["cold_runs"]) == 3
    assert rep["load_s"] == statistics.median(rep["load_all_s"])
    assert rep["disk_read_s"] == statistics.median(rep["disk_read_all_s"])
    assert rep["cold_vs_disk"] == rep["disk_read_s"] / rep["load_s"]
    assert [run["seconds"] for run in rep["cold_runs"]] == rep["load_all_s"]
    assert rep["cold_phases"] == rep["cold_runs"][0]
    assert "first_job_start_s" in rep["cold_phases"]
    assert rep["bytes"] == sum(t.nbytes for t in plan_checkpoint(Path(path)))
    assert "warm_load_s" in out_md.read_text()
    assert '"load_s"' in capsys.readouterr().out


def test_phase_summary_measures_busy_time_and_overlap():
    """read/transfer busy seconds are the union of the jobs' intervals, and the mean number of jobs in
    each phase is their summed time over that union."""
    from rtp_jax.loader.accounting import LoadStats, covered_s, phase_summary

    assert covered_s([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == pytest.approx(3.0)
    stats = LoadStats(job_times=[(10.0, 11.0, 11.5), (10.5, 11.5, 12.0), (13.0, 14.0, 14.5)])
    got = phase_summary(stats, t0=9.0)
    assert got["read_busy_s"] == pytest.approx(2.5) and got["mean_reading"] == pytest.approx(3.0 / 2.5)
    assert got["transfer_busy_s"] == pytest.approx(1.5) and got["mean_transferring"] == pytest.approx(1.0)
    assert got["first_job_start_s"] == pytest.approx(1.0) and got["last_job_end_s"] == pytest.approx(5.5)
    assert phase_summary(LoadStats(), t0=0.0) == {}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_staging_memory_is_a_private_mapping():
    """The slab's and the ring's host memory is a private anonymous mapping: a shared one (Python's
    `mmap.mmap(-1, n)` default) is shmem, which the kernel backs with huge pages only when shmem huge
    pages are enabled, so faulting it in took ~10x longer on the GPU host's kernel."""
    from rtp_jax.loader.staging import anonymous_map

    m = anonymous_map(4 << 20)
    try:
        address = np.frombuffer(m, np.uint8).ctypes.data
        for line in Path("/proc/self/maps").read_text().splitlines():
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                assert line.split()[1][3] == "p", line  # rw-p, not rw-s
                break
        else:
            pytest.fail("the mapping is not in /proc/self/maps")
    finally:
        m.close()


def test_staging_memory_is_faulted_in_a_few_mib_at_a_time():
    """The ring's and the slab's fault-in is a series of MADV_POPULATE_WRITE calls of at most
    `POPULATE_PIECE` bytes covering the range once, in order: the kernel holds the mmap lock through each
    call, so one call over the whole ring stalled every other thread's mmap (the abstract model's build
    beside it ran 3x slower on the H200 host). A failed call reports False (the caller then writes)."""
    from rtp_jax.loader.staging import _MADV_POPULATE_WRITE, POPULATE_PIECE, populate_write

    calls: list[tuple[int, int, int]] = []

    def madvise(address: int, nbytes: int, advice: int) -> int:
        calls.append((address, nbytes, advice))
        return 0

    size = 3 * POPULATE_PIECE + 8192
    assert populate_write(1 << 30, size, madvise)
    assert all(n <= POPULATE_PIECE and a == _MADV_POPULATE_WRITE for _, n, a in calls)
    assert [c[0] for c in calls] == [(1 << 30) + i * POPULATE_PIECE for i in range(4)]
    assert sum(n for _, n, _ in calls) == size
    assert not populate_write(0, size, lambda *_: -1)
