"""Engine behaviour on a real gang: batching invariance, preemption, cancellation, seeds, failures."""

from __future__ import annotations

import asyncio

import pytest

from cluster.engine import EngineDeadError
from cluster.protocol import GenerateRequest
from model.sampling import SamplingParams
from tests.cluster.test_engine_parity import tiny_engine
from tests.reference import close, collect, greedy, run_all

TARGET = [11, 23, 5, 87, 140, 6, 19]
OTHERS = [[3] * 30, [9, 8, 7], list(range(50, 90)), [1, 2], list(range(100, 113)), [77] * 5]


@pytest.fixture(scope="module")
def engine(ray_cluster, tiny_llama_dir):
    eng = tiny_engine(tiny_llama_dir, 1, 1)
    yield eng
    close(eng)


def test_output_alone_equals_output_inside_a_busy_mixed_batch(engine):
    alone = run_all(engine, [TARGET], greedy(16))[0]

    async def busy():
        # Others start first, so the target joins a batch that is mid-decode and mid-prefill.
        others = [asyncio.ensure_future(collect(engine, p, greedy(6 + 5 * i))) for i, p in enumerate(OTHERS)]
        await asyncio.sleep(0.05)
        target = await collect(engine, TARGET, greedy(16))
        await asyncio.gather(*others)
        return target

    assert asyncio.run(busy()).token_ids == alone.token_ids
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_preemption_keeps_outputs_and_frees_blocks(ray_cluster, tiny_llama_dir, engine):
    prompts = [list(range(10 + i, 40 + i)) for i in range(6)]
    want = run_all(engine, prompts, greedy(20))
    # 30 blocks of 4 tokens hold 120 tokens; six sequences of 50 need 300, so some are preempted.
    small = tiny_engine(tiny_llama_dir, 1, 1, num_kv_blocks=30, max_model_len=64)
    try:
        got = run_all(small, prompts, greedy(20))
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert small.scheduler.num_preemptions > 0
        assert small.allocator.num_free == small.allocator.num_blocks
    finally:
        close(small)


def test_cancelled_requests_free_their_blocks_at_once(engine):
    async def main():
        tasks = [asyncio.ensure_future(collect(engine, [4, 5, 6] * (i + 1), greedy(40))) for i in range(4)]
        await asyncio.sleep(0.3)
        for t in tasks[:2]:
            t.cancel()
        await asyncio.gather(*tasks[:2], return_exceptions=True)
        assert engine.stats().running + engine.stats().waiting <= 2
        done = await asyncio.gather(*tasks[2:])
        return done

    done = asyncio.run(main())
    assert all(len(d.token_ids) == 40 for d in done)
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_same_seed_same_output_and_different_seed_differs(engine):
    params = [SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=s, ignore_eos=True) for s in (1, 1, 2)]

    async def main():
        return await asyncio.gather(*(collect(engine, TARGET, p) for p in params))

    a, b, c = asyncio.run(main())
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_max_tokens_and_stop_token_ids(engine):
    first = run_all(engine, [TARGET], greedy(8))[0]
    stop_at = first.token_ids[3]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_at,))
    got = run_all(engine, [TARGET], params)[0]
    assert got.token_ids == first.token_ids[: first.token_ids.index(stop_at) + 1]
    assert got.finish_reason == "stop"


def test_requests_that_cannot_fit_are_refused_before_queueing(engine):
    async def main(ids, params):
        return await collect(engine, ids, params)

    with pytest.raises(ValueError, match="over the context length"):
        asyncio.run(main([1] * 10, SamplingParams(max_tokens=engine.max_model_len)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        asyncio.run(main([engine.spec.vocab_size], greedy(2)))
    with pytest.raises(ValueError, match="empty"):
        asyncio.run(main([], greedy(2)))
    assert engine.scheduler.num_unfinished == 0


def test_dead_worker_fails_requests_instead_of_hanging(ray_cluster, tiny_llama_dir):
    eng = tiny_engine(tiny_llama_dir, 2, 1)
    try:

        async def main():
            tasks = [asyncio.ensure_future(collect(eng, TARGET, greedy(200))) for _ in range(3)]
            await asyncio.sleep(0.5)
            ray_cluster.kill(eng.gang.workers[1])
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
            return results

        results = asyncio.run(main())
        assert all(isinstance(r, EngineDeadError) for r in results), results
        with pytest.raises(EngineDeadError):
            asyncio.run(eng.check_health())
        with pytest.raises(EngineDeadError):
            run_all(eng, [TARGET], greedy(2))
    finally:
        close(eng)


def test_prompts_are_tokenized_off_the_event_loop(engine, monkeypatch):
    """A long prompt's tokenizing must not stall the loop that streams every other request's tokens."""
    import threading

    threads = []
    encode = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode", lambda *a, **k: threads.append(threading.current_thread()) or encode(*a, **k))

    async def main():
        out = [o async for o in engine.generate(GenerateRequest("some text", greedy(2), raw=True))]
        return out, threading.current_thread()

    out, loop_thread = asyncio.run(main())
    assert out[-1].finished
    assert threads and all(t is not loop_thread for t in threads)


def test_a_stopped_worker_is_detected_within_the_step_bound(ray_cluster, tiny_llama_dir):
    """SIGSTOP one rank of a TP gang mid-generation: the step deadline declares the gang broken, the
    streams fail instead of waiting forever, and the health check fails so the replica is replaced."""
    import os
    import signal
    import time

    eng = tiny_engine(tiny_llama_dir, 2, 1, step_timeout_s=1.0)
    pid = ray_cluster.get(eng.gang.workers[1].__ray_call__.remote(lambda self: os.getpid()))
    try:

        async def main():
            tasks = [asyncio.ensure_future(collect(eng, TARGET, greedy(400))) for _ in range(2)]
            await asyncio.sleep(0.5)
            os.kill(pid, signal.SIGSTOP)
            stopped = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
            return results, time.monotonic() - stopped

        results, detected_after = asyncio.run(main())
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert "no progress" in str(results[0])
        # The bound: max(step_timeout_s, 10x the slowest recent step); tiny steps take milliseconds.
        assert detected_after < eng.step_deadline.timeout(1) + 5
        with pytest.raises(EngineDeadError):
            asyncio.run(eng.check_health())
    finally:
        os.kill(pid, signal.SIGCONT)
        close(eng)
