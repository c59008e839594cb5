"""Prefix caching and time to first token (TTFT), side by side in one run (SmolLM2-135M-Instruct).

Workload: one long shared system prompt (an operations handbook, ~1000 tokens, generated
deterministically here) followed by N short, different user questions, each encoded as a chat
turn with the tokenizer's chat template (model.tokenizer.encode_prompt). The requests are sent one
at a time; TTFT = time from starting engine.generate() to its first yielded output. Greedy,
max_tokens 8, ignore_eos (every request yields exactly 8 tokens).

Two engines in the same run, prefix caching OFF and ON, both alive at once (one worker each; only
one computes at any moment): question i is sent to one engine and then to the other, the order
flipping every question (OFF,ON / ON,OFF / ...), so that load from other work on a shared machine
falls on both modes alike. Both get the same warm-up first: one request with a *different* system
prompt (so the warm-up leaves nothing the measured prompts can reuse). Per mode the script
reports median / p90 TTFT, prefill tokens computed and prefix-cache hit tokens (engine.stats(),
counted over the measured requests only), and the OFF/ON ratio of median TTFT; it also checks
that the greedy outputs of the two modes are identical and prints a WARNING line if not.

SmolLM2 fp32 on CPU, tp=1 pp=1, the engine's default scheduling limits (512 tokens per step, so a
~1000-token prompt is prefilled in two steps when nothing is cached).

    PYTHONPATH=. .venv/bin/python bench/bench_prefix.py [--quick] [--out-json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

CORES = os.cpu_count() or 1
MAX_TOKENS = 8


@dataclass(frozen=True)
class Settings:
    num_questions: int  # measured requests, one at a time
    prefix_tokens: int  # target length of the shared system prompt (tokens, before the chat template)


FULL = Settings(16, 1000)
QUICK = Settings(6, 500)

# -- the workload ----------------------------------------------------------------------------------
SERVICES = [
    "checkout-api", "payments-gateway", "inventory-sync", "search-indexer", "auth-service",
    "notification-worker", "billing-batch", "catalog-api", "order-router", "media-transcoder",
    "session-store", "ledger-writer",
]  # fmt: skip
REGIONS = ["eu-west-1", "us-east-2", "ap-southeast-1", "eu-central-1"]
TEAMS = ["Platform", "Payments", "Storefront", "Data", "Identity", "Fulfilment"]
SECTIONS = [
    ("Severity levels", [
        "A SEV1 is declared when {svc} in {region} returns errors for more than {pct}% of requests for {mins} minutes.",
        "A SEV2 covers a degraded {svc} where latency at the 99th percentile exceeds {ms} ms but requests still succeed.",
        "A SEV3 is any issue that affects internal tooling only; it is handled during business hours by the {team} team.",
        "Severity can be raised at any time by the incident commander, but it is only lowered after {mins} minutes of stable metrics.",
    ]),
    ("Paging and escalation", [
        "The primary on-call engineer must acknowledge a page within {ack} minutes; otherwise the secondary is paged automatically.",
        "If neither responds within {mins} minutes, the page escalates to the {team} engineering manager.",
        "For any SEV1 affecting {svc}, page the {team} team lead and open a bridge call immediately.",
        "Never silence an alert for {svc} without writing the reason and an expiry time in the alert annotation.",
    ]),
    ("Incident command", [
        "The first responder is the incident commander until they hand the role over explicitly on the bridge.",
        "The incident commander does not debug; they coordinate, assign owners and keep the timeline.",
        "Status updates go to the #incidents channel every {upd} minutes during a SEV1 and every {upd2} minutes during a SEV2.",
        "Customer-facing status page updates are drafted by the communications lead and approved by the incident commander.",
    ]),
    ("Deployments and change freeze", [
        "Deployments to {svc} happen through the release pipeline only; manual changes in {region} are forbidden.",
        "Every deployment is rolled out to one canary host first and observed for {mins} minutes before the full rollout.",
        "A change freeze starts at {hour}:00 UTC on Fridays and during declared peak events; exceptions need two approvals from the {team} team.",
        "Rollback is always the first remedy for an incident that began within {mins} minutes of a deployment.",
    ]),
    ("Databases", [
        "The primary database for {svc} lives in {region}; its replica lag alert fires above {lag} seconds.",
        "Failover to the replica is manual and must be approved by the incident commander and a member of the {team} team.",
        "Never run schema migrations during an open incident, even if the migration is believed to fix it.",
        "Long-running queries over {secs} seconds on the primary may be killed by the on-call engineer without further approval.",
    ]),
    ("Capacity and autoscaling", [
        "The {svc} fleet scales out when average CPU exceeds {pct2}% for {mins} minutes and scales in below {pct3}%.",
        "If autoscaling is stuck, the on-call engineer may raise the minimum instance count of {svc} by at most {n} instances.",
        "Capacity reviews for {svc} happen monthly with the {team} team, using the previous {days} days of traffic.",
        "A queue backlog above {backlog} messages for {svc} is a SEV2 even if no customer has noticed yet.",
    ]),
    ("Access and secrets", [
        "Production access is granted for {hrs} hours at a time through the access broker and is logged.",
        "Secrets are rotated every {days} days; a leaked credential for {svc} is always treated as a SEV1.",
        "Break-glass accounts may only be used when the access broker itself is down, and their use is reviewed the next day.",
        "Never paste customer data or credentials into chat channels, tickets or incident documents.",
    ]),
    ("Backups and restores", [
        "Backups of {svc} data are taken every {hrs} hours and kept for {days} days in a second region.",
        "A restore test is run every quarter by the {team} team; its duration is recorded in the runbook.",
        "Point-in-time recovery is available for the last {days2} days; older restores use the nightly snapshot.",
    ]),
    ("Postmortems", [
        "Every SEV1 and SEV2 gets a written postmortem within {days3} business days, owned by the incident commander.",
        "Postmortems are blameless: they describe what the system allowed to happen, not who made a mistake.",
        "Each action item has one owner and a due date, and is tracked in the {team} team's backlog until done.",
    ]),
    ("Monitoring and dashboards", [
        "The main dashboard for {svc} shows request rate, error rate, latency percentiles and saturation for each region.",
        "Synthetic checks probe {svc} from three regions every {secs2} seconds; two failing regions page the on-call.",
        "Log retention is {days} days for application logs and one year for audit logs.",
    ]),
]  # fmt: skip

QUESTIONS = [
    "When is an outage of the checkout API a SEV1?",
    "How long do I have to acknowledge a page?",
    "Who should I page for a SEV1 on the payments gateway?",
    "Can the incident commander also debug the problem?",
    "How often do we post status updates during a SEV2?",
    "Can I deploy a hotfix on Friday evening?",
    "What is the first thing to try if an incident started right after a deploy?",
    "Who approves a database failover?",
    "May I kill a slow query on the primary database?",
    "The order router queue is backing up. What severity is that?",
    "How long does production access last?",
    "What happens if a credential leaks?",
    "How far back can we restore with point-in-time recovery?",
    "When is the postmortem due after a SEV1?",
    "How often do synthetic checks run?",
    "Can I silence a noisy alert for the search indexer?",
]


def handbook(tokenizer, target_tokens: int, seed: int, company: str) -> str:
    """A deterministic operations handbook of at least target_tokens tokens (bounded: 400 paragraphs at most)."""
    rng = random.Random(seed)

    def fill(template: str) -> str:
        return template.format(
            svc=rng.choice(SERVICES), region=rng.choice(REGIONS), team=rng.choice(TEAMS),
            pct=rng.choice([1, 2, 5, 10]), mins=rng.choice([5, 10, 15, 30]), ms=rng.choice([300, 500, 800, 1200]),
            ack=rng.choice([5, 10]), upd=rng.choice([15, 20, 30]), upd2=rng.choice([45, 60]),
            hour=rng.choice([14, 15, 16]), lag=rng.choice([10, 30, 60]), secs=rng.choice([30, 60, 120]),
            pct2=rng.choice([60, 70, 75]), pct3=rng.choice([20, 30]), n=rng.choice([5, 10, 20]),
            days=rng.choice([30, 60, 90]), backlog=rng.choice([10000, 50000, 100000]), hrs=rng.choice([4, 8, 12]),
            days2=rng.choice([7, 14, 35]), days3=rng.choice([3, 5]), secs2=rng.choice([30, 60]),
        )  # fmt: skip

    parts = [
        f"You are the operations assistant of {company}. Answer questions from on-call engineers using "
        f"only the {company} Operations Handbook below. Quote the rule you rely on, be brief, and say so "
        "when the handbook does not cover a question.\n\n"
        f"# {company} Operations Handbook (revision {rng.randint(10, 99)})\n"
    ]
    for i in range(400):  # bounded; stops as soon as the target length is reached
        title, templates = SECTIONS[i % len(SECTIONS)]
        round_ = i // len(SECTIONS)
        header = f"\n## {i + 1}. {title}" + (f" ({SERVICES[(i * 5) % len(SERVICES)]})" if round_ else "") + "\n"
        rules = rng.sample(templates, k=min(3, len(templates)))
        parts.append(header + "\n".join(f"{i + 1}.{j + 1} {fill(t)}" for j, t in enumerate(rules)) + "\n")
        if len(tokenizer.encode("".join(parts), add_special_tokens=False)) >= target_tokens:
            break
    return "".join(parts)


def build_prompts(tokenizer, settings: Settings):
    from model.tokenizer import encode_prompt

    system = handbook(tokenizer, settings.prefix_tokens, seed=1, company="Northwind Commerce")
    prompts = [
        encode_prompt(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": q}])
        for q in QUESTIONS[: settings.num_questions]
    ]
    # Warm-up: another company's handbook of the same size, so its blocks match none of the measured prompts.
    other = handbook(tokenizer, settings.prefix_tokens, seed=2, company="Contoso Logistics")
    warmup = encode_prompt(
        tokenizer, [{"role": "system", "content": other}, {"role": "user", "content": "What is a SEV3?"}]
    )
    system_tokens = len(tokenizer.encode(system, add_special_tokens=False))
    return system_tokens, prompts, warmup


def common_prefix_len(prompts: list[list[int]]) -> int:
    n = min(len(p) for p in prompts)
    for i in range(n):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return n


# -- measurement -----------------------------------------------------------------------------------
async def timed_request(engine, prompt: list[int]) -> tuple[float, float, list[int]]:
    """(TTFT s, end-to-end latency s, generated token ids) of one greedy request."""
    from cluster.protocol import GenerateRequest
    from model.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    tokens: list[int] = []
    ttft = None
    t0 = time.perf_counter()
    async for out in engine.generate(GenerateRequest(prompt, params)):
        if ttft is None:
            ttft = time.perf_counter() - t0
        tokens += out.token_ids
    return ttft, time.perf_counter() - t0, tokens


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


STAT_KEYS = ("prefill_tokens_computed", "prefix_cache_query_tokens", "prefix_cache_hit_tokens")


def build_engine(model_dir, prefix_caching: bool):
    from cluster.config import EngineConfig
    from cluster.engine import LLMEngine

    t0 = time.perf_counter()
    engine = LLMEngine(
        EngineConfig(model=str(model_dir), dtype="float32", device="cpu", enable_prefix_caching=prefix_caching)
    )
    return engine, time.perf_counter() - t0


async def bench_pair(model_dir, prompts, warmup) -> dict:
    """Both engines live at once; question i goes to one then the other, the order flipping every
    question (OFF,ON / ON,OFF / ...), so that load from other work on the machine hits both alike."""
    modes = {"off": False, "on": True}
    engines, r = {}, {}
    try:
        for name, enabled in modes.items():
            engines[name], startup = build_engine(model_dir, enabled)
            r[name] = {"prefix_caching": enabled, "startup_s": startup, "ttft_s": [], "latency_s": [], "outputs": []}
        for name, engine in engines.items():  # the same warm-up on each
            r[name]["warmup_ttft_s"], _, _ = await timed_request(engine, warmup)
        before = {name: engine.stats() for name, engine in engines.items()}
        for i, p in enumerate(prompts):  # one request at a time
            for name in ("off", "on") if i % 2 == 0 else ("on", "off"):
                ttft, latency, tokens = await timed_request(engines[name], p)
                r[name]["ttft_s"].append(ttft)
                r[name]["latency_s"].append(latency)
                r[name]["outputs"].append(tokens)
        after = {name: engine.stats() for name, engine in engines.items()}
    finally:
        for engine in engines.values():
            await engine.shutdown()
    for name, m in r.items():
        ttfts = m["ttft_s"]
        m.update(
            ttft_median_s=statistics.median(ttfts),
            ttft_p90_s=percentile(ttfts, 90),
            ttft_first_s=ttfts[0],
            ttft_median_rest_s=statistics.median(ttfts[1:]) if len(ttfts) > 1 else None,
            latency_median_s=statistics.median(m["latency_s"]),
            **{k: getattr(after[name], k) - getattr(before[name], k) for k in STAT_KEYS},
        )
    return r


def render(results: dict) -> str:
    off, on = results["modes"]["off"], results["modes"]["on"]
    w = results["workload"]
    lines = [
        f"Workload: shared system prompt {w['system_tokens']} tokens; {w['num_questions']} questions; "
        f"prompts {w['prompt_tokens_min']}..{w['prompt_tokens_max']} tokens with the chat template, "
        f"{w['common_prefix_tokens']} of them shared by all; {MAX_TOKENS} new tokens each, greedy, one at a time.",
        f"Machine: {results['machine']['cores']} cores, CPU; 1-min load average {results['loadavg_1m_at_start']:.1f} "
        f"at start, {results['loadavg_1m_at_end']:.1f} at the end (other work on the machine inflates absolute times).",
        "",
        "| prefix caching | TTFT median | TTFT p90 | TTFT 1st request | TTFT median of 2nd..last | "
        "latency median (8 tokens) | prefill tokens computed | prefix hit tokens / looked up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("OFF", off), ("ON", on)):
        rest = f"{1000 * r['ttft_median_rest_s']:.0f} ms" if r["ttft_median_rest_s"] is not None else "-"
        hits = (
            f"{r['prefix_cache_hit_tokens']} / {r['prefix_cache_query_tokens']}" if r["prefix_caching"] else "- (off)"
        )
        lines.append(
            f"| {name} | {1000 * r['ttft_median_s']:.0f} ms | {1000 * r['ttft_p90_s']:.0f} ms | "
            f"{1000 * r['ttft_first_s']:.0f} ms | {rest} | {1000 * r['latency_median_s']:.0f} ms | "
            f"{r['prefill_tokens_computed']} | {hits} |"
        )
    lines += [
        "",
        f"Median TTFT ratio OFF/ON: {results['ttft_median_ratio_off_on']:.2f}x "
        f"(p90 {results['ttft_p90_ratio_off_on']:.2f}x); prefill tokens computed OFF/ON: "
        f"{off['prefill_tokens_computed']}/{on['prefill_tokens_computed']}.",
        "Per-question OFF/ON TTFT ratio (back-to-back pairs, 2nd..last question), median: "
        + (f"{results['ttft_paired_ratio_median']:.2f}x." if results["ttft_paired_ratio_median"] else "-"),
        f"Greedy outputs identical between modes: {results['outputs_identical']}"
        + ("" if results["outputs_identical"] else f" (differ for questions {results['outputs_differ']})"),
        f"Engine startup: OFF {off['startup_s']:.1f} s, ON {on['startup_s']:.1f} s; warm-up TTFT "
        f"OFF {1000 * off['warmup_ttft_s']:.0f} ms, ON {1000 * on['warmup_ttft_s']:.0f} ms; "
        f"benchmark wall {results['bench_wall_s']:.0f} s.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help=f"{QUICK.num_questions} questions, ~{QUICK.prefix_tokens}-token prefix"
    )
    ap.add_argument("--out-json", help="write all results here")
    args = ap.parse_args(argv)
    settings = QUICK if args.quick else FULL

    import logging

    import ray
    import torch

    from model.sources import resolve_model
    from model.tokenizer import load_tokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    started = time.perf_counter()
    model_dir = resolve_model(None)
    tokenizer = load_tokenizer(model_dir)
    system_tokens, prompts, warmup = build_prompts(tokenizer, settings)
    shared = common_prefix_len(prompts)
    assert common_prefix_len([warmup, prompts[0]]) < 16, "the warm-up must not share a KV block with the workload"
    workload = {
        "system_tokens": system_tokens,
        "num_questions": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "prompt_tokens_min": min(len(p) for p in prompts),
        "prompt_tokens_max": max(len(p) for p in prompts),
        "common_prefix_tokens": shared,
        "warmup_prompt_tokens": len(warmup),
        "max_tokens": MAX_TOKENS,
    }
    print(
        f"system prompt {system_tokens} tokens; {len(prompts)} prompts of {workload['prompt_tokens_min']}.."
        f"{workload['prompt_tokens_max']} tokens, {shared} shared; warm-up prompt {len(warmup)} tokens",
        flush=True,
    )

    results: dict = {
        "machine": {"cores": CORES, "platform": platform.platform(), "torch": torch.__version__},
        "settings": settings.__dict__,
        "workload": workload,
        "loadavg_1m_at_start": os.getloadavg()[0],
        "modes": {},
    }
    # Two engines live at once, each with one worker asking for all cores (2 torch threads on 2 cores):
    # Ray gets 2x the cores as logical CPUs so both fit. Only one of them computes at any moment.
    ray.init(num_cpus=2 * CORES, include_dashboard=False, log_to_driver=False)
    try:
        print("prefix caching OFF and ON, alternating ...", flush=True)
        results["modes"] = asyncio.run(bench_pair(model_dir, prompts, warmup))
    finally:
        ray.shutdown()
    results["loadavg_1m_at_end"] = os.getloadavg()[0]
    results["bench_wall_s"] = time.perf_counter() - started

    off, on = results["modes"]["off"], results["modes"]["on"]
    results["ttft_median_ratio_off_on"] = off["ttft_median_s"] / on["ttft_median_s"]
    results["ttft_p90_ratio_off_on"] = off["ttft_p90_s"] / on["ttft_p90_s"]
    # Per question (each pair measured back to back), from the 2nd on: the 1st fills ON's cache.
    pairs = [a / b for a, b in zip(off["ttft_s"][1:], on["ttft_s"][1:])]
    results["ttft_paired_ratio_median"] = statistics.median(pairs) if pairs else None
    differ = [i for i, (a, b) in enumerate(zip(off["outputs"], on["outputs"])) if a != b]
    results["outputs_identical"] = not differ
    results["outputs_differ"] = differ
    results["sample_output"] = tokenizer.decode(on["outputs"][0])

    print()
    print(render(results))
    if differ:
        print(f"WARNING: greedy outputs differ between prefix caching OFF and ON for questions {differ}")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
