"""Chat completions through `optical-memory serve` (HTTP) against the same work in-process.

For each number of concurrent clients (1, 8, 32 by default) every client owns a session
(pre-filled with a short history) and asks questions one after another; the in-process
run calls `OpticalMemory.ask` from that many threads, the HTTP run posts the same
requests (`POST /v1/chat/completions`, only the new message, one keep-alive httpx client
per thread) to the server running in a process of its own. Both use their own SQLite
store and the same model. Recorded: requests/s, p50 and p99 latency, and the overhead
of HTTP (p50 difference and the ratio of the two).

    python benchmarks/serve.py                          # CPU, the tiny random checkpoint
    python benchmarks/serve.py --model echo             # a backend that answers at once:
                                                        # the server's own overhead
    python benchmarks/serve.py --model /models/DeepSeek-OCR-random --device cuda

Results go to benchmarks/results/serve.json (`--out` to change).
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, command, cpu_name, write_json

HISTORY_TURNS = 20
MAX_TOKENS = 8


def _history(i: int) -> list[dict[str, str]]:
    return [
        {"role": ("user", "assistant")[t % 2],
         "content": f"[{t}] client {i}: the launch is on March {t % 28 + 1}, budget {t * 7}k"}
        for t in range(HISTORY_TURNS)
    ]


def _echo_backend() -> Any:
    from optical_memory.backends import Answer, Backend
    from optical_memory.backends.profiles import deepseek_ocr_profile

    class Echo(Backend):
        """Answers at once (no model): what remains is the memory's and the server's work."""

        name = "echo"
        profile = deepseek_ocr_profile(8192)

        def answer(self, prompt: Any, *, max_tokens: int, progress: bool = False,
                   **options: Any) -> Answer:
            return Answer("Noted.", self.name, "echo", usage={"completion_tokens": 2},
                          finish_reason="stop")

    return Echo()


def open_memory(store: Path, model: str, device: str) -> Any:
    from optical_memory.memory import OpticalMemory

    if model == "echo":
        return OpticalMemory(store, model=_echo_backend())
    return OpticalMemory(store, model=model, device=device)


def _serve(store: str, model: str, device: str, port: int, threads: int, http: str) -> None:
    import uvicorn

    from optical_memory.apps.server import create_app

    memory = open_memory(Path(store), model, device)
    if model != "echo":
        memory.backend.model  # noqa: B018 (load before serving)
    app = create_app(memory, threads=threads)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                http=http)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stats(latencies: list[float], wall: float, cpu: float) -> dict[str, float]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "requests": len(ordered),
        "requests_per_s": round(len(ordered) / wall, 2),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
        # CPU time per request (the benchmark process, and the server's for HTTP): unlike
        # latency, it does not grow when other work shares the machine
        "cpu_ms_per_request": round(cpu / len(ordered) * 1000, 2),
    }


def _run(clients: int, per_client: int, ask: Any) -> tuple[list[float], float]:
    """`clients` threads each calling `ask(client, k)` `per_client` times after a start barrier:
    the latencies and the wall time."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        start.wait()
        try:
            for k in range(per_client):
                t0 = time.perf_counter()
                ask(i, k)
                latencies[i].append(time.perf_counter() - t0)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return [x for xs in latencies for x in xs], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory, or 'echo' (default: the tiny "
                        "random checkpoint, written to a temporary folder)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels (default 1,8,32)")
    parser.add_argument("--requests", type=int, default=32,
                        help="requests per round, level and mode, spread over the clients "
                        "(default 32)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per level, alternating in-process and HTTP (default 3)")
    parser.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"],
                        help="uvicorn's HTTP parser (auto: httptools when installed)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "serve.json"))
    args = parser.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model = args.model
    label = model
    if model is None:
        from optical_memory.backends.deepseek_ocr.testing import write_checkpoint

        model = str(write_checkpoint(work / "ckpt"))
        label = "tiny random DeepSeek-OCR checkpoint (optical_memory.backends.deepseek_ocr.testing)"
    threads = max(levels) + 8

    # the server, in a process of its own
    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    server = ctx.Process(target=_serve, args=(str(work / "served.sqlite3"), model, args.device,
                                              port, threads, args.http), daemon=True)
    server.start()
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not server.is_alive():
            raise SystemExit("the server did not start")
        time.sleep(0.2)

    memory = open_memory(work / "inproc.sqlite3", model, args.device)
    # one keep-alive client per simulated client, made before timing (creating an httpx
    # client costs milliseconds: its SSL context)
    pool = [httpx.Client(base_url=url, timeout=600) for _ in range(max(levels))]

    def http(i: int = 0) -> httpx.Client:
        return pool[i]

    def session(mode: str, clients: int, i: int) -> str:
        return f"{mode}-{clients}-{i}"

    results: dict[str, Any] = {}
    for clients in levels:
        per_client = max(1, args.requests // clients)
        for i in range(clients):  # histories, and one warm-up question per session
            memory.extend(session("inproc", clients, i), _history(i))
            memory.ask(session("inproc", clients, i), "warm-up?", MAX_TOKENS)
            r = http(i).post("/v1/sessions/" + session("http", clients, i) + "/turns",
                            json=_history(i))
            r.raise_for_status()
            r = http(i).post("/v1/chat/completions", headers={
                "X-Session-Id": session("http", clients, i)}, json={
                "model": "optical-memory", "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": "warm-up?"}]})
            r.raise_for_status()

        def ask_inproc(i: int, k: int, clients: int = clients) -> None:
            memory.ask(session("inproc", clients, i), f"question {k}: when is launch?",
                       MAX_TOKENS)

        def ask_http(i: int, k: int, clients: int = clients) -> None:
            r = http(i).post("/v1/chat/completions", headers={
                "X-Session-Id": session("http", clients, i)}, json={
                "model": "optical-memory", "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": f"question {k}: when is launch?"}]})
            r.raise_for_status()

        # rounds alternate between the two, so load from elsewhere on the machine falls on both
        runs: dict[str, tuple[list[float], float, float]] = {
            "inproc": ([], 0.0, 0.0), "http": ([], 0.0, 0.0)}
        server_cpu = 0.0
        for _ in range(args.rounds):
            for mode, ask in (("inproc", ask_inproc), ("http", ask_http)):
                cpu0 = os.times()
                server0 = _cpu_seconds(server.pid)
                lat, wall = _run(clients, per_client, ask)
                cpu1 = os.times()
                cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
                if mode == "http":
                    server_cpu += _cpu_seconds(server.pid) - server0
                    cpu += _cpu_seconds(server.pid) - server0
                lat0, wall0, cpu_total = runs[mode]
                runs[mode] = (lat0 + lat, wall0 + wall, cpu_total + cpu)
        inproc = _stats(*runs["inproc"])
        over_http = _stats(*runs["http"])
        over_http["server_cpu_ms_per_request"] = round(
            server_cpu / over_http["requests"] * 1000, 2)
        results[str(clients)] = {
            "in_process": inproc,
            "http": over_http,
            "http_overhead_p50_ms": round(over_http["p50_ms"] - inproc["p50_ms"], 2),
            "http_overhead_cpu_ms": round(
                over_http["cpu_ms_per_request"] - inproc["cpu_ms_per_request"], 2),
            "throughput_ratio": round(over_http["requests_per_s"] / inproc["requests_per_s"], 3),
        }
        print(f"{clients:>3} clients: in-process {inproc['requests_per_s']:.1f} req/s p50 "
              f"{inproc['p50_ms']:.1f} ms p99 {inproc['p99_ms']:.1f} ms | HTTP "
              f"{over_http['requests_per_s']:.1f} req/s p50 {over_http['p50_ms']:.1f} ms p99 "
              f"{over_http['p99_ms']:.1f} ms | +{results[str(clients)]['http_overhead_p50_ms']}"
              f" ms p50 | CPU/request {inproc['cpu_ms_per_request']} vs "
              f"{over_http['cpu_ms_per_request']} ms", flush=True)
    for c in pool:
        c.close()
    server.terminate()
    server.join(30)
    memory.close()

    import starlette
    import uvicorn

    write_json(args.out, {
        "command": command("python3", "benchmarks/serve.py"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "device": args.device},
        "versions": {"starlette": starlette.__version__, "uvicorn": uvicorn.__version__,
                     "httpx": httpx.__version__},
        "model": label,
        "workload": {
            "history_turns": HISTORY_TURNS, "max_tokens": MAX_TOKENS,
            "requests_per_round": args.requests, "rounds": args.rounds,
            "http_parser": args.http if args.http != "auto" else (
                "httptools" if importlib.util.find_spec("httptools") else "h11"),
            "request": "POST /v1/chat/completions with only the new message (X-Session-Id); "
                       "in-process: OpticalMemory.ask with the same question",
        },
        "levels": results,
    })
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
