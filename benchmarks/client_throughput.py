"""How close the client gets to a provider's rate limit, and what it loses on the way.

Starts the test server in its own process (so that its CPU is not counted as the client's) with a
requests-per-minute limit enforced over one-second windows, ~200 ms lognormal latency and injected
faults of every kind, then sends N distinct chat requests through one Client with a durable store,
and reports:

- utilisation: requests the server admitted per minute while the client had requests waiting (from
  its first attempt to the first attempt of its last request), over the limit. Admitted attempts
  include those that then failed by injected fault: the provider charges them against the limit too.
- goodput: completed requests per minute over the whole run (tail of retries included), over the limit;
  with faults charged, it cannot exceed 1 - fault rate.
- lost (requests without a stored reply), completed twice (server delivered a reply for the same key
  more than once), 429s, retries, wall time, and client CPU seconds per 1,000 requests
  (time.process_time of this process: the event loop and the store's writer thread).

    python benchmarks/client_throughput.py                 # the issue's setting: 10,000 requests
    python benchmarks/client_throughput.py --n 1000        # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import aiohttp  # noqa: E402

from client.config import ClientConfig  # noqa: E402
from client.request import Request  # noqa: E402
from client.runner import Client  # noqa: E402
from client.store import RequestStore  # noqa: E402
from client.testserver import spawn  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


async def run_client(config: ClientConfig, requests: list[Request]) -> tuple[Client, list, float, float]:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    async with Client(config) as client:
        results = await client.run_many(requests)
    return client, results, time.perf_counter() - wall0, time.process_time() - cpu0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="requests (default 10,000)")
    p.add_argument("--rpm", type=float, default=30_000, help="the server's limit (default 30,000)")
    p.add_argument("--window-s", type=float, default=1.0, help="the server enforces the limit over windows this long")
    p.add_argument("--latency-ms", type=float, default=200.0, help="median latency (default 200)")
    p.add_argument("--latency-sigma", type=float, default=0.3, help="lognormal spread (default 0.3)")
    p.add_argument("--fault-rate", type=float, default=0.10, help="injected faults, all kinds equally (default 0.10)")
    p.add_argument("--client-rpm", type=float, default=None,
                   help="give the client the limit (default: it learns it from x-ratelimit-* headers)")
    p.add_argument("--max-in-flight", type=int, default=512)
    p.add_argument("--timeout", type=float, default=2.0,
                   help="per attempt; hangs are detected by it (default 2 s, 10x the median latency)")
    p.add_argument("--out", default="benchmarks/out/client_throughput.json")
    args = p.parse_args()

    load_before = [round(x, 2) for x in os.getloadavg()]  # other work on the machine skews everything
    server_args = ["--rpm", str(args.rpm), "--window-s", str(args.window_s), "--latency-ms", str(args.latency_ms),
                   "--latency-sigma", str(args.latency_sigma), "--fault-rate", str(args.fault_rate), "--faults", "all",
                   "--hang-s", "60", "--seed", "1"]
    requests = [Request({"model": "gpt-4o-mini", "max_tokens": 16, "messages": [
        {"role": "system", "content": "You explain neurons."},
        {"role": "user", "content": f"Explain neuron {i}: the activations peak on tokens about topic {i % 97}."}]})
        for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp, spawn(server_args) as server:
        config = ClientConfig(base_url=server.base_url, api_key="bench", rpm=args.client_rpm,
                              max_in_flight=args.max_in_flight, timeout_s=args.timeout,
                              store_path=os.path.join(tmp, "requests.sqlite"), seed=0)
        client, results, wall, cpu = asyncio.run(run_client(config, requests))
        stats = server.stats()
        store = RequestStore(config.store_path)
        stored = store.responses(r.key for r in requests)
        store.close()

    served = stats["served"]
    keys = [r.key for r in requests]
    lost = sum(1 for k in keys if k not in stored)
    twice = sum(1 for k in keys if served.get(k, 0) > 1)
    never_served = sum(1 for k in keys if served.get(k, 0) == 0)
    s = client.stats
    t0, t1 = s.first_sent_wall, s.last_first_attempt_wall
    ticks = {int(k): v for k, v in stats["admitted_per_100ms"].items()}
    # Whole 100 ms ticks inside the busy window.
    lo, hi = int(t0 * 10) + 1, int(t1 * 10)
    admitted_busy = sum(v for k, v in ticks.items() if lo <= k < hi)
    busy_s = (hi - lo) / 10
    utilisation = admitted_busy / busy_s * 60 / args.rpm if busy_s > 0 else float("nan")
    goodput = sum(r.ok for r in results) / wall * 60 / args.rpm
    row = {
        "n": args.n, "limit_rpm": args.rpm, "utilisation": round(utilisation, 4), "goodput": round(goodput, 4),
        "lost": lost, "completed_twice": twice, "never_served": never_served,
        "server_admitted": stats["admitted"], "server_429": stats["refused"],
        "faults_injected": sum(stats["faults"].values()), "retries": sum(s.retries.values()),
        "retries_by_cause": dict(s.retries), "wall_s": round(wall, 2), "busy_s": round(busy_s, 1),
        "client_cpu_s": round(cpu, 2), "cpu_s_per_1000": round(cpu / args.n * 1000, 3),
        "peak_server_in_flight": stats["max_in_flight"],
    }
    env = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count(),
           "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
           "python": platform.python_version(), "aiohttp": aiohttp.__version__,
           "command": "python " + " ".join(sys.argv)}
    print(f"client throughput: {args.n:,} requests, limit {args.rpm:,.0f} RPM over {args.window_s:g} s windows, "
          f"latency ~{args.latency_ms:.0f} ms, {args.fault_rate:.0%} faults, client "
          f"{'told the limit' if args.client_rpm else 'learning the limit'} ({env['cpu']}, {env['cores']} cores, "
          f"load average {load_before[0]:.2f} before)")
    print(f"{'metric':<34}{'value':>14}  target")
    for name, value, target in [
        ("utilisation (admitted/min / limit)", f"{utilisation:.3f}", ">= 0.97"),
        ("goodput (completed/min / limit)", f"{goodput:.3f}", f"<= {1 - args.fault_rate:.2f} by design"),
        ("requests lost", lost, "0"),
        ("requests completed twice", twice, "0"),
        ("429s from the server", stats["refused"], "a handful"),
        ("faults injected", row["faults_injected"], ""),
        ("retries", row["retries"], ""),
        ("wall time (s)", f"{wall:.1f}", ""),
        ("client CPU s per 1,000 requests", f"{row['cpu_s_per_1000']:.3f}", "<= 1"),
    ]:
        print(f"{name:<34}{value!s:>14}  {target}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"env": env, "result": row}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
