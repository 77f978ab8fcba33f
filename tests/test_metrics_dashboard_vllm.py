"""Every panel of the dashboard's row "vLLM on the tiers" has data on a real ``qwen3vl-ray serve`` endpoint.

``jobs.serve.start`` (what the command runs) deploys one vLLM replica with the KV connector on an embedded Ray that
has a Prometheus port; a scraper reads the endpoint every half second while OpenAI chat requests go through HTTP.
Under Ray Serve LLM (and Ray Data LLM) vLLM's stat loggers write Ray metrics: ``vllm:prefix_cache_hits`` is
exported as ``ray_vllm_prefix_cache_hits_total``, the connector's ``vllm:qwen3vl_ray_loaded_tokens`` as
``ray_vllm_qwen3vl_ray_loaded_tokens_total`` (``:`` becomes ``_``, Ray adds ``ray_`` and ``_total``). Ray exports a
counter only from its first non-zero increment, and ``rate()`` needs it to grow after that, so the requests
below make every counter of the row grow twice: two rounds of local hits, loads and saves, then a failed load.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from tests.promql import evaluate
from tests.test_metrics_dashboard import Scraper, _free_port, dashboard_rows, queries_without_data

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.ray]

BLOCK = 32
SYSTEM_A = "You are a careful assistant who answers in one short sentence. " * 8
SYSTEM_B = "You are a terse assistant who never uses more than five words. " * 8


def _chat(url: str, system: str) -> dict:
    body = {"model": "tiny", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Say hello."}]}
    req = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _corrupt_disk_blocks(disk_dir: Path) -> int:
    """Flip bytes in the middle of every block file of the agents' disk tier; returns how many."""
    files = [p for p in disk_dir.rglob("*") if p.is_file() and p.stat().st_size > 4096]
    for f in files:
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        f.write_bytes(bytes(data))
    return len(files)


def test_every_panel_of_the_vllm_row_has_data_on_a_served_endpoint(tmp_path, monkeypatch):
    import ray
    from ray import serve

    from actors.service import attach_ray
    from jobs.serve import APP_NAME, start
    from qwen3vl_ray import settings as S
    from tests.ray_head import free_ports

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    metrics_port = _free_port()
    # the embedded Ray `serve` starts (attach_ray), with a Prometheus port and a 1 s export interval (Ray's default
    # is 10 s) so the test scrapes for seconds, not minutes
    attach_ray("local", include_dashboard=False, _metrics_export_port=metrics_port,
               _system_config={"metrics_report_interval_ms": 1000})
    # a host tier of a few blocks over a disk tier: the prompt's blocks land on disk, where the test can corrupt them
    s = S.resolve({"checkpoint_dir": str(tmp_path / "ckpt"), "disk_dir": str(tmp_path / "disk"),
                   "host_bytes": "96KiB", "block_bytes": "32KiB", "disk_bytes": "16MiB", "num_workers": 1}, env={})
    scraper = Scraper(f"http://127.0.0.1:{metrics_port}/metrics")
    scraper.start()
    try:
        url = start(s, port=free_ports(["http"])["http"]).url
        [server] = [name for name in serve.status().applications[APP_NAME].deployments if "LLMServer" in name]
        engine = serve.get_deployment_handle(server, app_name=APP_NAME)

        def from_the_tiers(system: str) -> dict:
            # vLLM's own prefix cache emptied: what the prompt finds cached now comes from the connector's loads
            engine.reset_prefix_cache.remote().result(timeout_s=60)
            return _chat(url, system)

        def exported(requests: int, **at_least: float) -> None:
            """Wait until the endpoint shows ``requests`` TTFTs and each counter ``ray_vllm_<name>_total`` at
            least at its value: the requests take less than Ray's export interval, and a counter must be seen
            before it grows for rate() to see it grow."""
            def seen() -> dict[str, float]:
                return {"requests": scraper.total("ray_vllm_time_to_first_token_seconds_count"),
                        **{name: scraper.total(f"ray_vllm_{name}_total") for name in at_least}}

            def done(now: dict[str, float]) -> bool:
                return now["requests"] == requests and all(now[k] >= v for k, v in at_least.items())

            deadline = time.time() + 60
            while not done(now := seen()):
                assert time.time() < deadline, f"vLLM's metrics never reached {requests} requests, {at_least}: {now}"
                time.sleep(0.5)
            scrapes = scraper.scrapes
            while scraper.scrapes < scrapes + 2:  # two samples of these values
                time.sleep(0.2)

        def cached(r: dict) -> int:
            return r["usage"]["prompt_tokens_details"]["cached_tokens"]

        # 1. cold, then vLLM's own cache, then the tiers (vLLM's cache emptied)
        cold = _chat(url, SYSTEM_A)
        full = (cold["usage"]["prompt_tokens"] - 1) // BLOCK * BLOCK  # one token is always left to compute
        assert cached(cold) == 0 and full >= 2 * BLOCK
        first = [_chat(url, SYSTEM_A), from_the_tiers(SYSTEM_A)]
        assert [cached(r) for r in first] == [full, full]
        answers = [r["choices"][0]["message"]["content"] for r in [cold, *first]]
        exported(3, prefix_cache_hits=full, external_prefix_cache_hits=full, qwen3vl_ray_loaded_tokens=full,
                 qwen3vl_ray_saved_tokens=full)
        # 2. the same again, and a new prompt: every counter grows after the endpoint first showed it
        again = [_chat(url, SYSTEM_A), from_the_tiers(SYSTEM_A)]
        assert [cached(r) for r in again] == [full, full]
        answers += [r["choices"][0]["message"]["content"] for r in again]
        other = _chat(url, SYSTEM_B)
        assert cached(other) == 0
        full_other = (other["usage"]["prompt_tokens"] - 1) // BLOCK * BLOCK
        exported(6, prefix_cache_hits=2 * full, qwen3vl_ray_loaded_tokens=2 * full,
                 qwen3vl_ray_saved_tokens=full + full_other)
        # 3. every block on disk corrupt: the tiers still claim them, the loads fail, vLLM recomputes them
        assert _corrupt_disk_blocks(tmp_path / "disk") > 0, "the agents' disk tier holds no block file"
        answers.append(from_the_tiers(SYSTEM_A)["choices"][0]["message"]["content"])
        assert len(set(answers)) == 1, answers  # greedy: the same answer, cached, loaded or recomputed
        exported(7, qwen3vl_ray_load_failures=1)
    finally:
        scraper.stop.set()
        scraper.join()
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()

    store = scraper.store

    def total(name: str) -> float:
        return sum(evaluate(name, store).values())

    # vLLM's counters, in tokens: two requests hit its own cache, two found the blocks in the tiers
    assert total("ray_vllm_prefix_cache_hits_total") == 2 * full
    loaded = total("ray_vllm_qwen3vl_ray_loaded_tokens_total")
    failed = total("ray_vllm_qwen3vl_ray_load_failures_total")
    assert loaded == 2 * full and failed > 0
    # every token vLLM counted as an external hit was loaded from a tier or recomputed after a failed load
    assert total("ray_vllm_external_prefix_cache_hits_total") == loaded + BLOCK * failed
    assert total("ray_vllm_qwen3vl_ray_saved_tokens_total") >= full + full_other  # both prompts' full blocks
    assert total("ray_vllm_qwen3vl_ray_load_bytes_total") > 0 and total("ray_vllm_qwen3vl_ray_save_bytes_total") > 0

    empty = queries_without_data(dashboard_rows()["vLLM on the tiers"], store)
    assert not empty, "panel queries without data:\n" + "\n".join(map(str, empty)) + "\n\n" + "\n".join(
        line for line in scraper.last_text.splitlines() if "vllm" in line and not line.startswith("#"))
