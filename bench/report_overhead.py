"""Cost of one progress report: `ProgressReporter.report` vs `tqdm.update`.

Both sides are timed the same way: a tight `for i in range(N)` loop calling a
method pre-bound to a local name (`report(i, N)` / `update(1)`), with the
garbage collector paused during the timed loop (as `timeit` does). Rounds are
interleaved (empty loop, ours, tqdm, ...) and each side's median is taken, so
a noisy neighbour hurts both sides alike.

Usage: python bench/report_overhead.py [--calls 1000000] [--rounds 5]

The last line printed is JSON only:
  {"ours": ns/call, "anchor": ns/call (tqdm), "ratio": ours/anchor, ...}
"ours"/"anchor"/"ratio" are raw per-call times including the loop; the
`*_net` keys subtract the empty-loop baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections.abc import Callable

from tqdm import tqdm

from matrixjobs.progress.reporter import ProgressReporter


def time_empty(n: int) -> float:
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _i in range(n):
            pass
        return time.perf_counter_ns() - start
    finally:
        gc.enable()


def time_ours(n: int) -> float:
    reporter = ProgressReporter()
    report = reporter.report
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for i in range(n):
            report(i, n)
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    assert reporter.state == (n - 1, n, None), reporter.state
    return elapsed


def time_tqdm(n: int) -> float:
    with open(os.devnull, "w") as devnull:
        bar = tqdm(total=n, file=devnull)
        update = bar.update
        gc.disable()
        try:
            start = time.perf_counter_ns()
            for _i in range(n):
                update(1)
            elapsed = time.perf_counter_ns() - start
        finally:
            gc.enable()
        assert bar.n == n, bar.n
        bar.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description="ns per ProgressReporter.report vs tqdm.update")
    parser.add_argument("--calls", type=int, default=1_000_000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per side")
    args = parser.parse_args()
    n: int = args.calls
    if n < 1 or args.rounds < 1:
        parser.error("--calls and --rounds must be positive")

    sides: dict[str, Callable[[int], float]] = {
        "empty loop": time_empty,
        "ProgressReporter.report": time_ours,
        "tqdm.update": time_tqdm,
    }
    # Warm-up: one short run of each (imports, tqdm's monitor thread, caches).
    for fn in sides.values():
        fn(min(n, 10_000))

    samples: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            samples[name].append(fn(n) / n)

    median = {name: statistics.median(values) for name, values in samples.items()}
    empty = median["empty loop"]
    ours = median["ProgressReporter.report"]
    anchor = median["tqdm.update"]

    print(f"{n:,} calls x {args.rounds} interleaved rounds, median ns/call (min..max):")
    for name, values in samples.items():
        net = "" if name == "empty loop" else f"   net of loop {median[name] - empty:7.1f}"
        print(f"  {name:<24} {median[name]:7.1f} ({min(values):.1f}..{max(values):.1f}){net}")
    ratio = ours / anchor
    net_ratio = (ours - empty) / (anchor - empty) if anchor > empty else None
    print(f"  ratio ours/tqdm: {ratio:.3f} raw"
          + (f", {net_ratio:.3f} net of loop" if net_ratio is not None else "")
          + "  (target <= 0.5)")
    print(json.dumps({
        "ours": round(ours, 2),
        "anchor": round(anchor, 2),
        "ratio": round(ratio, 4),
        "empty_loop": round(empty, 2),
        "ours_net": round(ours - empty, 2),
        "anchor_net": round(anchor - empty, 2),
        "ratio_net": None if net_ratio is None else round(net_ratio, 4),
        "calls": n,
        "rounds": args.rounds,
    }))


if __name__ == "__main__":
    main()
