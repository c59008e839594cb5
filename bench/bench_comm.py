"""All-reduce latency: ShmGroup (shared memory) vs GlooGroup (torch.distributed gloo), same host.

Spawns `--world` processes (one torch thread each, as TP workers run on this 2-core machine) and
times `--calls` consecutive float32 all_reduces per size, after a warm-up. Prints mean, median
and 99th percentile per call as seen by rank 0, and how busy the machine's CPUs were (the ranks
spin while they wait, so ~100% is expected; other load shows up as stalls in the mean and p99).

    PYTHONPATH=. .venv/bin/python bench/bench_comm.py [--world 2] [--calls 2000] [--sizes 576 4608 18432] [--pin]
"""

import argparse
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.comm import GlooGroup, ShmGroup

WARMUP_CALLS = 100


def _time_all_reduce(group, numel: int, calls: int) -> list[float]:
    x = torch.randn(numel)
    for _ in range(WARMUP_CALLS):
        group.all_reduce(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        group.all_reduce(x)
        times.append(time.perf_counter() - start)
    return times


def _worker(rank: int, world: int, segment: str, max_elems: int, port: int, sizes, calls: int, pin: bool, results):
    torch.set_num_threads(1)
    if pin:  # one rank per core: otherwise the scheduler may stack both ranks on one core
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    groups = {"shm": ShmGroup(segment, rank, world, max_elems), "gloo": GlooGroup(None, rank, world)}
    try:
        for numel in sizes:
            for kind, group in groups.items():
                times = _time_all_reduce(group, numel, calls)
                if rank == 0:
                    results[(kind, numel)] = times
    finally:
        groups["shm"].close()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:10.1f}"


def _cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat: tells whether others shared the machine."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _cpu_busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    return (after[0] - before[0]) / max(1, after[1] - before[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[576, 4608, 18432])
    parser.add_argument("--pin", action="store_true", help="pin rank r to CPU r (mod CPUs)")
    args = parser.parse_args()

    max_elems = max(args.sizes)
    segment = ShmGroup.create_segment(args.world, max_elems)
    with mp.Manager() as manager:
        results = manager.dict()
        busy_before = _cpu_busy()
        try:
            mp.spawn(
                _worker,
                args=(args.world, segment, max_elems, _free_port(), args.sizes, args.calls, args.pin, results),
                nprocs=args.world,
            )
        finally:
            ShmGroup.unlink_segment(segment)
        results = dict(results)
        busy = _cpu_busy_fraction(busy_before, _cpu_busy())

    print(
        f"all_reduce float32, {args.world} processes{' pinned' if args.pin else ''}, {args.calls} calls each,"
        f" microseconds per call (rank 0); all CPUs {busy:.0%} busy during the run"
    )
    head = f"{'elements':>9} |" + "".join(f" {kind + ' ' + s:>10}" for kind in ("shm", "gloo") for s in ("mean", "p50", "p99"))
    print(head + " | mean ratio")
    for numel in args.sizes:
        row = f"{numel:>9} |"
        for kind in ("shm", "gloo"):
            t = results[(kind, numel)]
            row += f" {_us(statistics.fmean(t))} {_us(statistics.median(t))} {_us(statistics.quantiles(t, n=100)[98])}"
        ratio = statistics.fmean(results[("gloo", numel)]) / statistics.fmean(results[("shm", numel)])
        print(f"{row} | {ratio:9.1f}x")


if __name__ == "__main__":
    main()
