"""``tunesmith serve`` throughput: 8 concurrent clients next to 1.

Starts ``tunesmith serve`` as a separate process (the same command a user runs), waits for
``/health``, then sends the same chat requests from 1 client at a time and from 8 clients at
once, each client sending its requests one after another. With one client the server generates
one request per batch; with 8 its worker batches whatever is queued, so every forward pass
serves several requests. Printed per run: requests, completion tokens (from each reply's
``usage``), seconds, requests and tokens per second, and the speed-up over 1 client.

Run from the repository root with the repository installed (``make install``); the default
model is the built-in smollm2-135m, so nothing is downloaded:

    .venv/bin/python bench/serve_throughput.py
    .venv/bin/python bench/serve_throughput.py --requests 64 --max-tokens 64 --clients 1 4 8 16 --device cpu

With ``--engine vllm``, run from ``.venv-vllm`` (``make test`` builds it on x86-64 Linux; vLLM's
CPU build and the ``tunesmith-vllm`` plugin), which serves with the transformers engine too:

    .venv-vllm/bin/python bench/serve_throughput.py --engine vllm
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

API_KEY = "bench"
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Why is the sky blue?",
    "Write one sentence about the sea.",
    "What is two plus two?",
    "Give a tip for learning to cook.",
    "What does a bee make?",
    "Describe a cat in five words.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="what tunesmith serve --model loads")
    parser.add_argument("--requests", type=int, default=16, help="requests per run, shared among the clients")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients of each run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine", default="transformers", help="what tunesmith serve --engine uses (vllm needs the tunesmith-vllm plugin)")
    args = parser.parse_args()

    port = free_port()
    command = [sys.executable, "-m", "tunesmith", "serve", "--model", args.model, "--port", str(port), "--device", args.device,
               "--engine", args.engine, "--max-queue", str(max(args.clients) * 2)]
    server = subprocess.Popen(command, env={**os.environ, "TUNESMITH_API_KEY": API_KEY})
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until_healthy(base_url, server)
        model = httpx.get(f"{base_url}/v1/models", headers=headers()).json()["data"][0]["id"]
        ask(base_url, model, QUESTIONS[0], args.max_tokens)  # warm-up
        print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'seconds':>8} {'req/s':>7} {'tok/s':>8} {'speed-up':>8}")
        baseline = None
        for clients in args.clients:
            tokens, seconds = run(base_url, model, clients, args.requests, args.max_tokens)
            rate = tokens / seconds
            baseline = baseline or rate
            print(f"{clients:>7} {args.requests:>8} {tokens:>7} {seconds:>8.2f} {args.requests / seconds:>7.2f} {rate:>8.1f} {rate / baseline:>7.2f}x")
    finally:
        server.terminate()
        server.wait(timeout=60)


def run(base_url: str, model: str, clients: int, requests: int, max_tokens: int) -> tuple[int, float]:
    """Completion tokens generated and seconds taken for ``requests`` requests from ``clients`` clients."""

    def client(index: int) -> int:
        return sum(ask(base_url, model, QUESTIONS[i % len(QUESTIONS)], max_tokens) for i in range(index, requests, clients))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    return tokens, time.perf_counter() - start


def ask(base_url: str, model: str, question: str, max_tokens: int) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers(), timeout=600)
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"]


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def wait_until_healthy(base_url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"tunesmith serve exited with status {server.returncode} before answering /health")
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    sys.exit("tunesmith serve did not answer /health within 10 minutes")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    main()
