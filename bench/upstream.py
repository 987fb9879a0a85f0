"""The upstream worker's cost: a short chat request to a foreign engine (`transformers serve
--continuous-batching` serving SmolLM2, saved as a Hugging Face folder) called directly, against the
same request through `fareway worker --engine openai` in front of it (WorkerService.Complete, the
call a gateway makes), alternating, p50 and p99 of each. Every piece is its own process.

The direct baseline is the cheapest call a client can make: one non-streamed POST; beside it, the same
request streamed. The worker always streams from the engine (so that it observes the request as it
runs), parses each chunk, meters it, and answers once over gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import grpc

from bench.latency import alternating, percentile
from fareway.inference.v1 import inference_pb2 as ipb
from fareway.net import free_port
from fareway.worker.v1 import worker_pb2 as wpb
from fareway.worker.v1 import worker_pb2_grpc

QUESTION = "What is the capital of France?"
TO_HF = Path(__file__).parent.parent / "scripts" / "gguf_to_hf.py"


def wait_http(url: str, process: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer")


async def measure(engine: str, model: str, worker: str, samples: int, max_tokens: int) -> dict[str, list[float]]:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
            "temperature": 0}
    request = wpb.GenerateRequest(model="smollm2", sampling=ipb.SamplingParams(max_tokens=max_tokens, temperature=0))
    request.chat.messages.add(role="user", content=QUESTION)
    async with aiohttp.ClientSession() as session, grpc.aio.insecure_channel(worker) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)

        async def direct() -> None:
            async with session.post(f"{engine}/chat/completions", json=body) as response:
                reply = await response.json()
            assert reply["usage"]["completion_tokens"] >= 1, reply

        async def direct_stream() -> None:
            async with session.post(f"{engine}/chat/completions",
                                    json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
                async for _ in response.content:
                    pass

        async def through() -> None:
            reply = await stub.Complete(request, timeout=60)
            assert reply.usage.completion_tokens >= 1 and reply.usage.metering == "observed", reply

        # warm-up: connections, the engine's first requests
        return await alternating({"direct": direct, "direct_stream": direct_stream, "worker": through},
                                 samples, warmups=5)


def run(samples: int, max_tokens: int) -> dict[str, object]:
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="fwbench-upstream-") as tmp:
        folder = Path(tmp) / "smollm2"
        subprocess.run([sys.executable, str(TO_HF), str(folder)], check=True, capture_output=True)
        engine_port, worker_port = free_port(), free_port()
        logs = [open(Path(tmp) / name, "wb") for name in ("engine.log", "worker.log")]  # noqa: SIM115
        engine = subprocess.Popen(
            [str(bin_dir / "transformers"), "serve", "--continuous-batching", str(folder), "--host", "127.0.0.1",
             "--port", str(engine_port), "--dtype", "float32", "--device", "cpu"],
            stdout=logs[0], stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        worker = None
        try:
            wait_http(f"http://127.0.0.1:{engine_port}/health", engine)
            url = f"http://127.0.0.1:{engine_port}/v1"
            worker = subprocess.Popen(
                [sys.executable, "-m", "cli", "worker", "--engine", "openai", "--upstream", url, "--model", str(folder),
                 "--served-model-name", "smollm2", "--hardware-class", "cpu", "--tokenizer", str(folder),
                 "--listen", f"127.0.0.1:{worker_port}", "--worker-id", "bench-upstream"],
                stdout=logs[1], stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items() if k != "REDIS_URL"})
            time.sleep(3)
            lat = asyncio.run(measure(url, str(folder), f"127.0.0.1:{worker_port}", samples, max_tokens))
        finally:
            for process in (worker, engine):
                if process is not None:
                    process.terminate()
                    process.wait(30)
            for log in logs:
                log.close()
    p50 = {k: statistics.median(v) for k, v in lat.items()}
    p99 = {k: percentile(v, 0.99) for k, v in lat.items()}
    return {
        "bench": "upstream", "samples": samples, "max_tokens": max_tokens, "cpu_count": os.cpu_count(),
        "direct_p50_ms": round(p50["direct"], 3), "direct_p99_ms": round(p99["direct"], 3),
        "worker_p50_ms": round(p50["worker"], 3), "worker_p99_ms": round(p99["worker"], 3),
        "overhead_p50_ms": round(p50["worker"] - p50["direct"], 3),
        "worker_p50_vs_direct": round(p50["worker"] / p50["direct"], 3),
        "direct_stream_p50_ms": round(p50["direct_stream"], 3),
        "overhead_vs_streamed_p50_ms": round(p50["worker"] - p50["direct_stream"], 3),
        "worker_p50_vs_streamed": round(p50["worker"] / p50["direct_stream"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100, help="alternating samples per side (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens per request (default: %(default)s)")
    args = parser.parse_args()
    from bench.common import print_results
    f = run(args.samples, args.max_tokens)
    rows = [
        ("setup", f"{f['cpu_count']} cores shared by the client, transformers serve and the worker (separate "
                  "processes); absolute figures are this machine's"),
        (f"chat request, {f['max_tokens']} tokens, engine directly",
         f"p50 {f['direct_p50_ms']:.2f} ms, p99 {f['direct_p99_ms']:.2f} ms ({f['samples']} alternating samples)"),
        ("same, through the upstream worker", f"p50 {f['worker_p50_ms']:.2f} ms, p99 {f['worker_p99_ms']:.2f} ms"),
        ("upstream worker overhead", f"p50 +{f['overhead_p50_ms']:.2f} ms: {f['worker_p50_vs_direct']:.3f}x direct"),
        ("same request streamed from the engine directly",
         f"p50 {f['direct_stream_p50_ms']:.2f} ms: the worker is +{f['overhead_vs_streamed_p50_ms']:.2f} ms, "
         f"{f['worker_p50_vs_streamed']:.3f}x that (what the worker adds beyond the engine's streaming)"),
    ]
    print_results("upstream worker: its overhead over calling the engine directly", rows, f)


if __name__ == "__main__":
    main()
