"""Every panel of the Grafana dashboard's first row has data after two jobs: ``jobs.infer`` runs the sample batch
twice (cold, then warm) through the service on an embedded Ray with a Prometheus port, a scraper reads the
endpoint every half second meanwhile, and every panel query of the row "Tiers, service and jobs" of
``dashboards/grafana_qwen3vl_ray.json`` is evaluated over the scraped series with ``tests/promql.py`` (which
refuses PromQL it does not implement).

Each row of the dashboard is proven by the test that produces its series (``ROWS``): the row "vLLM on the tiers"
(vLLM's own metrics and the KV connector's) by ``tests/test_metrics_dashboard_vllm.py``, on a real endpoint."""

import json
import math
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.promql import Store, evaluate

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "grafana_qwen3vl_ray.json"
# every row of the dashboard -> the test that evaluates its panels
ROWS = {"Tiers, service and jobs": "tests/test_metrics_dashboard.py",
        "vLLM on the tiers": "tests/test_metrics_dashboard_vllm.py"}


def dashboard_rows() -> dict[str, list[dict]]:
    """The dashboard's panels by row: a panel belongs to the row above it (Grafana's rule for open rows)."""
    rows: dict[str, list[dict]] = {}
    current = None
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            current = rows.setdefault(panel["title"], [])
            assert not panel.get("collapsed") and not panel["targets"], panel["title"]  # no query hides in a row
        else:
            assert current is not None, f"panel {panel['title']!r} sits above every row"
            current.append(panel)
    return rows


def queries_without_data(panels: list[dict], store: Store) -> list[tuple]:
    """(title, refId, query, value) of every query of ``panels`` with no finite value over ``store``."""
    empty = []
    for panel in panels:
        for target in panel["targets"]:
            expr = target["expr"].replace("$session", ".*")
            value = evaluate(expr, store)
            values = [value] if isinstance(value, float) else list(value.values())
            if not any(math.isfinite(v) for v in values):
                empty.append((panel["title"], target["refId"], expr, value))
    return empty


def test_every_dashboard_row_is_evaluated_by_a_test_and_every_panel_sits_in_a_row():
    rows = dashboard_rows()
    assert list(rows) == list(ROWS)
    assert all(rows.values()), rows
    for title, test_file in ROWS.items():
        assert (ROOT / test_file).exists() and f'dashboard_rows()["{title}"]' in (ROOT / test_file).read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # free on every address (Ray listens on the node's own one)
        return s.getsockname()[1]


class Scraper(threading.Thread):
    """Scrapes the endpoint into a promql.Store every ``period_s`` until stopped (Prometheus does the same
    every 15 s; counters need two samples for rate())."""

    def __init__(self, url: str, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.url, self.period_s = url, period_s
        self.store, self.lock, self.stop = Store(), threading.Lock(), threading.Event()
        self.scrapes, self.last_text = 0, ""

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                text = urllib.request.urlopen(self.url, timeout=5).read().decode()
            except OSError:
                text = None  # the agent starts its endpoint a little after ray.init returns
            if text is not None:
                with self.lock:
                    self.store.add_scrape(time.time(), text)
                    self.scrapes += 1
                    self.last_text = text
            self.stop.wait(self.period_s)

    def total(self, name: str, **match: str) -> float:
        """Sum of ``name``'s series in the latest scrape (labels matching ``match``)."""
        with self.lock:
            vec = evaluate(name + "{" + ",".join(f'{k}="{v}"' for k, v in match.items()) + "}", self.store)
        return sum(vec.values())


@pytest.fixture(scope="module")
def embedded_ray(tmp_path_factory):
    """An embedded Ray as ``jobs.infer`` starts it (the repository on the workers' path, the service's
    namespace), with a Prometheus port and a 1 s metrics export interval (Ray's default is 10 s) so the test
    needs seconds, not minutes, of scraping."""
    import ray

    from actors.config import NAMESPACE

    port = _free_port()
    ray.init(address="local", namespace=NAMESPACE, include_dashboard=False, _metrics_export_port=port,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
             _system_config={"metrics_report_interval_ms": 1000})
    try:
        yield port
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_every_panel_of_the_tiers_row_has_data_after_two_jobs(embedded_ray, tmp_path, monkeypatch):
    from jobs import infer
    from jobs.metrics import JobMetrics
    from qwen3vl_ray import settings as S

    shutil.copytree(ROOT / "jobs" / "data" / "images", tmp_path / "images")
    shutil.copy(ROOT / "jobs" / "data" / "prompts.jsonl", tmp_path / "in.jsonl")
    n_rows = sum(1 for line in (tmp_path / "in.jsonl").read_text().splitlines() if line.strip())
    # small chunks and a device tier of a few chunks: the warm pass is served by the device and host tiers
    settings = S.resolve({"model": "tiny", "checkpoint_dir": str(tmp_path / "ckpt"), "disk_dir": str(tmp_path / "disk"),
                          "chunk_tokens": 32, "block_bytes": "64KiB", "device_bytes": "512KiB", "host_bytes": "64MiB",
                          "disk_bytes": "128MiB", "num_workers": 1, "batch_size": 2, "max_new_tokens": 3}, env={})
    flushes: list[float] = []
    flush = JobMetrics.flush

    def timed_flush(self):
        t0 = time.perf_counter()
        flush(self)
        flushes.append(time.perf_counter() - t0)

    monkeypatch.setattr(JobMetrics, "flush", timed_flush)

    scraper = Scraper(f"http://127.0.0.1:{embedded_ray}/metrics")
    scraper.start()

    def wait_until(done, what: str) -> None:
        deadline = time.time() + 60
        while not done():
            assert time.time() < deadline, f"{what} never reached the endpoint"
            time.sleep(0.5)

    def served_tokens() -> float:
        return scraper.total("ray_qwen3vl_ray_hits_total") + scraper.total("ray_qwen3vl_ray_misses_total")

    try:
        for name in ("cold", "warm"):
            job = f"{name}.parquet"
            summary = infer.run(str(tmp_path / "in.jsonl"), str(tmp_path / job), settings,
                                runner="service", progress=False)
            assert summary["rows_run"] == n_rows and summary["errors_run"] == 0, summary
            # every value of this job has been scraped before the next job starts. rate() is taken from the
            # change between samples: had both jobs run within one export interval (or before the agent's
            # endpoint came up, as on a loaded machine), every series would first appear at its final value,
            # every rate would be 0 and the ratio panels 0/0.
            rows = n_rows if name == "cold" else 2 * n_rows
            wait_until(lambda: (scraper.total("ray_qwen3vl_ray_job_rows_total", job=job) == n_rows
                                and scraper.total("ray_qwen3vl_ray_job_ttft_seconds_count", job=job) == n_rows
                                and scraper.total("ray_qwen3vl_ray_ttft_seconds_count") == rows
                                and scraper.total("ray_qwen3vl_ray_cached_token_ratio_count") == rows
                                and served_tokens() == scraper.total("ray_qwen3vl_ray_job_prompt_tokens_total")),
                       f"the {name} job's metrics")
        assert summary["cached_tokens"] > 0  # the warm pass reused the cold pass's prefixes
        seen = scraper.scrapes
        while scraper.scrapes < seen + 2:  # two more samples of every final value
            time.sleep(0.2)
    finally:
        scraper.stop.set()
        scraper.join()

    # no stall at the end of a job: the job waits only for its last record call to reach the sink
    assert len(flushes) == 2 and max(flushes) < 5.0, flushes
    store = scraper.store
    # hits and misses in tokens, as the rows count them: the cold pass missed whole prompts, the warm one hit
    misses = evaluate("sum(ray_qwen3vl_ray_misses_total)", store)[()]
    hits = evaluate("sum by (tier) (ray_qwen3vl_ray_hits_total)", store)
    cached = evaluate("sum(ray_qwen3vl_ray_job_cached_tokens_total)", store)[()]
    prompt = evaluate("sum(ray_qwen3vl_ray_job_prompt_tokens_total)", store)[()]
    assert sum(hits.values()) == cached and sum(hits.values()) + misses == prompt, (hits, misses, cached, prompt)
    assert hits.get((("tier", "device"),), 0) > 0, hits
    for gauge in ("bytes_used", "bytes_budget", "entries"):
        assert evaluate(f'sum(ray_qwen3vl_ray_{gauge}{{tier="device"}})', store)[()] > 0, gauge

    empty = queries_without_data(dashboard_rows()["Tiers, service and jobs"], store)
    assert not empty, "panel queries without data:\n" + "\n".join(map(str, empty)) + "\n\n" + "\n".join(
        line for line in scraper.last_text.splitlines() if "qwen3vl" in line and not line.startswith("#"))
