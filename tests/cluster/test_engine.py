"""Engine behaviour on a real gang: batching invariance, preemption, cancellation, seeds, failures."""

from __future__ import annotations

import asyncio

import pytest

from cluster.engine import EngineDeadError
from cluster.protocol import GenerateRequest, Resume
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


SEEDED = SamplingParams(max_tokens=120, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)


def worker_pid(ray_cluster, worker) -> int:
    import os

    return ray_cluster.get(worker.__ray_call__.remote(lambda self: os.getpid()))


def break_mid_generation(eng, ray_cluster, breaker, params_list) -> tuple[list, float]:
    """Start one request per params; once every one has streamed a token, call `breaker(eng)`.
    Each request's result (or exception), and the seconds from the break to the last result."""
    import time

    async def main():
        started = [asyncio.Event() for _ in params_list]

        async def one(params, flag):
            tokens = []
            async for out in eng.generate(GenerateRequest(TARGET, params)):
                tokens += out.token_ids
                flag.set()
            return tokens

        tasks = [asyncio.ensure_future(one(p, f)) for p, f in zip(params_list, started)]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in started)), 60)
        breaker(eng)
        t0 = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
        return results, time.monotonic() - t0

    return asyncio.run(main())


def undisturbed(ray_cluster, tiny_llama_dir, params_list) -> list[list[int]]:
    eng = tiny_engine(tiny_llama_dir, 1, 1)
    try:
        return [r.token_ids for r in (run_all(eng, [TARGET], p)[0] for p in params_list)]
    finally:
        close(eng)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (1, 1)], ids=["tp2", "pp2", "tp1"])
def test_requests_resume_on_a_new_gang_when_a_worker_dies(ray_cluster, tiny_llama_dir, tp, pp):
    """Kill one rank of a gang mid-generation: a new gang starts in the same bundles, and every
    request goes on from the tokens it already streamed, token for token as if nothing happened:
    greedy, and seeded sampling (drawn per (seed, step))."""
    params = [greedy(120), SEEDED]
    want = undisturbed(ray_cluster, tiny_llama_dir, params)
    eng = tiny_engine(tiny_llama_dir, tp, pp)
    try:
        results, _ = break_mid_generation(eng, ray_cluster, lambda e: ray_cluster.kill(e.gang.workers[-1]), params)
        assert results == want
        assert eng.num_recoveries == 1 and eng.dead is None
        assert eng.allocator.num_free == eng.allocator.num_blocks  # nothing leaked on either gang
        assert run_all(eng, [TARGET], greedy(8))[0].token_ids == want[0][:8]  # and it keeps serving
    finally:
        close(eng)


def test_a_stopped_worker_is_detected_within_the_step_bound_and_its_requests_resume(ray_cluster, tiny_llama_dir):
    """SIGSTOP one rank of a TP gang: the step deadline declares the gang hung, the stopped worker
    is killed with the rest, and the requests finish on a new gang with the undisturbed tokens."""
    import os
    import signal

    want = undisturbed(ray_cluster, tiny_llama_dir, [greedy(120)])
    eng = tiny_engine(tiny_llama_dir, 2, 1, step_timeout_s=1.0)
    pid = worker_pid(ray_cluster, eng.gang.workers[1])
    try:
        results, _ = break_mid_generation(eng, ray_cluster, lambda e: os.kill(pid, signal.SIGSTOP), [greedy(120)])
        assert results == want
        assert eng.num_recoveries == 1
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:  # killed with its gang
            pass
        close(eng)


def test_a_worker_that_dies_between_requests_is_replaced_by_the_health_check(ray_cluster, tiny_llama_dir):
    """No step runs to notice it: the health check's ping does, and the next request is served."""
    want = undisturbed(ray_cluster, tiny_llama_dir, [greedy(16)])
    eng = tiny_engine(tiny_llama_dir, 2, 1)
    try:
        assert run_all(eng, [TARGET], greedy(16))[0].token_ids == want[0]
        ray_cluster.kill(eng.gang.workers[0])

        async def main():
            await eng.check_health()  # finds the dead rank and hands it to the step loop: no raise
            return await collect(eng, TARGET, greedy(16))

        assert asyncio.run(main()).token_ids == want[0]
        assert eng.num_recoveries == 1
    finally:
        close(eng)


def test_past_max_migrations_requests_fail_instead_of_hanging(ray_cluster, tiny_llama_dir):
    """max_migrations=0: a dead worker fails its requests with EngineDeadError (the server turns that
    into an error event), the engine refuses more, and nothing waits forever."""
    eng = tiny_engine(tiny_llama_dir, 2, 1, max_migrations=0)
    try:
        results, _ = break_mid_generation(eng, ray_cluster, lambda e: ray_cluster.kill(e.gang.workers[1]),
                                          [greedy(200)] * 3)  # fmt: skip
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




async def resumed(engine, prompt: list[int], params: SamplingParams, resume: Resume) -> list:
    return [out async for out in engine.generate(GenerateRequest(prompt, params, resume=resume))]


@pytest.mark.parametrize("params", [greedy(24), SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True)],
                         ids=["greedy", "seeded"])  # fmt: skip
def test_a_resumed_request_replays_what_was_delivered_and_goes_on_token_for_token(engine, params):
    """What another replica does with a stream whose replica died: the request with the tokens already
    delivered. Its first delta replays them (their text, as the undisturbed stream had sent it), and
    the rest equals the undisturbed run's; usage counts every token once; no block leaks."""

    async def main():
        whole = [out async for out in engine.generate(GenerateRequest(TARGET, params))]
        outs = await resumed(engine, TARGET, params, Resume(tuple(t for o in whole[:10] for t in o.token_ids)))
        return whole, outs

    whole, outs = asyncio.run(main())
    replay, rest = outs[0], outs[1:]
    assert replay.token_ids == [t for o in whole[:10] for t in o.token_ids] and not replay.finished
    assert replay.text == "".join(o.text for o in whole[:10])
    assert [o.token_ids for o in rest] == [o.token_ids for o in whole[10:]]
    assert "".join(o.text for o in rest) == "".join(o.text for o in whole[10:])
    assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 24
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_a_resumed_request_that_had_ended_is_only_reported(engine):
    """One choice of several had finished on the failed replica: nothing runs for it, one finished delta."""
    outs = asyncio.run(resumed(engine, TARGET, greedy(24), Resume((5, 6, 7), finish_reason="stop")))
    assert len(outs) == 1 and outs[0].finished and outs[0].finish_reason == "stop"
    assert outs[0].completion_tokens == 3 and outs[0].token_ids == [5, 6, 7]
    assert engine.scheduler.num_unfinished == 0 and engine.allocator.num_free == engine.allocator.num_blocks
