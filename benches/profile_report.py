#!/usr/bin/env python3
"""Where the worker's CPU went, by component, from a `perf record` of its drain.

    BENCH_PERF_DATA=/tmp/worker.perf cargo bench --bench end_to_end -- 12000 1 2
    python3 benches/profile_report.py /tmp/worker.perf

Each sample is charged to the first component whose frames appear on its call stack, checked in
the order below (signing before HTTP, since the request is signed inside the HTTP call), kernel
time included: a `send` under lapin is AMQP. Samples with none of them are the runtime: tokio's
scheduler, thread wake-ups and the rest. Needs `perf` (Debian: linux-perf).
"""

import collections
import subprocess
import sys

# (component, substrings of a frame that mark it), checked in this order.
COMPONENTS = [
    ("RSA signing (the floor)", ["signing::sign"]),
    ("RSA verifying bunq's answers", ["signing::verify"]),
    ("logging (tracing)", ["tracing_subscriber", "tracing_core", "tracing::span"]),
    ("metrics", ["metrics_exporter", "metrics::"]),
    ("JSON", ["serde_json"]),
    ("AMQP (lapin)", ["lapin::", "flume::", "amq_protocol"]),
    ("HTTP (reqwest, hyper)", ["reqwest::", "hyper", "http::", "url::", "tower"]),
    ("ledger, envelope, events", ["ledger::", "identity::", "envelope::", "events::"]),
]
RUNTIME = "runtime and the rest (tokio scheduling, wake-ups, allocation)"


def samples(perf_data):
    """Yields each sample's call stack, a list of frame names, innermost first."""
    script = subprocess.run(
        ["perf", "script", "-i", perf_data, "-F", "ip,sym"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    stack = []
    for line in script.splitlines():
        line = line.strip()
        if not line:
            if stack:
                yield stack
            stack = []
            continue
        parts = line.split(None, 1)
        stack.append(parts[1] if len(parts) > 1 else parts[0])
    if stack:
        yield stack


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    counts = collections.Counter()
    total = 0
    for stack in samples(sys.argv[1]):
        total += 1
        text = "\n".join(stack)
        for name, marks in COMPONENTS:
            if any(m in text for m in marks):
                counts[name] += 1
                break
        else:
            counts[RUNTIME] += 1
    if not total:
        sys.exit("no samples")
    signing = counts[COMPONENTS[0][0]]
    print(f"{total} samples\n")
    print("| component | share of the worker's CPU | × signing |")
    print("|---|---|---|")
    for name in [c for c, _ in COMPONENTS] + [RUNTIME]:
        share = counts[name] / total
        ratio = counts[name] / signing if signing else float("nan")
        print(f"| {name} | {100 * share:.1f} % | {ratio:.2f} |")
    if signing:
        print(f"\nall CPU ÷ signing: {total / signing:.2f} ×")


if __name__ == "__main__":
    main()
