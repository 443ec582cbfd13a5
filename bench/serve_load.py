"""Load on `genesis serve`: a burst of concurrent generation requests on loopback.

    python bench/serve_load.py --run-dir /tmp/genesis-demo-bench/trunk      # the run `bench/demo.py` leaves

Starts the server as users do (`genesis serve`, default limits: queue 8 per model, 2 models loaded), warms one
model, then fires `--requests` requests at once, spread over three models (a milestone, its SFT and DPO
branch) so the LRU has to refuse a third model while two are busy. Every request must be answered (a stream
that ends in `done`) or refused with 429; one that has no answer after `--timeout` seconds counts as hung.
The server's resident memory (with its children) is sampled every 20 ms throughout.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import append_run, command_line, environment, git_rev  # noqa: E402
from genesis_model.launch import free_port  # noqa: E402

PROMPTS = ["Why is the sky blue?", "How do I start learning to cook?", "What is a prime number?",
           "Tell me about volcanoes.", "How does a bicycle stay upright?"]


def rss_mib(process: psutil.Process) -> float:
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def one_request(url: str, body: dict, timeout: float) -> dict:
    started = time.perf_counter()
    try:
        with httpx.stream("POST", url + "/api/generate", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                response.read()
                return {"status": response.status_code, "seconds": time.perf_counter() - started}
            first_token, last_event = None, None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    last_event = line.removeprefix("event: ")
                    if last_event == "token" and first_token is None:
                        first_token = time.perf_counter() - started
                if time.perf_counter() - started > timeout:
                    return {"status": "hung", "seconds": time.perf_counter() - started}
            return {"status": 200 if last_event == "done" else f"ended on {last_event}",
                    "first_token_s": first_token, "seconds": time.perf_counter() - started}
    except httpx.TimeoutException:
        return {"status": "hung", "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_load.json")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--run-dir", str(args.run_dir),
                               "--port", str(port), "--device", "cpu"], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                models = httpx.get(url + "/api/models", timeout=2).json()["models"]
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("genesis serve did not start")
                time.sleep(0.3)
        by_kind = {m["kind"]: m["id"] for m in models}  # the newest of each kind
        targets = [by_kind[kind] for kind in ("milestone", "sft", "dpo") if kind in by_kind]
        process = psutil.Process(server.pid)
        rss_idle = rss_mib(process)
        warm = one_request(url, {"model": targets[0], "prompt": "Hello", "max_new_tokens": 8}, args.timeout)
        assert warm["status"] == 200, warm
        rss_warm = rss_mib(process)

        peak = [rss_warm]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], rss_mib(process))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        bodies = [{"model": targets[i % len(targets)], "prompt": PROMPTS[i % len(PROMPTS)], "chat": True,
                   "max_new_tokens": args.max_new_tokens, "temperature": 0.8, "seed": i} for i in range(args.requests)]
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
            results = list(pool.map(lambda body: one_request(url, body, args.timeout), bodies))
        burst_s = time.perf_counter() - started
        sampling.set()
        sampler.join()
        stats = httpx.get(url + "/api/stats", timeout=10).json()
    finally:
        server.terminate()
        server.wait(timeout=30)

    statuses = [r["status"] for r in results]
    first_tokens = sorted(r["first_token_s"] for r in results if r.get("first_token_s") is not None)
    summary = {
        "requests": len(results),
        "answered": statuses.count(200),
        "refused_429": statuses.count(429),
        "hung": statuses.count("hung"),
        "other": len(results) - statuses.count(200) - statuses.count(429) - statuses.count("hung"),
        "p50_first_token_s": round(statistics.median(first_tokens), 3) if first_tokens else None,
        "max_first_token_s": round(first_tokens[-1], 3) if first_tokens else None,
        "burst_seconds": round(burst_s, 2),
        "peak_rss_mib": round(peak[0], 1),
        "rss_idle_mib": round(rss_idle, 1),
        "rss_one_model_mib": round(rss_warm, 1),
        "models": targets,
        "max_new_tokens": args.max_new_tokens,
        "server_stats": stats,
        "limits": {"queue_size": 8, "max_loaded_models": 2},
    }
    run = {**environment(), "command": command_line("serve_load.py"), "git_rev": git_rev(), **summary}
    append_run(args.out, run, run, whole_top=True)  # the top level: the newest run
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
