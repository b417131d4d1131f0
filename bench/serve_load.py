"""Load benchmark of the OpenAI-compatible endpoint (loopback only, bounded in count and time).

    python bench/serve_load.py                      # tiny model built here, served, measured
    python bench/serve_load.py --checkpoint runs/tiny/ppo/final
    python bench/serve_load.py --url http://127.0.0.1:8000 --model tiny/ppo --api-key KEY

C clients (threads) each send R requests, alternating completions and chat, and
check every response is well-formed. Prints p50/p99 latency, requests/s and the
error count; writes them as JSON (default bench/results/serve_load.json).
A benchmark, not a test: it reports numbers and fails only if nothing worked.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import requests

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROMPT = "Instruction: reverse the words\nInput: red green blue\nResponse:"


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def _well_formed(kind: str, body: dict) -> bool:
    choices = body.get("choices") or []
    if len(choices) != 1 or choices[0].get("finish_reason") not in ("stop", "length"):
        return False
    text = choices[0].get("text") if kind == "completion" else choices[0].get("message", {}).get("content")
    usage = body.get("usage") or {}
    return isinstance(text, str) and usage.get("total_tokens") == \
        usage.get("prompt_tokens", -1) + usage.get("completion_tokens", -1)


def run_load(url: str, model: str, api_key: str | None, clients: int, requests_per_client: int,
             max_tokens: int, time_limit_s: float) -> dict:
    if urlparse(url).hostname not in LOOPBACK:
        raise SystemExit(f"{url}: this benchmark only targets loopback addresses")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + time_limit_s
    latencies: list[float] = []
    errors: list[str] = []
    skipped = 0
    lock = threading.Lock()

    def client(c: int) -> None:
        nonlocal skipped
        session = requests.Session()
        for i in range(requests_per_client):
            if time.monotonic() > deadline:
                with lock:
                    skipped += requests_per_client - i
                return
            kind = "completion" if (c + i) % 2 == 0 else "chat"
            path, body = ("/v1/completions", {"prompt": PROMPT}) if kind == "completion" else \
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]})
            body.update(model=model, max_tokens=max_tokens, seed=c * 1000 + i)
            start = time.monotonic()
            try:
                r = session.post(url + path, json=body, headers=headers, timeout=120)
                ok = r.status_code == 200 and _well_formed(kind, r.json())
                problem = None if ok else f"{kind}: HTTP {r.status_code} {r.text[:200]}"
            except Exception as e:  # a benchmark counts failures instead of stopping
                problem = f"{kind}: {type(e).__name__}: {e}"
            elapsed = time.monotonic() - start
            with lock:
                (errors.append(problem) if problem else latencies.append(elapsed))

    wall = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.monotonic() - wall
    lat = sorted(latencies)
    return {
        "clients": clients, "requests_per_client": requests_per_client, "max_tokens": max_tokens,
        "completed": len(lat), "errors": len(errors), "not_sent_time_limit": skipped,
        "wall_s": round(wall, 3), "requests_per_s": round(len(lat) / wall, 2) if wall else 0.0,
        "latency_p50_ms": round(1000 * percentile(lat, 50), 1),
        "latency_p99_ms": round(1000 * percentile(lat, 99), 1),
        "latency_max_ms": round(1000 * lat[-1], 1) if lat else float("nan"),
        "first_errors": errors[:5],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_locally(checkpoint: str | None, max_batch_size: int, num_cpus: int):
    """Start Ray + Serve on a free loopback port; returns (url, model name, stop function)."""
    import ray
    from ray import serve

    from orchestration.serve.app import build_app
    from rlhf.config import ServeConfig
    from rlhf.tiny import make_tiny_base

    if checkpoint is None:
        texts = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)]
        checkpoint = str(make_tiny_base(Path(tempfile.mkdtemp()) / "tiny", texts, vocab_size=512))
    port = _free_port()
    ray.init(num_cpus=num_cpus, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(port=port, max_batch_size=max_batch_size, api_key=None)
    serve.run(build_app(checkpoint, cfg, model_name="bench", num_cpus=max(1, num_cpus - 1)),
              name="instructray-bench", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.5)

    def stop() -> None:
        serve.shutdown()
        ray.shutdown()
    return url, "bench", stop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="an already running endpoint (loopback only)")
    ap.add_argument("--model", help="model name at --url")
    ap.add_argument("--api-key", default=os.environ.get("INSTRUCTRAY_API_KEY"))
    ap.add_argument("--checkpoint", help="HF dir to serve (default: a tiny model built here)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=50, help="per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=300, help="seconds; later requests are not sent")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = ap.parse_args()

    stop = None
    if args.url:
        url, model = args.url.rstrip("/"), args.model
        if not model:
            ap.error("--model is required with --url")
    else:
        url, model, stop = serve_locally(args.checkpoint, args.max_batch_size, args.num_cpus)
    try:
        result = run_load(url, model, args.api_key, args.clients, args.requests,
                          args.max_tokens, args.time_limit)
    finally:
        if stop:
            stop()
    result.update(url=url, model=model, max_batch_size=args.max_batch_size,
                  machine_cpus=os.cpu_count(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['completed']} ok, {result['errors']} errors, {result['not_sent_time_limit']} not sent "
          f"in {result['wall_s']} s: {result['requests_per_s']} req/s, "
          f"p50 {result['latency_p50_ms']} ms, p99 {result['latency_p99_ms']} ms -> {out}")
    if result["completed"] == 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
