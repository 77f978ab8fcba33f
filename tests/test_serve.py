"""``qwen3vl-ray serve``: the OpenAI endpoint on Ray Serve LLM + vLLM with the KV connector on the node agents, and
its request router (``actors.prefix_router``).

The router's choice is tested without Ray against the project's own ``Directory``; its keys against vLLM's block
hashes; the whole endpoint on an embedded Ray (``jobs.serve.start``, what the command runs), with real HTTP;
the command's one-line errors through the CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from actors.directory import Directory
from actors.prefix_router import PrefixRouterConfig, PrefixRouting, held_by_node, rank_replicas
from qwen3vl_ray.keys import CacheKey, Namespace, content_key

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32
NS = {"model": "m", "dtype": "float32", "layout": "test", "codec": "none", "tenant": "default"}
# several blocks of system prompt: what a second request finds on the node that served the first
SYSTEM = "You are a careful assistant who answers in one short sentence. " * 8


@dataclass(frozen=True)
class Replica:
    name: str
    node_id: str


def node_of(r: Replica) -> str:
    return r.node_id


def keys(n: int, tag: str = "p") -> list[CacheKey]:
    return [content_key(Namespace(**NS), "test", f"{tag}{i}".encode()) for i in range(n)]


# -- the choice, without Ray --------------------------------------------------------------------------------

def test_held_prefix_ends_at_the_first_block_held_nowhere():
    # blocks 0-1 on A, 2 on B, 3 nowhere, 4 on A again: block 4 is useless without block 3
    assert held_by_node(["A", "A", "B", None, "A"]) == {"A": 2, "B": 1}
    assert held_by_node([None, "A"]) == {}


def test_ranks_put_the_node_holding_most_first_then_other_holders_then_two_random_others():
    a1, a2, b, c, d, e = (Replica("a1", "A"), Replica("a2", "A"), Replica("b", "B"), Replica("c", "C"),
                          Replica("d", "D"), Replica("e", "E"))
    ranks = rank_replicas({"A": 3, "B": 1}, [c, a1, b, d, a2, e], node_of)
    assert ranks[:2] == [[a1, a2], [b]]
    # the last rank: power of two choices among the replicas off the holding nodes
    assert len(ranks) == 3 and len(ranks[2]) == 2 and set(ranks[2]) <= {c, d, e}
    # a node below min_blocks is not preferred; a holding node with no replica is skipped
    assert rank_replicas({"A": 1, "Z": 9}, [a1, b], node_of, min_blocks=2)[0] in ([a1, b], [b, a1])
    # nothing held: load balancing only
    assert len(rank_replicas({}, [a1, b, c], node_of)) == 1


def _routing(directory: Directory, prompt_keys: list[CacheKey], fail: Exception | None = None,
             delay_s: float = 0.0) -> PrefixRouting:
    async def lookup(ks):
        await asyncio.sleep(delay_s)
        if fail is not None:
            raise fail
        return directory.get_many(ks)

    config = PrefixRouterConfig(model_path="unused", block_size=BLOCK, namespace=NS, lookup_timeout_s=0.2)
    return PrefixRouting(lambda body: prompt_keys, lookup, config)


def test_routing_follows_the_directory_and_degrades_to_load_balancing():
    a, b = Replica("a", "A"), Replica("b", "B")
    prompt = keys(4)
    directory = Directory()
    # B's replica stored the first 3 blocks (its agent holds them); A holds only an unrelated prompt's blocks
    directory.set_many("B", prompt[:3], "host")
    directory.set_many("A", keys(8, tag="other"), "host")
    ranks = asyncio.run(_routing(directory, prompt).rank({"messages": []}, [a, b], node_of))
    assert ranks == [[b], [a]]
    # B's agent restarted and its host tier is gone; A's agent got blocks 0-1 meanwhile (another replica stored them)
    directory.forget_node("B")
    directory.set_many("A", prompt[:2], "disk")
    assert asyncio.run(_routing(directory, prompt).rank({}, [a, b], node_of))[0] == [a]
    # the coordinator fails or is slow: two random replicas, never an error
    for routing in (_routing(directory, prompt, fail=RuntimeError("coordinator gone")),
                    _routing(directory, prompt, delay_s=5.0)):
        ranks = asyncio.run(routing.rank({}, [a, b], node_of))
        assert len(ranks) == 1 and set(ranks[0]) == {a, b}


def test_router_config_refuses_a_per_process_hash_seed(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    with pytest.raises(ValueError, match="xxhash"):
        PrefixRouterConfig(model_path="m", block_size=BLOCK, namespace=NS, hash_algo="xxhash")


# -- the keys against vLLM ------------------------------------------------------------------------------------

@pytest.mark.vllm
def test_prompt_keys_are_vllms_block_hashes_under_the_namespace_up_to_the_first_image(tmp_path):
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils

    from actors.prefix_router import PromptKeys
    from qwen3vl_ray.engine.checkpoint import make_checkpoint
    from qwen3vl_ray.serving.block_keys import block_keys

    model = str(make_checkpoint("tiny", tmp_path / "tiny"))
    pk = PromptKeys(PrefixRouterConfig(model_path=model, block_size=BLOCK, namespace=NS))
    ids = list(range(3 * BLOCK + 5))
    kv_cache_utils.init_none_hash(sha256)  # what an engine does at start-up (sha256: a fixed seed)
    expected, parent = [], None
    for b in range(3):
        parent = kv_cache_utils.hash_block_tokens(sha256, parent, ids[b * BLOCK:(b + 1) * BLOCK],
                                                  (("cache_salt", "s"),) if b == 0 else None)
        expected.append(parent)
    assert pk.keys(ids, cache_salt="s") == block_keys(Namespace(**NS), expected)

    # an image ends the routed prefix: only the text before it is rendered into keys
    @dataclass
    class Chat:
        messages: list

    text = [{"role": "system", "content": SYSTEM}]
    with_image = text + [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}},
                                                      {"type": "text", "text": "What is it?"}]}]
    before_image = pk.token_ids(Chat(with_image))
    assert len(before_image) > 2 * BLOCK and pk.tokenizer.decode(before_image).startswith("<|im_start|>system")
    assert pk.token_ids(Chat(with_image + [{"role": "user", "content": "more"}])) == before_image


# -- the endpoint ---------------------------------------------------------------------------------------------

def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.ray
def test_serve_answers_openai_chat_over_http_with_cached_tokens_and_routes_by_the_directory(tmp_path, monkeypatch):
    import ray
    from ray import serve

    from actors.config import NAMESPACE
    from actors.coordinator import coordinator_name
    from actors.prefix_router import PromptKeys
    from actors.tenancy import Tenant, with_tenant
    from jobs.serve import start
    from qwen3vl_ray import settings as S
    from tests.ray_head import free_ports

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # an embedded Ray, started by `start` as the command does
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    s = S.resolve({"checkpoint_dir": str(tmp_path / "ckpt"), "disk_dir": str(tmp_path / "disk"),
                   "host_bytes": "16MiB", "disk_bytes": 0, "num_workers": 1}, env={})
    try:
        config = start(s, port=free_ports(["http"])["http"])
        url = config.url

        # A real OpenAI chat completion, then the same long prompt again.
        body = {"model": "tiny", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say hello."}]}
        first = _post(url + "/chat/completions", body)
        assert first["object"] == "chat.completion" and first["model"] == "tiny"
        [choice] = first["choices"]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        usage = first["usage"]
        assert usage["completion_tokens"] == 4 and usage["prompt_tokens"] > 2 * BLOCK
        second = _post(url + "/chat/completions", body)
        full_blocks = (usage["prompt_tokens"] - 1) // BLOCK  # one token is always left to compute
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= full_blocks * BLOCK > 0
        assert second["choices"][0]["message"]["content"] == choice["message"]["content"]  # greedy

        # The connector stored every full block on the agents, under the keys the router computes: the directory
        # places the prompt's blocks on this node, and the router ranks a replica here first.
        prompt_keys = PromptKeys(PrefixRouterConfig(**config.router)).for_request(type("Chat", (), body)())
        assert len(prompt_keys) == usage["prompt_tokens"] // BLOCK
        coordinator = with_tenant(ray.get_actor(coordinator_name(), namespace=NAMESPACE), Tenant())
        node = ray.get_runtime_context().get_node_id()
        held = ray.get(coordinator.lookup.remote(prompt_keys[:full_blocks]), timeout=60)
        assert [loc[0] for loc in held] == [node] * full_blocks

        async def lookup(ks):
            return await coordinator.lookup.remote(ks)

        routing = PrefixRouting(lambda b: prompt_keys, lookup, PrefixRouterConfig(**config.router))
        here, elsewhere = Replica("here", node), Replica("elsewhere", "another-node")
        assert asyncio.run(routing.rank(body, [elsewhere, here], node_of)) == [[here], [elsewhere]]

        # The deployed router ran in the ingress (its line in Serve's logs) and never fell back.
        logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path(), "serve")
        serve_logs = "".join(p.read_text(errors="replace") for p in logs.glob("*.log"))
        assert "prefix router ready" in serve_logs
        assert "load-balancing instead" not in serve_logs
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()


def test_serve_refuses_no_replica_and_a_bad_model_in_one_line_before_ray_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN3VL_RAY_") and k != "RAY_ADDRESS"}
    (tmp_path / "empty").mkdir()
    for args, words in ((["--num-workers", "0"], "--num-workers must be > 0"),
                        (["--model", str(tmp_path / "empty")], "no config.json")):
        r = subprocess.run([sys.executable, "-m", "jobs.cli", "serve", *args], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
        assert words in lines[0] and "Ray" not in r.stdout
