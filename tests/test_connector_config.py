"""The connectors' configs built from the dicts vLLM hands them: no engine, no model."""

from __future__ import annotations

import types

import pytest

from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.serving.connector_config import ec_connector_config, ec_transfer_config, kv_transfer_config


@pytest.mark.parametrize("option, value", [("load_mode", "async"), ("save_mode", "sync")])
def test_the_encoder_cache_connector_refuses_a_kv_only_option_by_name(option, value):
    # accepted by the KV connector ...
    kv_transfer_config(**{option: value})
    # ... but the encoder-cache connector would ignore it: refused, naming the option and where it belongs
    with pytest.raises(ConfigError, match=f"ec_connector_extra_config {option} is an option of the KV connector only"):
        ec_connector_config({option: value})
    with pytest.raises(ConfigError, match=option):
        ec_transfer_config(host_bytes="1MiB", **{option: value})


def test_the_encoder_cache_connector_takes_store_and_the_tier_options():
    config = ec_connector_config({"store": "local", "host_bytes": "1MiB", "tenant": "a"}, env={})
    assert (config.store, config.settings.host_bytes, config.settings.tenant) == ("local", 1 << 20, "a")
    with pytest.raises(ConfigError, match="ec_connector_extra_config store must be one of local, ray, got 'far'"):
        ec_connector_config({"store": "far"})
    # an unknown key names the encoder-cache section and lists what it takes (no load_mode/save_mode there)
    with pytest.raises(ConfigError, match=r"unknown ec_connector_extra_config key\(s\) mode; the connector takes: "
                                          r"store, host_bytes"):
        ec_connector_config({"mode": "async"})


def test_the_encoder_cache_connector_refuses_a_kv_only_option_in_the_dict_vllm_passes():
    pytest.importorskip("vllm")
    from vllm.config import ECTransferConfig
    from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorRole

    from qwen3vl_ray.serving.ec_connector import TierECConnector

    # what vLLM builds from ec_transfer_config(...)'s dict, with a KV-only option written into it by hand;
    # the refusal comes before the connector reads the model's config, so none is given
    tc = ECTransferConfig(**{**ec_transfer_config(host_bytes="1MiB"),
                             "ec_connector_extra_config": {"host_bytes": "1MiB", "load_mode": "async"}})
    vllm_config = types.SimpleNamespace(ec_transfer_config=tc)
    with pytest.raises(ConfigError, match="ec_connector_extra_config load_mode is an option of the KV connector"):
        TierECConnector(vllm_config, ECConnectorRole.SCHEDULER)
