"""Ray layer of qwen3vl-ray: one tier agent per node, a coordinator, Qwen3-VL workers.

Each module keeps its logic in a plain class that tests drive without Ray and wraps it in a thin actor:

- ``object_store_tier``: the host tier in the Ray object store (the agent ``ray.put``s, so entries outlive
  the producing worker); batches are one object (slab), reads are zero-copy then one copy out.
- ``node_agent``: ``NodeAgentLogic``/``NodeAgent``, one per alive node (hard node affinity, named by node id,
  detached, restarted): host tier + core ``DiskTier`` (per-node directory) composed by the core
  ``TieredCache``; batched put/get/contains/remove; pressure, demotion, recompression, value ranking; a
  journal of moves for the directory.
- ``directory``: key -> (node, tier), central and compact (~91 B/entry at 1 M entries).
- ``coordinator``: ``CoordinatorLogic``/``Coordinator`` (named, detached, restarted): directory sync,
  global policy pass (recompress -> demote -> evict by value), placement, admission, routing; follows
  ``ray.nodes()``; rebuilds from the agents after a restart.
- ``worker``: ``WorkerLogic``/``Worker``: device tier in process, prefix fetch from any node (cross-node hit =
  Ray object transfer), engine protocol; ``engine_adapter`` wraps the real ``Qwen3VLEngine`` (the default
  engine; its store is the device tier), ``synthetic_engine`` is the weight-free workload that tests and
  benchmarks name explicitly.
- ``service``: ``ensure_service`` (attach or embed, idempotent) and the client ``ServiceHandle``, which
  routes by longest cached prefix using keys from ``qwen3vl_ray.engine.request_keys.RequestKeyer``
  (tokenizer/processor only, configured from a worker's engine); its decisions are ``service_logic``'s
  ``ServiceLogic`` (Ray-free, over a ``ServicePort``), its Ray calls ``RayServicePort``.
- ``results`` (``RequestResult``: one shape for every request's outcome), ``errors`` (the errors a caller tells
  apart, surviving Ray as their own classes), ``engine_protocol`` (``WorkerEngine``, ``DeviceTierEngine``,
  ``EngineRun``, ``RoutingSpec``).
- ``cluster_chunks`` (find, fetch and store chunks across the agents) and ``kv_block_store`` (vLLM's KV
  connector's store on the agents).
- ``metrics``: ``qwen3vl_ray_*`` metrics tagged by node and tier (``dashboards/grafana_qwen3vl_ray.json``).
"""
