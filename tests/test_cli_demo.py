"""`qwen3vl-ray demo` end to end, on an embedded Ray (the service) and on one in-process engine: the tiny
checkpoint is generated on first use, the sample batch runs cold then warm, the chat runs, and the summary
shows reuse."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("runner", ["service", "engine"])
def test_demo(tmp_path, runner):
    env = {**os.environ, "QWEN3VL_RAY_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
           "QWEN3VL_RAY_DISK_DIR": str(tmp_path / "disk"), "QWEN3VL_RAY_MAX_NEW_TOKENS": "4"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--json", "--runner", runner], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert (tmp_path / "ckpt" / "tiny" / "config.json").is_file()  # generated on first use
    cold, warm = summary["cold"], summary["warm"]
    assert cold["rows"] == warm["rows"] == 8 and cold["errors"] == warm["errors"] == 0
    # the second pass is served from the store: more of each prompt is cached than on the first
    assert warm["cached_tokens"] > cold["cached_tokens"] > 0
    assert warm["cached_ratio"] is not None and warm["cached_ratio"] > 0.5, warm
    assert sum(warm["cached_tokens_by_tier"].values()) > 0
    # the chat's later turns reuse the earlier turns' KV
    chat = summary["chat"]
    assert len(chat) == 3 and all(t["error"] is None for t in chat)
    assert chat[1]["cached_tokens"] > 0 and chat[2]["cached_tokens"] > 0
    if runner == "service":  # embedded Ray: the summary says where its dashboard is
        assert summary["dashboard"].startswith("http")
    else:  # one in-process engine: its store's three tiers all took entries (the demo's tiers are small)
        tiers = {t["name"]: t for t in summary["store"]["store"]["tiers"]}
        assert all(tiers[name]["puts"] + tiers[name].get("demotions_in", 0) > 0 for name in ("device", "host", "disk"))
    for line in ("TTFT", "cached-token ratio", "dashboard:"):
        assert line in r.stdout
