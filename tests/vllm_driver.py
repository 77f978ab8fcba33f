"""One vLLM engine process, as a user runs it: ``python tests/vllm_driver.py SPEC.json`` prints one JSON line.

The spec names the checkpoint, the KV connector's options (``connector``; ``null``: without it), the
encoder-cache connector's (``encoder_cache``; absent: without it) and conversations; each
conversation's turns run in order, every turn resending the history with the engine's own previous answers.
Images are PNG files. ``reset`` empties vLLM's own prefix cache before every turn, so whatever a turn finds
cached came from the connector. Output: per conversation, per turn, the greedy token ids and vLLM's
``num_cached_tokens``; and the connector store's counters (blocks looked up, loaded per tier, failed, saved);
with ``"metrics": true``, the ``vllm:`` counters of vLLM's stat loggers for external hits and the connector.
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
    if spec.get("connector") is not None:
        kwargs["kv_transfer_config"] = kv_transfer_config(**spec["connector"])
    if spec.get("encoder_cache") is not None:
        kwargs["ec_transfer_config"] = ec_transfer_config(**spec["encoder_cache"])
    llm = LLM(model=spec["model"], enforce_eager=True, max_model_len=4096, dtype="float32",
              block_size=spec.get("block_size", 32), seed=0,
              # images only: vLLM sizes encoder outputs from dummy videos too, which transformers 5.25's video
              # processor refuses for the tiny checkpoint
              limit_mm_per_prompt={"image": 4, "video": 0}, disable_log_stats=not spec.get("metrics", False), **kwargs)
    sampling = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 8))
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
    from dataclasses import asdict

    from qwen3vl_ray.serving.block_store import open_stores

    out = {"turns": results, "store": [asdict(store.counters) for store in open_stores()]}
    if "connector" in spec and spec["connector"] is not None:  # one stored block's bytes: every layer's K and V
        cfg = llm.llm_engine.model_config.hf_config.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4  # fp32
        out["block_nbytes"] = per_token * spec.get("block_size", 32)
    if spec.get("metrics", False):  # vLLM's own counters and the connector's, as its stat loggers export them
        out["metrics"] = {}
        for m in llm.get_metrics():
            if m.name.startswith(("vllm:qwen3vl_ray_", "vllm:external_prefix_cache")) and hasattr(m, "value"):
                name = m.name + ("{tier=%s}" % m.labels["tier"] if "tier" in m.labels else "")
                out["metrics"][name] = out["metrics"].get(name, 0) + m.value
    return out


def main(spec_path: str) -> int:
    print("RESULT " + json.dumps(run_spec(json.loads(open(spec_path).read()))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
