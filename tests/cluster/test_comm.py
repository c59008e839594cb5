"""cluster/comm.py: exact sums and rank-order gathers across processes, timeouts, no /dev/shm leftovers.

Multi-process runs use torch.multiprocessing spawn; single-process tests drive several ranks from
threads (ShmGroup does not care whether its peers are threads or processes).
"""

import hashlib
import os
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.comm import SEGMENT_PREFIX, SHM_DIR, GlooGroup, ShmGroup, shm_supported
from tests.ports import free_port

SIZES = (1, 576, 4608, 18432)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ELEMS = 8192  # so 18432-element calls go through three chunks
NUM_CALLS = 200  # consecutive all_reduces: exercises both parity buffers many times over
GATHER_SHAPE = (3, 8)

needs_shm = pytest.mark.skipif(not shm_supported(), reason="ShmGroup needs x86-64 and /dev/shm")


def _segments() -> set[str]:
    """Segments this test process created (names carry the creator's pid; others may run beside us)."""
    mine = f"{SEGMENT_PREFIX}{os.getpid()}-"
    return {f for f in os.listdir(SHM_DIR) if f.startswith(mine)} if os.path.isdir(SHM_DIR) else set()


@pytest.fixture(autouse=True)
def no_segment_leftovers():
    before = _segments()
    yield
    assert _segments() - before == set(), "a test left a shared-memory segment behind"


def test_leftover_check_sees_segments_this_process_creates():
    name = ShmGroup.create_segment(2, 8)
    try:
        assert name in _segments()
    finally:
        ShmGroup.unlink_segment(name)
    assert name not in _segments()


def _inputs(call: int, world: int, numel: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Every rank's input for one call; any rank can rebuild all of them (seeded by call, rank)."""
    return [
        torch.randn(numel, generator=torch.Generator().manual_seed(call * 1000 + r)).to(dtype)
        for r in range(world)
    ]


def _reference_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum ShmGroup promises: rank order; half types over > 2 ranks accumulate in float32."""
    if len(parts) > 2 and parts[0].dtype != torch.float32:
        acc = parts[0].float()
        for p in parts[1:]:
            acc += p
        return acc.to(parts[0].dtype)
    acc = parts[0].clone()
    for p in parts[1:]:
        acc += p
    return acc


def _as_bytes(t: torch.Tensor) -> bytes:
    return t.float().reshape(-1).numpy().tobytes()  # float16/bfloat16 -> float32 is exact


def _run_collectives(rank: int, world: int, kind: str, segment: str | None, port: int, out_dir: str):
    """Spawned rank: NUM_CALLS all_reduces with gathers interleaved, checked against references."""
    torch.set_num_threads(1)
    if kind == "shm":
        group = ShmGroup(segment, rank, world, MAX_ELEMS, timeout_s=60)
    else:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=60),
        )
        group = GlooGroup(None, rank, world)
    assert (group.rank, group.size) == (rank, world)
    digest = hashlib.sha256()
    try:
        for call in range(NUM_CALLS):
            numel = SIZES[call % len(SIZES)]
            dtype = DTYPES[(call // len(SIZES)) % len(DTYPES)]
            parts = _inputs(call, world, numel, dtype)
            x = parts[rank].clone()
            if call % 5 == 0:  # a strided (non-contiguous) input with the same values
                x = torch.stack([x, torch.zeros_like(x)], dim=1)[:, 0]
            out = group.all_reduce(x)
            expected = _reference_sum(parts)
            assert out.shape == expected.shape and out.dtype == dtype
            if kind == "shm":
                assert torch.equal(out, expected), f"call {call}: {numel} x {dtype} differs from the rank-order sum"
            else:  # gloo picks its own summation order
                atol = 1e-5 if dtype == torch.float32 else 5e-2
                torch.testing.assert_close(out, expected, rtol=1e-2, atol=atol)
            digest.update(_as_bytes(out))

            if call % 4 == 3:  # gathers share the call sequence (and parity) with the reduces
                dim = (-1, 0)[call % 8 == 7]
                gparts = [p.reshape(GATHER_SHAPE) for p in _inputs(10_000 + call, world, 24, dtype)]
                gathered = group.all_gather(gparts[rank].clone(), dim=dim)
                assert torch.equal(gathered, torch.cat(gparts, dim=dim)), f"call {call}: gather order"
            if call % 50 == 49:  # a gather bigger than one shared-memory slot
                big = _inputs(20_000 + call, world, MAX_ELEMS + 808, dtype)
                assert torch.equal(group.all_gather(big[rank].clone(), dim=0), torch.cat(big))
        with open(os.path.join(out_dir, f"{rank}.digest"), "w") as f:
            f.write(digest.hexdigest())
    finally:
        if kind == "shm":
            group.close()
        else:
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, world",
    [pytest.param("shm", 2, marks=needs_shm), pytest.param("shm", 3, marks=needs_shm), ("gloo", 2), ("gloo", 3)],
)
def test_collectives_across_processes(kind, world, tmp_path):
    # world 3 on this 2-core machine also checks that waiting ranks yield instead of livelocking.
    segment = ShmGroup.create_segment(world, MAX_ELEMS) if kind == "shm" else None
    try:
        mp.spawn(
            _run_collectives, args=(world, kind, segment, free_port(), str(tmp_path)), nprocs=world, join=True
        )
    finally:
        if segment is not None:
            ShmGroup.unlink_segment(segment)
    digests = {(tmp_path / f"{r}.digest").read_text() for r in range(world)}
    assert len(digests) == 1, "ranks did not all get bitwise-identical all_reduce results"


# ---- single-process tests: ranks as threads ------------------------------------------------------


def _run_ranks(fns) -> list:
    """Run one callable per rank in threads; return each one's result or raised exception."""
    results: list = [None] * len(fns)

    def call(i):
        try:
            results[i] = fns[i]()
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


@pytest.fixture
def segment_factory():
    names = []

    def make(world, max_elems=64):
        names.append(ShmGroup.create_segment(world, max_elems))
        return names[-1]

    yield make
    for name in names:
        ShmGroup.unlink_segment(name)


@needs_shm
def test_peer_that_never_arrives_times_out_naming_it(segment_factory):
    name = segment_factory(2)
    with ShmGroup(name, 0, 2, 64, timeout_s=0.3) as group:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"rank 0: timed out after 0\.3 s in call 1 waiting for rank 1"):
            group.all_reduce(torch.ones(4))
        assert 0.3 <= time.monotonic() - start < 5
        with pytest.raises(RuntimeError, match="broken group"):  # no silent reuse after a failure
            group.all_reduce(torch.ones(4))


@needs_shm
def test_timeout_aborts_peers_waiting_on_the_same_call(segment_factory):
    name = segment_factory(3)
    impatient = ShmGroup(name, 0, 3, 64, timeout_s=0.3)
    patient = ShmGroup(name, 1, 3, 64, timeout_s=60)  # rank 2 never comes
    start = time.monotonic()
    results = _run_ranks([lambda: impatient.all_reduce(torch.ones(4)), lambda: patient.all_reduce(torch.ones(4))])
    elapsed = time.monotonic() - start
    impatient.close()
    patient.close()
    assert isinstance(results[0], RuntimeError) and "waiting for rank 2" in str(results[0])
    assert isinstance(results[1], RuntimeError) and "rank 0 aborted the group" in str(results[1])
    assert elapsed < 10, "the patient rank should fail through the abort word, not its own 60 s timeout"


@needs_shm
@pytest.mark.parametrize(
    "op0, op1, text",
    [
        (lambda g: g.all_reduce(torch.ones(4)), lambda g: g.all_reduce(torch.ones(5)), "5 float32"),
        (lambda g: g.all_reduce(torch.ones(4)), lambda g: g.all_gather(torch.ones(4)), "all_gather"),
        (lambda g: g.all_reduce(torch.ones(4)), lambda g: g.all_reduce(torch.ones(4, dtype=torch.bfloat16)), "bfloat16"),
    ],
)
def test_mismatched_calls_raise_on_every_rank(segment_factory, op0, op1, text):
    name = segment_factory(2)
    groups = [ShmGroup(name, r, 2, 64, timeout_s=10) for r in range(2)]
    results = _run_ranks([lambda: op0(groups[0]), lambda: op1(groups[1])])
    for g in groups:
        g.close()
    for r in range(2):
        assert isinstance(results[r], ValueError), results[r]
        assert "collective mismatch" in str(results[r]) and text in str(results[r])


@needs_shm
def test_consecutive_calls_from_threads_alternate_parity(segment_factory):
    # Cheap in-process cousin of the spawn test: many calls, uneven thread scheduling.
    name = segment_factory(3, max_elems=100)
    groups = [ShmGroup(name, r, 3, 100, timeout_s=30) for r in range(3)]
    inputs = [_inputs(call, 3, 250, torch.float32) for call in range(60)]

    def rank_fn(r):
        return lambda: [groups[r].all_reduce(inputs[c][r]) for c in range(60)]

    results = _run_ranks([rank_fn(r) for r in range(3)])
    for g in groups:
        g.close()
    for r in range(3):
        assert not isinstance(results[r], Exception), results[r]
        for c in range(60):
            assert torch.equal(results[r][c], _reference_sum(inputs[c]))


@needs_shm
def test_single_rank_group_is_identity_and_does_not_alias(segment_factory):
    name = segment_factory(1, max_elems=16)
    with ShmGroup(name, 0, 1, 16) as group:
        x = torch.arange(40, dtype=torch.float32).reshape(5, 8)  # 40 > 16: chunked
        out = group.all_reduce(x)
        gathered = group.all_gather(x, dim=0)
        x += 1
        assert torch.equal(out, torch.arange(40, dtype=torch.float32).reshape(5, 8))
        assert torch.equal(gathered, out)


@needs_shm
def test_unlink_after_open_leaves_mapping_usable():
    name = ShmGroup.create_segment(1, 8)
    group = ShmGroup(name, 0, 1, 8)
    ShmGroup.unlink_segment(name)  # e.g. right after every rank opened: nothing can leak later
    assert not os.path.exists(os.path.join(SHM_DIR, name))
    assert torch.equal(group.all_reduce(torch.ones(3)), torch.ones(3))
    ShmGroup.unlink_segment(name)  # idempotent
    group.close()
    group.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        group.all_reduce(torch.ones(3))


@needs_shm
def test_bad_arguments_are_refused_clearly(segment_factory):
    name = segment_factory(2, max_elems=64)
    with pytest.raises(ValueError, match="expected .* for world=3, max_elems=64"):
        ShmGroup(name, 0, 3, 64)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        ShmGroup(name, 2, 2, 64)
    with pytest.raises(ValueError, match="plain file name"):
        ShmGroup("../etc/passwd", 0, 2, 64)
    with pytest.raises(ValueError, match="world must be >= 1, got 0"):
        ShmGroup.create_segment(0, 64)
    with pytest.raises(ValueError, match="max_elems must be >= 1, got 0"):
        ShmGroup.create_segment(2, 0)
    with ShmGroup(name, 0, 2, 64) as group:
        with pytest.raises(ValueError, match="dtype torch.float64 not supported"):
            group.all_reduce(torch.ones(3, dtype=torch.float64))
