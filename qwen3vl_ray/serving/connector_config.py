"""What the KV and encoder-cache connectors are configured with, through the project's one settings path.

vLLM hands a connector ``kv_transfer_config.kv_connector_extra_config`` (or ``ec_transfer_config.
ec_connector_extra_config``), a dict. Its keys are the project's option names (``host_bytes``, ``disk_dir``,
``host_codec``, ``tenant``, ...: ``docs/configuration.md``), and ``QWEN3VL_RAY_*`` environment variables fill in
what it leaves out, exactly as for every other entry point. Both connectors take ``store``; only the KV connector
takes ``load_mode`` and ``save_mode`` (the encoder-cache connector refuses them by name rather than ignore them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from qwen3vl_ray import settings as settings_mod
from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.serving.block_store import STORE_KINDS
from qwen3vl_ray.serving.block_transfers import LOAD_MODES, SAVE_MODES

#: the connector classes and the modules vLLM imports them from (``kv_connector_module_path``,
#: ``ec_connector_module_path``)
CONNECTOR_CLASS = "TierKVConnector"
CONNECTOR_MODULE = "qwen3vl_ray.serving.kv_connector"
EC_CONNECTOR_CLASS = "TierECConnector"
EC_CONNECTOR_MODULE = "qwen3vl_ray.serving.ec_connector"

#: options of the settings table the connector uses; any other key in the extra config is refused by name
CONNECTOR_OPTIONS = ("host_bytes", "disk_bytes", "disk_dir", "host_codec", "disk_codec", "block_bytes",
                     "disk_fsync", "high_watermark", "low_watermark", "policy", "tenant", "fingerprint")
#: the connectors' own options besides those, with their allowed values; the encoder-cache connector takes only
#: the first (its loads and saves are always in the step: a claimed item must be there when the step runs)
KV_CONNECTOR_CHOICES = {"store": STORE_KINDS, "load_mode": LOAD_MODES, "save_mode": SAVE_MODES}
EC_CONNECTOR_CHOICES = {"store": STORE_KINDS}


@dataclass(frozen=True)
class ConnectorConfig:
    """The connector's configuration.

    Attributes:
        settings: the project's settings (tier sizes and codecs, policy, tenant, fingerprint mode).
        store: ``"local"`` (default): the tiers live in the engine's process (host, and disk when
            ``disk_bytes > 0``); ``"ray"``: on the node agents of the Ray cluster this process is attached to
            (``RAY_ADDRESS``), shared by every engine of the cluster, with the coordinator's directory.
        load_mode: KV connector only (the encoder-cache connector refuses it). ``"sync"`` (default): a
            request's blocks load in the engine step before its forward pass; ``"async"``: vLLM parks the
            request while a background thread loads them, and the other requests' steps go on (more throughput
            under concurrency, one scheduler round trip more of TTFT).
        save_mode: KV connector only (the encoder-cache connector refuses it). ``"async"`` (default): new
            blocks are copied out of vLLM's paged KV in the step and stored (codec, disk write, the node
            agent's round trip) on a background thread; ``"sync"``: stored in the step.
    """

    settings: settings_mod.Settings
    store: str = "local"
    load_mode: str = "sync"
    save_mode: str = "async"


def connector_config(extra_config: Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> ConnectorConfig:
    """The KV connector's: ``extra_config`` > environment > defaults, checked like everywhere else; unknown keys
    named."""
    return _resolve(extra_config, env, "kv_connector_extra_config", KV_CONNECTOR_CHOICES)


def ec_connector_config(extra_config: Mapping[str, Any] | None,
                        env: Mapping[str, str] | None = None) -> ConnectorConfig:
    """The encoder-cache connector's, from its ``ec_connector_extra_config``: as ``connector_config``, and a KV-only
    option (``load_mode``, ``save_mode``) is refused by name; ``load_mode``/``save_mode`` keep their defaults."""
    section = "ec_connector_extra_config"
    for name in [n for n in KV_CONNECTOR_CHOICES if n not in EC_CONNECTOR_CHOICES]:
        if name in (extra_config or {}):
            raise ConfigError(f"{section} {name} is an option of the KV connector only (kv_connector_extra_config); "
                              f"the encoder-cache connector always loads and saves in the engine step")
    return _resolve(extra_config, env, section, EC_CONNECTOR_CHOICES)


def _resolve(extra_config: Mapping[str, Any] | None, env: Mapping[str, str] | None, section: str,
             choices: Mapping[str, tuple[str, ...]]) -> ConnectorConfig:
    extra = dict(extra_config or {})
    chosen = {}
    defaults = {f.name: f.default for f in dataclasses.fields(ConnectorConfig)}
    for name, allowed in choices.items():
        chosen[name] = extra.pop(name, defaults[name])
        if chosen[name] not in allowed:
            raise ConfigError(f"{section} {name} must be one of {', '.join(allowed)}, got {chosen[name]!r}")
    unknown = sorted(set(extra) - set(CONNECTOR_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown {section} key(s) {', '.join(unknown)}; "
                          f"the connector takes: {', '.join([*chosen, *CONNECTOR_OPTIONS])}")
    return ConnectorConfig(settings_mod.resolve(extra, env=env), **chosen)


def kv_transfer_config(**options: Any) -> dict[str, Any]:
    """The ``kv_transfer_config`` that puts vLLM on the tiers: ``LLM(..., kv_transfer_config=kv_transfer_config(
    host_bytes="4GiB", disk_dir="/mnt/nvme/kv"))``, or the same dict in Ray's ``engine_kwargs``.

    ``kv_load_failure_policy="recompute"``: a block that fails to load (evicted meanwhile, corrupt on disk) is
    recomputed by vLLM; vLLM's own default fails the request instead.
    """
    connector_config(options)  # a bad option fails here, where the caller wrote it, not in the engine
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": dict(options),
    }


def ec_transfer_config(**options: Any) -> dict[str, Any]:
    """The ``ec_transfer_config`` that keeps vLLM's encoder outputs (vision features) on the tiers: the options of
    ``kv_transfer_config`` but its ``load_mode`` and ``save_mode`` (refused by name); both may be given to one
    engine, and with equal tier options they share one store."""
    ec_connector_config(options)  # a bad option fails here, where the caller wrote it, not in the engine
    return {
        "ec_connector": EC_CONNECTOR_CLASS,
        "ec_connector_module_path": EC_CONNECTOR_MODULE,
        "ec_role": "ec_both",
        "ec_connector_extra_config": dict(options),
    }
