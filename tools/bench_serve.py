"""The resident server under load, measured side by side in one run: requests/s and p50/p99 latency at
1, 8 and 32 concurrent clients (one query per request) with micro-batching, and at 32 clients without it
(`--batch-window-ms 0 --max-batch 1`), on the demo index (SmolLM2-135M, 1,200 Shakespeare speeches).

    python tools/bench_serve.py                      # builds the demo index once if --index is missing
    python tools/bench_serve.py --index demo-index --seconds 10
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from attribindex import Client
from attribindex.testing import start_server

QUERIES = [
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "Double, double toil and trouble; fire burn, and cauldron bubble.",
    "If music be the food of love, play on; give me excess of it.",
    "All the world's a stage, and all the men and women merely players.",
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven.",
    "Out, damned spot! out, I say!",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
]


def load(url: str, clients: int, seconds: float) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, requests) with `clients` threads each sending one-query requests back to back."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(offset: int) -> None:
        with Client(url) as client:
            i = offset
            while time.monotonic() < stop:
                started = time.perf_counter()
                client.attribute(QUERIES[i % len(QUERIES)], k=10)
                with lock:
                    latencies.append(time.perf_counter() - started)
                i += 1

    with Client(url) as client:
        client.attribute(QUERIES[0], k=10)  # warm-up
    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return len(latencies) / elapsed, cuts[49] * 1000, cuts[98] * 1000, len(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, default=Path.home() / ".cache" / "attribindex" / "bench-demo-index")
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    if not (args.index / "manifest.json").exists():
        print(f"building the demo index in {args.index} (about 2 minutes) ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "attribindex", "demo", "--out", str(args.index)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    runs = [("micro-batching", (), clients) for clients in (1, 8, 32)]
    runs.append(("one at a time", ("--batch-window-ms", "0", "--max-batch", "1"), 32))
    print(f"\n== attribindex serve {args.index}: one query per request, k=10, {args.seconds:.0f} s per row ==")
    print(f"{'server':<16}{'clients':>8}{'requests':>10}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
    rates = {}
    for name, flags, clients in runs:
        process, url = start_server(args.index, *flags)
        try:
            rate, p50, p99, count = load(url, clients, args.seconds)
        finally:
            process.terminate()
            process.wait()
        rates[(name, clients)] = rate
        print(f"{name:<16}{clients:>8}{count:>10}{rate:>8.1f}{p50:>9.0f}{p99:>9.0f}")
    speedup = rates[("micro-batching", 32)] / rates[("one at a time", 32)]
    print(f"micro-batching speed-up at 32 clients: {speedup:.2f}×")


if __name__ == "__main__":
    main()
