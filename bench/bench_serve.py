"""Load benchmark of the model server: 1, 4 and 16 concurrent clients on the tiny model.

Starts ``medsight serve`` on 127.0.0.1 for a model package, then for each concurrency level
runs that many clients, each sending its requests back to back (a held-out image and a
grounding question, Open Inference Protocol). Reports p50/p95 latency, requests/s and the
server's peak RSS during the level, and checks that every request id came back exactly once.
A control run at the highest level with ``--max-batch-size 1`` shows what batching buys.

Usage: python bench/bench_serve.py --package PKG | --chain CHAIN_WORKDIR
       [--levels 1,4,16] [--requests 96] [--max-batch-size 16] [--max-wait-ms 5] [--json OUT] [--no-control]
(--chain: the newest instruct-tune/base-models outputs of `medsight chain --workdir DIR`.)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Segment all visible structures."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def package_from_chain(chain: Path, out: Path) -> tuple[Path, list[Path]]:
    from medsight.serve.package import build_package

    def newest(stage: str) -> Path:
        found = sorted(chain.glob(f"{stage}/*/stage.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise SystemExit(f"{chain}: no finished {stage}; run `medsight chain --workdir {chain}` first")
        return found[-1].parent

    model = newest("instruct-tune")
    record = json.loads((model / "stage.json").read_text())
    from medsight.data.prepared_index import read_split
    from medsight.data.taxonomy import resolve_taxonomy

    data = newest("synth-data")
    images = sorted(r.image_path for r in read_split(data, "test", resolve_taxonomy(data, "")))
    return build_package(model, Path(record["inputs"]["base"]["path"]), out / "package"), images


class Server:
    def __init__(self, package: Path, max_batch_size: int, log: Path, max_wait_ms: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env.pop("MEDSIGHT_SERVE_TOKEN", None)
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "medsight.cli", "serve", "--model", str(package), "--port", str(self.port),
             "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def wait(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited ({self.process.returncode}); see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise SystemExit("server did not become ready")

    def rss(self) -> int:
        """Resident bytes of the server process (VmRSS)."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def batch_counters(server: Server) -> tuple[float, float]:
    """(requests answered, model calls) so far, from the server's Prometheus metrics."""
    import httpx

    values = {}
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(("medsight_batch_size_sum ", "medsight_batch_size_count ")):
            name, value = line.split()
            values[name] = float(value)
    return values.get("medsight_batch_size_sum", 0.0), values.get("medsight_batch_size_count", 0.0)


def run_level(server: Server, images: list[bytes], clients: int, per_client: int) -> dict:
    import httpx

    latencies: list[float] = []
    sent: list[str] = []
    received: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    peak = [server.rss()]
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            peak[0] = max(peak[0], server.rss())
            time.sleep(0.05)

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            start.wait()
            for n in range(per_client):
                request_id = uuid.uuid4().hex
                image = images[(index * per_client + n) % len(images)]
                body = {"id": request_id, "inputs": [
                    {"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]},
                    {"name": "question", "datatype": "BYTES", "shape": [1], "data": [QUESTION]}],
                    "parameters": {"max_new_tokens": 48, "temperature": 0.0}}
                with lock:
                    sent.append(request_id)
                began = time.perf_counter()
                try:
                    response = http.post(f"{server.url}/v2/models/medsight/infer", json=body)
                    elapsed = time.perf_counter() - began
                    if response.status_code != 200:
                        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
                    answer_id = response.json()["id"]
                except Exception as error:  # counted, never retried: a lost request must show
                    with lock:
                        failures.append(str(error))
                    continue
                with lock:
                    latencies.append(elapsed)
                    received.append(answer_id)

    answered_before, calls_before = batch_counters(server)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    stop_sampling.set()
    sampler.join()
    answered_after, calls_after = batch_counters(server)
    duplicates = len(received) - len(set(received))
    lost = sorted(set(sent) - set(received))
    foreign = sorted(set(received) - set(sent))
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(sent),
        "answered": len(received),
        "lost": len(lost),
        "answered_twice": duplicates,
        "foreign_ids": len(foreign),
        "failures": failures[:5],
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(received) / wall, 3),
        "p50_ms": round(1000 * statistics.median(ordered), 1) if ordered else None,
        "p95_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1) if ordered else None,
        "peak_rss_mib": round(peak[0] / 2**20, 1),
        "mean_batch_size": round((answered_after - answered_before) / max(1.0, calls_after - calls_before), 2),
    }


def benchmark(package: Path, image_files: list[Path], levels: list[int], requests: int, max_batch_size: int,
              max_wait_ms: float, workdir: Path, label: str) -> list[dict]:
    images = [base64.b64encode(p.read_bytes()).decode() for p in image_files]
    server = Server(package, max_batch_size, workdir / f"server-{label}.log", max_wait_ms)
    try:
        server.wait()
        run_level(server, images, 2, 4)  # warm-up (first-call allocations), not reported
        results = []
        for clients in levels:
            per_client = max(1, requests // clients)
            result = run_level(server, images, clients, per_client)
            result["max_batch_size"] = max_batch_size
            results.append(result)
            print(json.dumps(result), flush=True)
        return results
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--package", type=Path, help="A model package (medsight registry package).")
    source.add_argument("--chain", type=Path, help="A trained chain workdir (a package is built from it).")
    parser.add_argument("--images", type=Path, help="Folder of PNGs to send (default: the chain's test split).")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--requests", type=int, default=96, help="Requests per level (split among its clients).")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--no-control", action="store_true", help="Skip the --max-batch-size 1 run.")
    parser.add_argument("--json", type=Path, help="Write all results here.")
    args = parser.parse_args()
    levels = [int(v) for v in args.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        if args.chain:
            package, images = package_from_chain(args.chain, workdir)
        else:
            package, images = args.package, []
        if args.images:
            images = sorted(args.images.glob("*.png"))
        if not images:
            raise SystemExit("no images to send: pass --images DIR or --chain")
        results = {"batched": benchmark(package, images, levels, args.requests, args.max_batch_size, args.max_wait_ms, workdir, "batched")}
        if not args.no_control:
            results["unbatched"] = benchmark(package, images, [max(levels)], args.requests, 1, 0.0, workdir, "unbatched")
    one, many = results["batched"][0], results["batched"][-1]
    summary = {
        "speedup_requests_per_s": round(many["requests_per_s"] / one["requests_per_s"], 2),
        "all_answered_exactly_once": all(r["lost"] == 0 and r["answered_twice"] == 0 and r["foreign_ids"] == 0
                                         for runs in results.values() for r in runs),
        "cpu_count": os.cpu_count(),
    }
    if "unbatched" in results:
        summary["batching_gain_at_max_level"] = round(many["requests_per_s"] / results["unbatched"][0]["requests_per_s"], 2)
    results["summary"] = summary
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if not summary["all_answered_exactly_once"]:
        raise SystemExit("some requests were lost or answered twice")


if __name__ == "__main__":
    main()
