"""Kill and hang drills on `shardserve serve` with its defaults (the bundled SmolLM2, one replica).

Each drill starts the server, sends `--streams` greedy streaming chats at once, and, once every
stream has its first tokens, breaks the replica's worker: SIGKILL (it dies) or SIGSTOP (it hangs;
SIGCONT once the drill is over); the third drill SIGKILLs the replica's own process (the streams
wait for the replacement Serve starts). It reports, per drill: the longest gap between two tokens
of a stream around the break (what a client notices), how long after the signal the last stream
ended, how many streams completed with text equal to an undisturbed run of the same requests
(sent first, on the same server), and whether any stream ended in an error event.

    .venv/bin/python bench/fault_drill.py [--streams 4] [--max-tokens 256] [--out-json drill.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from deployments.bench import peers  # noqa: E402
from model.sources import DEFAULT_MODEL, resolve_model  # noqa: E402

QUESTIONS = ["Explain how a bicycle stays upright.", "Write a short story about a lighthouse keeper.",
             "What makes bread rise?", "Describe the water cycle for a child.", "How do vaccines work?",
             "Why is the sky blue?", "Give advice for a first marathon.", "What is a black hole?"]  # fmt: skip


DRILLS = (("worker", signal.SIGKILL), ("worker", signal.SIGSTOP), ("replica", signal.SIGKILL))
PROCESS_NAMES = {"worker": "ray::Worker", "replica": "ray::ServeReplica:shardserve:LLMServer"}


def target_pids(server_pid: int, target: str) -> list[int]:
    """The gang's Worker actors, or the LLMServer replica, among the server's process tree."""
    tree = psutil.Process(server_pid).children(recursive=True)
    return [p.pid for p in tree if (p.cmdline() or [""])[0].startswith(PROCESS_NAMES[target])]


async def one_stream(client: httpx.AsyncClient, url: str, body: dict, first: asyncio.Event) -> dict:
    text, times, error = "", [], None
    async with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
                continue
            times.append(time.monotonic())
            text += event["choices"][0]["delta"].get("content") or ""
            first.set()
    return {"text": text, "times": times, "error": error}


async def run_streams(url: str, bodies: list[dict], server_pid: int | None = None, sig: int | None = None,
                      target: str = "worker") -> tuple[list[dict], float | None, int | None]:  # fmt: skip
    async with httpx.AsyncClient(timeout=600) as client:
        firsts = [asyncio.Event() for _ in bodies]
        tasks = [asyncio.ensure_future(one_stream(client, url, b, f)) for b, f in zip(bodies, firsts)]
        broken_at, pid = None, None
        if sig is not None:
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 300)
            pid = target_pids(server_pid, target)[0]
            os.kill(pid, sig)
            broken_at = time.monotonic()
        return await asyncio.gather(*tasks), broken_at, pid


def drill(target: str, sig: int, streams: int, max_tokens: int, workdir: Path) -> dict:
    port = peers.free_port()
    cmd, env = peers.server_command("shardserve", resolve_model(None), "float32", DEFAULT_MODEL, port, workdir)
    log = workdir / f"serve-{target}-{signal.Signals(sig).name}.log"
    proc = peers.start(cmd, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        peers.wait_ready(url, proc, log)
        bodies = [{"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
                   "temperature": 0, "ignore_eos": True} for q in QUESTIONS[:streams]]  # fmt: skip
        undisturbed, _, _ = asyncio.run(run_streams(url, bodies))
        results, broken_at, pid = asyncio.run(run_streams(url, bodies, proc.pid, sig, target))
        if sig == signal.SIGSTOP:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:  # killed with its gang, as it should be
                pass
        gaps = [max(b - a for a, b in zip(r["times"], r["times"][1:])) for r in results if len(r["times"]) > 1]
        return {
            "signal": signal.Signals(sig).name,
            "target": target,
            "streams": streams,
            "completed_equal_to_undisturbed": sum(r["text"] == u["text"] and not r["error"]
                                                  for r, u in zip(results, undisturbed)),  # fmt: skip
            "error_events": sum(bool(r["error"]) for r in results),
            "longest_token_gap_s": max(gaps),
            "last_stream_ended_after_s": max(r["times"][-1] for r in results) - broken_at,
        }
    finally:
        peers.stop(proc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out-json", default=None)
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="shardserve-drill-"))
    results = [drill(target, sig, args.streams, args.max_tokens, workdir) for target, sig in DRILLS]
    print("\n| drill | streams completed, equal to undisturbed | error events | longest gap between tokens s "
          "| last stream ended after the signal s |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['signal']} the {r['target']} | {r['completed_equal_to_undisturbed']} / {r['streams']} | "
              f"{r['error_events']} | {r['longest_token_gap_s']:.1f} | {r['last_stream_ended_after_s']:.1f} |")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
