"""One vLLM engine process, as a user runs it: ``python tests/vllm_driver.py SPEC.json`` prints one JSON line.

The spec names the checkpoint, the KV connector's options (``connector``; ``null``: without it), the
encoder-cache connector's (``encoder_cache``; absent: without it) and conversations; each
conversation's turns run in order, every turn resending the history with the engine's own previous answers.
Images are PNG files. ``reset`` empties vLLM's own prefix cache before every turn, so whatever a turn finds
cached came from the connector. Output: per conversation, per turn, the greedy token ids and vLLM's
``num_cached_tokens``; and the connector store's counters (blocks looked up, loaded per tier, failed, saved);
with ``"metrics": true``, the ``vllm:`` counters of vLLM's stat loggers for external hits and the connector.

Other keys: ``batch`` (text prompts generated together, after the conversations: requests that compete for
KV blocks), ``num_gpu_blocks`` and ``max_model_len`` (a small paged KV, so vLLM preempts), ``max_tokens``,
``ignore_eos`` (every request generates ``max_tokens``),
and ``remove_disk_files_after_lookup`` (a fault: the disk tier's files disappear between the connector's lookup
and its load, as when an operator wipes the cache directory under a running engine).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: starts in seconds
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB


def run_spec(spec: dict) -> dict:
    """Run the spec in this process (see the module docstring); the result that ``main`` prints."""
    from PIL import Image
    from vllm import LLM, SamplingParams

    from qwen3vl_ray.serving.connector_config import ec_transfer_config, kv_transfer_config

    kwargs = {}
    if spec.get("num_gpu_blocks") is not None:
        kwargs["num_gpu_blocks_override"] = spec["num_gpu_blocks"]
    if spec.get("remove_disk_files_after_lookup"):
        _remove_disk_files_after_lookup(spec["connector"]["disk_dir"])
    if spec.get("connector") is not None:
        kwargs["kv_transfer_config"] = kv_transfer_config(**spec["connector"])
    if spec.get("encoder_cache") is not None:
        kwargs["ec_transfer_config"] = ec_transfer_config(**spec["encoder_cache"])
    llm = LLM(model=spec["model"], enforce_eager=True, max_model_len=spec.get("max_model_len", 4096), dtype="float32",
              block_size=spec.get("block_size", 32), seed=0,
              # images only: vLLM sizes encoder outputs from dummy videos too, which transformers 5.25's video
              # processor refuses for the tiny checkpoint
              limit_mm_per_prompt={"image": 4, "video": 0}, disable_log_stats=not spec.get("metrics", False), **kwargs)
    sampling = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 8),
                              ignore_eos=spec.get("ignore_eos", False))
    results = []
    for conversation in spec["conversations"]:
        history, turns = [], []
        for turn in conversation:
            content = [{"type": "image_pil", "image_pil": Image.open(p).convert("RGB")} for p in turn.get("images", [])]
            content.append({"type": "text", "text": turn["text"]})
            history.append({"role": "user", "content": content})
            if spec.get("reset", False):
                llm.reset_prefix_cache()
            out = llm.chat([history], sampling, use_tqdm=False)[0]
            answer = out.outputs[0]
            turns.append({"tokens": list(answer.token_ids), "cached": out.num_cached_tokens,
                          "prompt": len(out.prompt_token_ids)})
            history.append({"role": "assistant", "content": answer.text})
        results.append(turns)
    batch = []
    if spec.get("batch"):
        for out in llm.generate(spec["batch"], sampling, use_tqdm=False):
            batch.append({"tokens": list(out.outputs[0].token_ids), "cached": out.num_cached_tokens,
                          "prompt": len(out.prompt_token_ids)})
    from dataclasses import asdict

    from qwen3vl_ray.serving.block_store import open_stores
    from qwen3vl_ray.serving.block_transfers import drain_all

    drain_all(timeout=60)  # the last step's saves run on the transfer thread: count them too
    out = {"turns": results, "batch": batch, "store": [asdict(store.counters) for store in open_stores()]}
    if "connector" in spec and spec["connector"] is not None:  # one stored block's bytes: every layer's K and V
        cfg = llm.llm_engine.model_config.hf_config.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4  # fp32
        out["block_nbytes"] = per_token * spec.get("block_size", 32)
    if spec.get("metrics", False):  # vLLM's own counters and the connector's, as its stat loggers export them
        out["metrics"] = {}
        for m in llm.get_metrics():
            if m.name.startswith(("vllm:qwen3vl_ray_", "vllm:external_prefix_cache", "vllm:num_preemptions")) \
                    and hasattr(m, "value"):
                name = m.name + ("{tier=%s}" % m.labels["tier"] if "tier" in m.labels else "")
                out["metrics"][name] = out["metrics"].get(name, 0) + m.value
    return out


def _remove_disk_files_after_lookup(disk_dir: str) -> None:
    """The fault of ``remove_disk_files_after_lookup``: every lookup that finds blocks deletes the disk tier's
    block files before vLLM asks for the load."""
    from pathlib import Path

    from qwen3vl_ray.serving.kv_connector import TierKVConnector

    lookup = TierKVConnector.get_num_new_matched_tokens

    def lookup_then_lose_files(self, request, num_computed_tokens):
        found = lookup(self, request, num_computed_tokens)
        if found[0]:
            for f in Path(disk_dir).rglob("*"):
                if f.is_file() and f.stat().st_size > 4096:  # block files, not the directory's own markers
                    f.unlink()
        return found

    TierKVConnector.get_num_new_matched_tokens = lookup_then_lose_files


def main(spec_path: str) -> int:
    print("RESULT " + json.dumps(run_spec(json.loads(open(spec_path).read()))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
