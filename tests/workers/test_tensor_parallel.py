"""Tensor parallelism on CPU with gloo: a model split over ranks must give the
tokens and logits it gives on one device, and a rank's death must bring the
worker down at once, never hang it."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import save_file

from fareway.inference.v1 import inference_pb2 as ipb
from fareway.net import free_port
from fareway.worker.v1 import worker_pb2 as pb
from fareway.worker.v1 import worker_pb2_grpc
from workers.config import RunnerConfig, WorkerConfig
from workers.engine.llm_engine import EngineRequest, RequestOutput
from workers.engine.scheduler import SchedulerConfig
from workers.engine.sequence import SamplingOptions
from workers.layers.linear import PIN_KERNEL_ENV
from workers.models.config import LlamaConfig
from workers.models.llama import build_model
from workers.parallel.sharding import RowParallelLinear, check_shardable, head_shard, shard_model
from workers.server import create_worker_server
from workers.worker import Worker

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                       num_kv_heads=3, head_dim=64)


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    """Rank 0 runs in the test process and takes its share of the cores (one each on 2 cores)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def spawned_ranks(parent_pid: int) -> list[int]:
    """Pids of the rank processes `parent_pid` spawned (Linux /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent_pid and b"spawn_main" in command:
            pids.append(int(stat.parent.name))
    return pids


def is_running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def tp_worker(checkpoint: Any, tensor_parallel_size: int, weights: str = "fp32", enforce_eager: bool = True,
              **scheduler: int) -> Worker:
    runner = RunnerConfig(device="cpu", kv_cache_memory_bytes=8 << 20, tensor_parallel_size=tensor_parallel_size,
                          weights=weights, enforce_eager=enforce_eager)
    return Worker(WorkerConfig(worker_id=f"tp{tensor_parallel_size}", runner=runner,
                               scheduler=SchedulerConfig(**scheduler)), checkpoint)


@dataclass(frozen=True)
class GreedyRun:
    tokens: list[list[int]]
    """Each prompt's greedy tokens."""
    logits: list[torch.Tensor]
    """Every step's logits."""
    worker: Worker
    """The (stopped) worker that ran."""


def greedy(checkpoint: Any, tensor_parallel_size: int, prompts: list[str], max_tokens: int,
           weights: str = "fp32", enforce_eager: bool = True, on_loaded: Callable[[Worker], None] | None = None,
           **scheduler: int) -> GreedyRun:
    """All requests are queued before the engine starts, so every run schedules the same steps.
    `on_loaded` sees the worker once it is loaded, before it serves."""
    worker = tp_worker(checkpoint, tensor_parallel_size, weights, enforce_eager, **scheduler)
    if on_loaded is not None:
        on_loaded(worker)
    logits: list[torch.Tensor] = []
    model = worker.runner.model
    compute_logits = model.compute_logits
    model.compute_logits = lambda hidden: logits.append(compute_logits(hidden)) or logits[-1]
    tokens: list[list[int]] = [[] for _ in prompts]
    finished = threading.Semaphore(0)

    def sink(index: int):  # noqa: ANN202
        def take(output: RequestOutput) -> None:
            tokens[index].extend(output.token_ids)
            if output.finished:
                finished.release()
        return take
    for index, text in enumerate(prompts):
        worker.engine.submit(EngineRequest(str(index), worker.tokenizer.encode(text),
                                           SamplingOptions(max_tokens, temperature=0, ignore_eos=True), sink(index)))
    worker.start()
    try:
        assert all(finished.acquire(timeout=60) for _ in prompts)
    finally:
        worker.stop()
    return GreedyRun(tokens, logits, worker)


def assert_same_run(reference: GreedyRun, split: GreedyRun, atol: float = 1e-4) -> None:
    assert split.tokens == reference.tokens
    assert len(split.logits) == len(reference.logits)
    for expected, actual in zip(reference.logits, split.logits):
        torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def test_two_ranks_give_the_tokens_and_logits_of_one_device(tiny_checkpoint) -> None:  # noqa: ANN001
    # A 16-token budget chunks the longer prompts: decodes, whole and chunked prefills share steps.
    prompts = ["a b c " * 12, "The capital of France is", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12"]
    scheduler = dict(max_num_seqs=4, max_num_batched_tokens=16)
    reference = greedy(tiny_checkpoint, 1, prompts, 12, **scheduler)
    assert_same_run(reference, greedy(tiny_checkpoint, 2, prompts, 12, **scheduler))


def test_int8_weights_split_over_two_ranks_are_one_devices_int8_weights(tiny_checkpoint, monkeypatch) -> None:  # noqa: ANN001
    """Row-parallel slices are quantized with their whole row's scale, so every rank holds exactly
    one device's int8 weights. Activations are quantized per token per slice (two levels, ~16 bits),
    which moves logits by a few 1e-4 of their size, not the tokens. Both runs, and every rank, on one
    kernel (the fastest measured would sway with the machine's load)."""
    monkeypatch.setenv(PIN_KERNEL_ENV, "fbgemm-int8")
    prompts = ["a b c " * 12, "The capital of France is"]
    reference = greedy(tiny_checkpoint, 1, prompts, 12, weights="int8")
    split = greedy(tiny_checkpoint, 2, prompts, 12, weights="int8")
    assert split.worker.runner.linear_kernel == reference.worker.runner.linear_kernel
    scale = max(logits.abs().max().item() for logits in reference.logits)
    assert_same_run(reference, split, atol=5e-4 * scale)


def test_more_ranks_than_kv_heads_replicate_them(tiny_checkpoint) -> None:  # noqa: ANN001
    """4 ranks, 2 KV heads: each rank holds the KV head its query head uses."""
    prompts = ["Once upon a time", "def fibonacci(n):"]
    reference = greedy(tiny_checkpoint, 1, prompts, 8)
    split = greedy(tiny_checkpoint, 4, prompts, 8)
    assert_same_run(reference, split)
    assert split.worker.runner.model.model.layers[0].self_attn.kv_cache.k.shape[2] == 1
    # Every rank stores its copy: the pool holds twice the bytes per token of one device.
    assert split.worker.runner.kv_bytes_per_token == 2 * reference.worker.runner.kv_bytes_per_token


@pytest.mark.slow
def test_smollm2_on_three_ranks_gives_the_tokens_and_logits_of_one_device(smollm2) -> None:  # noqa: ANN001
    """9 query heads and 3 KV heads: 3 query heads and 1 KV head per rank, 512 of the MLP's 1536.

    Three ranks add each layer's products in another order (a third of the sum each, then the
    all-reduce), and over 30 layers fp32's rounding of that order moves SmolLM2's logits (up to 42)
    by 2-3e-6 of their largest, 24-30 of fp32's steps there, depending on how the CPU's GEMM blocks
    the sums (9.2e-5 on a Zen 4, 1.13e-4 on another 2-core machine): the tolerance is 5e-6 of the
    largest logit. A wrong shard moves them by whole units, and the tokens."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]
    reference = greedy(smollm2, 1, prompts, 16)
    split = greedy(smollm2, 3, prompts, 16)
    assert split.worker.runner.linear_kernel == reference.worker.runner.linear_kernel
    scale = max(logits.abs().max().item() for logits in reference.logits)
    assert_same_run(reference, split, atol=5e-6 * scale)


def test_model_info_and_gpu_seconds_count_every_rank(tiny_checkpoint, background_loop) -> None:  # noqa: ANN001
    worker = tp_worker(tiny_checkpoint, 2)
    server = background_loop.run(create_worker_server(worker, "127.0.0.1:0"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest())
            responses = list(stub.Generate(pb.GenerateRequest(
                prompt="Hello", sampling=ipb.SamplingParams(max_tokens=4, temperature=0))))
    finally:
        background_loop.run(server.stop(0))
        worker.stop()
    assert (info.tensor_parallel_size, info.device_count) == (2, 2)
    # Weight bytes are the replica's: both ranks' shards (each rank also holds the embedding and head).
    from workers.model_runner import _module_bytes
    rank0 = _module_bytes(worker.runner.model.modules())
    assert info.weight_bytes == worker.runner.weight_bytes and rank0 < info.weight_bytes <= 2 * rank0
    # Each rank holds one of the 2 KV heads: the pool's bytes per token are those of one device.
    c = tiny_checkpoint.config
    assert info.kv_bytes_per_token == 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
    assert info.kv_cache_bytes == info.kv_capacity_tokens * info.kv_bytes_per_token <= 8 << 20
    assert worker.runner.model.model.layers[0].self_attn.kv_cache.k.shape[2] == 1
    assert responses[-1].usage.device_count == 2
    assert worker.engine.meter.num_devices == 2


def test_a_killed_rank_fails_requests_and_health_at_once(tiny_checkpoint, background_loop) -> None:  # noqa: ANN001
    worker = tp_worker(tiny_checkpoint, 2)
    server = background_loop.run(create_worker_server(worker, "127.0.0.1:0"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stream = worker_pb2_grpc.WorkerServiceStub(channel).Generate(pb.GenerateRequest(
                prompt="Hello", sampling=ipb.SamplingParams(max_tokens=1000, temperature=0)), timeout=30)
            next(stream), next(stream)
            assert health.Check(health_pb2.HealthCheckRequest()).status == _SERVING
            [rank] = spawned_ranks(os.getpid())
            os.kill(rank, signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(grpc.RpcError) as failure:
                for _ in stream:
                    pass
            assert failure.value.code() == grpc.StatusCode.INTERNAL
            while health.Check(health_pb2.HealthCheckRequest()).status != _NOT_SERVING:
                assert time.monotonic() - killed < 10
                time.sleep(0.05)
        assert worker.runner.group.failure is not None
    finally:
        background_loop.run(server.stop(0))
        stopping = time.monotonic()
        worker.stop()
    assert time.monotonic() - stopping < 10


@pytest.fixture(scope="module")
def tiny_model_folder(tiny_checkpoint, tmp_path_factory) -> Path:  # noqa: ANN001
    """The tiny random-weight model as a Hugging Face folder, for `fareway worker --model`."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    c = tiny_checkpoint.config
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings}))
    save_file(tiny_checkpoint.tensors, folder / "model.safetensors")
    tiny_checkpoint.tokenizer.backend.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture()
def worker_process(tiny_model_folder: Path) -> Iterator[tuple[subprocess.Popen[bytes], grpc.Channel]]:
    """`fareway worker --tensor-parallel-size 2` serving the tiny model; yields once it is SERVING."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if name != "REDIS_URL"}
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "worker", "--model", str(tiny_model_folder), "--device", "cpu",
         "--listen", f"127.0.0.1:{port}", "--kv-cache-memory", "8MiB", "--tensor-parallel-size", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=60)
        yield process, channel
    finally:
        channel.close()
        if process.poll() is None:
            process.kill()
        process.wait()


def test_the_worker_process_exits_nonzero_when_a_rank_dies(worker_process) -> None:  # noqa: ANN001
    process, channel = worker_process
    [rank] = spawned_ranks(process.pid)
    os.kill(rank, signal.SIGKILL)
    assert process.wait(timeout=30) == 1
    assert b"exited with code -9" in process.stderr.read()


def test_the_ranks_exit_when_the_worker_process_is_killed(worker_process) -> None:  # noqa: ANN001
    process, _ = worker_process
    ranks = spawned_ranks(process.pid)
    process.kill()
    process.wait()
    deadline = time.monotonic() + 10
    while any(is_running(pid) for pid in ranks):
        assert time.monotonic() < deadline, "a rank outlived the worker"
        time.sleep(0.05)


def test_sigterm_stops_every_rank_cleanly(worker_process) -> None:  # noqa: ANN001
    process, channel = worker_process
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    responses = list(stub.Generate(pb.GenerateRequest(
        prompt="Hello", sampling=ipb.SamplingParams(max_tokens=4, temperature=0))))
    assert sum(len(r.token_ids) for r in responses) == 4
    ranks = spawned_ranks(process.pid)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert not any(is_running(pid) for pid in ranks)


def parts(model: torch.nn.Module, layer: int) -> dict[str, torch.Tensor]:
    """A layer's weights by part, in the output-feature layout of the original model."""
    attn, mlp = model.model.layers[layer].self_attn, model.model.layers[layer].mlp
    q, k, v = _unstack(attn.qkv_proj.weight, attn.kv_heads_ratio)
    gate, up = mlp.gate_up_proj.weight.chunk(2)
    o = attn.o_proj.linear.weight if isinstance(attn.o_proj, RowParallelLinear) else attn.o_proj.weight
    down = mlp.down_proj.linear.weight if isinstance(mlp.down_proj, RowParallelLinear) else mlp.down_proj.weight
    return {"q": q, "k": k, "v": v, "gate": gate, "up": up, "o": o, "down": down}


def _unstack(qkv: torch.Tensor, kv_heads_ratio: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kv_rows = qkv.shape[0] // (kv_heads_ratio + 2)
    q_rows = kv_rows * kv_heads_ratio
    return qkv[:q_rows], qkv[q_rows: q_rows + kv_rows], qkv[q_rows + kv_rows:]


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_shards_reassemble_to_the_model(tiny_checkpoint, world_size: int) -> None:  # noqa: ANN001
    model = build_model(tiny_checkpoint.config, tiny_checkpoint.tensors, device=torch.device("cpu"),
                        dtype=torch.float32)
    shards = []
    for rank in range(world_size):
        shard = copy.deepcopy(model)
        shard_model(shard, rank, world_size)
        shards.append(shard)
    c = tiny_checkpoint.config
    for layer in range(c.num_layers):
        full = parts(model, layer)
        pieces = [parts(shard, layer) for shard in shards]
        for name in ("q", "gate", "up"):
            assert torch.equal(torch.cat([p[name] for p in pieces]), full[name])
        for name in ("o", "down"):
            assert torch.equal(torch.cat([p[name] for p in pieces], dim=1), full[name])
        for name in ("k", "v"):
            # Each rank holds the KV heads of its query heads: split, or replicated past 2 ranks.
            heads = [head_shard(c, rank, world_size).kv_heads for rank in range(world_size)]
            for piece, kv_heads in zip(pieces, heads):
                rows = slice(kv_heads.start * c.head_dim, kv_heads.stop * c.head_dim)
                assert torch.equal(piece[name], full[name][rows])
    # The embedding and the head are whole on every rank.
    assert torch.equal(shards[-1].model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_heads_split_keeps_the_grouped_query_grouping() -> None:
    assert [(list(s.q_heads), list(s.kv_heads)) for s in (head_shard(_SMOLLM2, r, 3) for r in range(3))] == [
        ([0, 1, 2], [0]), ([3, 4, 5], [1]), ([6, 7, 8], [2])]
    # 2 KV heads, 4 ranks: ranks 0-1 share KV head 0, ranks 2-3 KV head 1.
    tiny = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=4,
                       num_kv_heads=2, head_dim=2)
    assert [list(head_shard(tiny, r, 4).kv_heads) for r in range(4)] == [[0], [0], [1], [1]]


@pytest.mark.parametrize("world_size", [2, 4, 6])
def test_uneven_splits_are_refused(world_size: int) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        check_shardable(_SMOLLM2, world_size)


def test_runner_config_checks_the_tensor_parallel_size() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        RunnerConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="device type only"):
        RunnerConfig(device="cuda:1", tensor_parallel_size=2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA or ROCm devices")
def test_two_gpus_give_the_tokens_of_one(tiny_checkpoint) -> None:  # noqa: ANN001
    prompts = ["The capital of France is", "def fibonacci(n):"]

    def run(size: int) -> list[list[int]]:
        runner = RunnerConfig(device="cuda", dtype="float32", kv_cache_memory_bytes=8 << 20,
                              tensor_parallel_size=size)
        worker = Worker(WorkerConfig(worker_id=f"gpu{size}", runner=runner), tiny_checkpoint)
        worker.start()
        try:
            return [[t for o in _collect(worker, text) for t in o.token_ids] for text in prompts]
        finally:
            worker.stop()
    assert run(2) == run(1)


def _collect(worker: Worker, text: str) -> list[RequestOutput]:
    import asyncio

    async def collect() -> list[RequestOutput]:
        return [o async for o in worker.async_engine.generate(worker.tokenizer.encode(text),
                                                               SamplingOptions(8, temperature=0))]
    return asyncio.run(collect())
