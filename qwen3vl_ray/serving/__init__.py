"""qwen3vl-ray as vLLM's KV tier: a vLLM v1 KV connector backed by the project's tiers.

- ``connector_config``: what the connector reads from ``kv_connector_extra_config`` (and the helper that
  builds a whole ``kv_transfer_config``);
- ``block_keys``: vLLM block hashes -> namespaced cache keys (model fingerprint, dtype, layout, tenant);
- ``paged_blocks``: copies whole blocks between vLLM's paged KV tensors and one tensor per block;
- ``block_store``: where blocks live (the tiered store in this process: host + disk tiers);
- ``kv_connector``: the ``KVConnectorBase_V1`` subclass vLLM loads through ``kv_connector_module_path``.

Only ``kv_connector`` imports vLLM, so the rest is usable (and tested) without it.
"""
