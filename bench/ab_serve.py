"""Did a change cost plain requests anything? `shardserve serve` at an earlier commit and at this tree,
alternately on this machine, the same workload over HTTP (the client of `shardserve bench`).

Each round serves the bundled SmolLM2-135M-Instruct from a git worktree of --before, sweeps it,
stops it, then does the same from this tree: batch-1 decode of long greedy answers (tok/s =
1000 / TPOT) and the chat mix at each --concurrency (output tok/s, TTFT p50). Rounds alternate
the order (before, after, after, before, ...), so that the machine's steady drift over minutes
falls on both sides alike; the table gives each side's median and the ratio after / before.

    .venv/bin/python bench/ab_serve.py --before 8c2a5c8 [--rounds 2] [--concurrency 1,8,32] [--out F]

A setting's cost: the same commit on both sides, the flag on one, e.g.
    .venv/bin/python bench/ab_serve.py --before HEAD --before-flags=--no-replica-failover
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from deployments.bench import peers  # noqa: E402
from model.sources import resolve_model  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402


def measure(root: Path, work: peers.Workload, tokenizer, log: Path, flags: list[str]) -> dict:
    """One sweep of `shardserve serve` (with these extra flags) run from the source tree at root."""
    port = peers.free_port()
    cmd, env = peers.server_command("shardserve", resolve_model(None), "float32", "smollm2", port, Path())
    cmd += flags
    proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, **env, "PYTHONPATH": str(root)},
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        peers.wait_ready(base, proc, log)
        result = peers.sweep_server(base, "smollm2", root.name, tokenizer, work, say=lambda *a: None)
    finally:
        peers.stop(proc)
    runs = {r["load"]["concurrency"]: r for r in result["runs"]}
    out = {"decode tok/s": 1000 / result["decode"]["tpot_ms"]["mean"]}
    for c in work.concurrency:
        out[f"chat x{c} tok/s"] = runs[c]["output_throughput"]
        out[f"chat x{c} TTFT p50 ms"] = runs[c]["ttft_ms"]["p50"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="the commit to compare against")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--before-flags", default="", help="extra `shardserve serve` flags for the before side")
    ap.add_argument("--after-flags", default="", help="extra `shardserve serve` flags for this tree")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--chat-requests", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the measurements here (JSON)")
    args = ap.parse_args()
    work = peers.Workload(chat_requests=args.chat_requests, concurrency=tuple(int(c) for c in args.concurrency.split(",")))
    tokenizer = load_tokenizer(resolve_model(None))
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / f"before-{args.before}"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), args.before],
                       check=True, capture_output=True)  # fmt: skip
        try:
            sides: dict[str, list[dict]] = {"before": [], "after": []}
            for r in range(args.rounds):
                order = (("before", before, args.before_flags.split()), ("after", REPO, args.after_flags.split()))
                for side, root, flags in order if r % 2 == 0 else order[::-1]:  # ABBA: a steady drift cancels
                    sides[side].append(measure(root, work, tokenizer, Path(tmp) / f"{side}-{r}.log", flags))
                    print(f"round {r + 1} {side}: {json.dumps(sides[side][-1])}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=False)
    print(f"\n| {args.rounds} rounds, medians | before ({args.before}) | after | after / before |\n|---|---|---|---|")
    for key in sides["before"][0]:
        b = statistics.median(m[key] for m in sides["before"])
        a = statistics.median(m[key] for m in sides["after"])
        print(f"| {key} | {b:.1f} | {a:.1f} | {a / b:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"before": args.before, **sides}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
