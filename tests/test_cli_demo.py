"""`qwen3vl-ray demo` end to end, on an embedded Ray (the service) and on one in-process engine: the tiny
checkpoint is generated on first use, the sample batch runs cold then warm (and, on the service, once more
after its workers restart), the chat runs, and the summary shows reuse: warm faster than cold, vision-cache
hits, the workers' device tier in the store table, host and disk serving the restarted workers. The
service demo's dashboard answers while the demo runs (``--keep-alive`` holds it until Ctrl-C) and is gone after."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]


def _answers(url: str) -> bool:
    """True if an HTTP server answers at ``url`` (any status: the dashboard may ask for a token)."""
    try:
        urllib.request.urlopen(url, timeout=10).close()
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True


def _run_demo(tmp_path: Path, runner: str) -> tuple[dict, str, Path]:
    """Runs the demo (the service one with --keep-alive: its dashboard is checked while it waits, then it gets
    Ctrl-C); returns the JSON summary, stdout and the stderr file."""
    # no QWEN3VL_RAY_DISK_DIR: the demo gives its disk tier a fresh directory of its own
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "QWEN3VL_RAY_DISK_DIR")}
    env.update(QWEN3VL_RAY_CHECKPOINT_DIR=str(tmp_path / "ckpt"), QWEN3VL_RAY_MAX_NEW_TOKENS="4")
    cmd = [sys.executable, "-m", "jobs.cli", "demo", "--json", "--runner", runner]
    err = tmp_path / "stderr.txt"
    if runner != "service":
        with open(err, "w") as f:
            r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=f, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + err.read_text()[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1]), r.stdout, err
    # Ctrl-C as in a terminal: a suite run as a background job of a non-interactive shell (nohup ... &) has SIGINT
    # ignored, the demo would inherit that, and Python installs no KeyboardInterrupt handler for an ignored SIGINT
    outer = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        with open(err, "w") as f:  # the child keeps its own copy of the descriptor
            p = subprocess.Popen(cmd + ["--keep-alive"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
    finally:
        signal.signal(signal.SIGINT, outer)
    try:
        lines = []
        for line in p.stdout:  # the JSON summary is the last line before the demo waits
            lines.append(line)
            if line.startswith("{"):
                break
        assert lines and lines[-1].startswith("{"), "".join(lines)[-2000:] + err.read_text()[-2000:]
        summary = json.loads(lines[-1])
        url = summary["dashboard"]
        assert url.startswith("http") and _answers(url)  # up while the demo waits
        assert p.poll() is None  # --keep-alive: still running after the summary
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=120) == 0, err.read_text()[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    deadline = time.monotonic() + 30
    while _answers(url) and time.monotonic() < deadline:  # the embedded Ray's dashboard stops with it
        time.sleep(1)
    assert not _answers(url)
    return summary, "".join(lines), err


@pytest.mark.parametrize("runner", ["service", "engine"])
def test_demo(tmp_path, runner):
    summary, stdout, _ = _run_demo(tmp_path, runner)
    assert (tmp_path / "ckpt" / "tiny" / "config.json").is_file()  # generated on first use
    # the disk tier had a fresh directory, so the first pass was cold; it is removed at the end
    assert summary["fresh_disk_dir"] and not os.path.exists(summary["disk_dir"])
    cold, warm = summary["cold"], summary["warm"]
    assert cold["rows"] == warm["rows"] == 8 and cold["errors"] == warm["errors"] == 0
    # the second pass is served from the store: more of each prompt is cached than on the first
    assert warm["cached_tokens"] > cold["cached_tokens"] > 0
    assert warm["cached_ratio"] is not None and warm["cached_ratio"] > 0.5, warm
    assert sum(warm["cached_tokens_by_tier"].values()) > 0
    # images seen earlier in the batch skip the vision encoder (4 of the cold pass's images are repeats)
    assert cold["vision_cache_hits"] > 0
    # the chat's later turns reuse the earlier turns' KV
    chat = summary["chat"]
    assert len(chat) == 3 and all(t["error"] is None for t in chat)
    assert chat[1]["cached_tokens"] > 0 and chat[2]["cached_tokens"] > 0
    if runner == "service":
        # warm is faster than cold (medians over the 8 rows: the warm pass computes one token per prompt)
        assert warm["ttft_median_s"] < cold["ttft_median_s"], (cold, warm)
        assert warm["cached_tokens_by_tier"].get("device", 0) > 0
        # after the workers restart (empty device tiers) the node agent's host and disk tiers serve the KV
        restart = summary["restart"]
        assert restart["errors"] == 0 and restart["cached_tokens"] > cold["cached_tokens"]
        assert restart["cached_tokens_by_tier"].get("host", 0) + restart["cached_tokens_by_tier"].get("disk", 0) > 0
        # the workers' own device tier, from the workers: entries, real bytes, hits; and its row in the table
        [device] = summary["store"]["devices"].values()
        assert device["entries"] > 0 and device["used"] > 0 and device["hits"] > 0 and device["bytes_written"] > 0
        assert any(line.startswith("device @") for line in stdout.splitlines())
        assert "--keep-alive" in stdout or "until Ctrl-C" in stdout
    else:  # one in-process engine: its store's three tiers all took entries (the demo's tiers are small)
        tiers = {t["name"]: t for t in summary["store"]["store"]["tiers"]}
        assert all(tiers[name]["puts"] + tiers[name].get("demotions_in", 0) > 0 for name in ("device", "host", "disk"))
    for line in ("TTFT", "cached-token ratio", "dashboard:"):
        assert line in stdout
