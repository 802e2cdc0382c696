"""Labeling-app load benchmark: N simulated labelers submit M labels each over HTTP to a local uvicorn server.

    .venv/bin/python benchmarks/label_load.py [--labelers 20] [--labels 100] [--db URL]

Prints the request latency percentiles (task page fetch and label submission separately) and throughput.
Without --db it uses a fresh SQLite file in a temp dir.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("FROMFEEDBACK_ARGON2_PROFILE", "CHEAPEST")  # logins are not what is measured here

from fromfeedback.label.simulate import LocalServer, length_judge, percentile, prepare_load_project, start_simulation  # noqa: E402


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), to separate the server's cost from the clients'."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelers", type=int, default=20)
    parser.add_argument("--labels", type=int, default=100, help="labels per labeler")
    parser.add_argument("--overlap", type=int, default=2)
    parser.add_argument("--db", default="", help="database URL (default: a new SQLite file)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        db_url = args.db or f"sqlite:///{folder}/bench.db"
        names = [f"bench-{i}" for i in range(args.labelers)]
        prepare_load_project(db_url, "bench", names, "benchmark-password", args.labelers * args.labels // args.overlap + 50, args.overlap)
        server = LocalServer(db_url, folder)
        server.start()
        try:
            started = time.perf_counter()
            labelers, threads = start_simulation(server.url, "bench", names, "benchmark-password", args.labels, length_judge)
            for thread in threads:
                thread.join()
            seconds = time.perf_counter() - started
            server_cpu = process_cpu_seconds(server.process.pid)
        finally:
            server.stop()

    errors = [l.result.error for l in labelers if l.result.error]
    labels = sum(len(l.result.acknowledged) for l in labelers)
    latencies = [x for l in labelers for x in l.result.latencies]
    print(f"database: {db_url.split(':', 1)[0]}, {args.labelers} labelers x {args.labels} labels, {os.cpu_count()} CPUs")
    print(f"labels stored: {labels} in {seconds:.1f} s ({labels / seconds:.1f} labels/s, {len(latencies) / seconds:.1f} requests/s)")
    print(f"request latency: p50 {percentile(latencies, 50) * 1000:.1f} ms, p95 {percentile(latencies, 95) * 1000:.1f} ms, "
          f"p99 {percentile(latencies, 99) * 1000:.1f} ms, mean {statistics.mean(latencies) * 1000:.1f} ms over {len(latencies)} requests")
    print(f"server CPU: {server_cpu:.1f} s ({server_cpu / max(labels, 1) * 1000:.1f} ms per label, startup included)")
    submits = [x for l in labelers for x in l.result.submit_latencies]
    print(f"label submission alone: p50 {percentile(submits, 50) * 1000:.1f} ms, p95 {percentile(submits, 95) * 1000:.1f} ms")
    if errors:
        print("errors:", *errors, sep="\n  ")


if __name__ == "__main__":
    main()
