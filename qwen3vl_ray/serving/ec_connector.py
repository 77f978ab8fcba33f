"""``TierECConnector``: vLLM's encoder-cache connector on the project's tiers (vision features).

Load it with ``ec_transfer_config=qwen3vl_ray.serving.connector_config.ec_transfer_config(...)``.

vLLM keys an image's encoder output by ``mm_hash`` (a hash of the model id, the decoded pixels and the
processor's arguments) and keeps it in a per-engine encoder cache while requests use it. For Qwen3-VL that
output is the merged visual embedding with the DeepStack features concatenated along the hidden dimension,
so one stored tensor is everything the language model needs from the vision tower. This connector saves each
output to the tiers as the encoder produces it, and when a request brings an image whose output vLLM's own
cache has let go, the scheduler finds it in the tiers and the encoder is skipped: in another request, another
engine process (disk tier), or another node (``store="ray"``).

A claimed item must arrive: vLLM's model runner expects every claimed output in its encoder cache. So the
scheduler side loads (and checksums) the tensor when it claims it and stages it for the worker side of the
same process; an item that cannot be read is not claimed, and the encoder runs as if nothing were stored.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import vllm
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorBase, ECConnectorMetadata, ECConnectorRole
from vllm.v1.core.sched.output import SchedulerOutput

from qwen3vl_ray.engine.checkpoint import model_fingerprint
from qwen3vl_ray.errors import ConfigError
from qwen3vl_ray.keys import CacheKey, Namespace, content_key
from qwen3vl_ray.serving.block_keys import codec_tag
from qwen3vl_ray.serving.block_store import BlockStore, shared_store
from qwen3vl_ray.serving.connector_config import ec_connector_config

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

FEATURE_KIND = "vllm-mm"
#: claimed items waiting for the worker side; more than this (claims of requests never scheduled) drops the oldest
MAX_STAGED = 64


@dataclass
class TierECConnectorMetadata(ECConnectorMetadata):
    """The ``mm_hash`` of every item the worker takes from the tiers this step."""

    mm_hashes: list[str] = field(default_factory=list)


class _Staging:
    """Items the scheduler side claimed and read, handed to the worker side of the same process."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, mm_hash: str, tensor: torch.Tensor) -> None:
        with self._lock:
            self._items[mm_hash] = tensor
            self._items.move_to_end(mm_hash)
            while len(self._items) > MAX_STAGED:
                self._items.popitem(last=False)

    def __contains__(self, mm_hash: str) -> bool:
        with self._lock:
            return mm_hash in self._items

    def take(self, mm_hash: str) -> torch.Tensor | None:
        with self._lock:
            return self._items.pop(mm_hash, None)


_STAGING: dict[bytes, _Staging] = {}
_STAGING_LOCK = threading.Lock()


def _staging_for(namespace: Namespace) -> _Staging:
    with _STAGING_LOCK:
        return _STAGING.setdefault(namespace.digest, _Staging())


def feature_key(namespace: Namespace, mm_hash: str) -> CacheKey:
    return content_key(namespace, FEATURE_KIND, mm_hash.encode())


class TierECConnector(ECConnectorBase):
    """See the module docstring."""

    def __init__(self, vllm_config: "VllmConfig", role: ECConnectorRole) -> None:
        super().__init__(vllm_config=vllm_config, role=role)
        tc = vllm_config.ec_transfer_config
        config = ec_connector_config(tc.ec_connector_extra_config)
        s = config.settings
        try:
            fingerprint = model_fingerprint(vllm_config.model_config.model, full=s.fingerprint == "full")
        except FileNotFoundError as e:
            raise ConfigError(f"the encoder-cache connector keys features by the checkpoint's fingerprint and needs "
                              f"its files on disk: {e}") from None
        from vllm.platforms import current_platform

        dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
        self.namespace = Namespace(model=fingerprint, dtype=dtype,
                                   layout=f"vllm-{vllm.__version__}:{current_platform.device_type}:encoder-output",
                                   codec=codec_tag(s.host_codec, s.disk_codec), tenant=s.tenant)
        self.store: BlockStore = shared_store(s, config.store)
        self._staging = _staging_for(self.namespace)
        self._to_load: list[str] = []

    # ================================================================ scheduler side
    def has_cache_item(self, identifier: str) -> bool:
        if not self.is_consumer:
            return False
        try:
            [tensor] = self.store.load_many([feature_key(self.namespace, identifier)])
        except Exception:  # the store failing is a miss: the encoder runs
            log.warning("reading encoder output %s from the tiers failed", identifier, exc_info=True)
            return False
        if tensor is None:
            return False
        self._staging.put(identifier, tensor)
        return True

    def update_state_after_alloc(self, request: "Request", index: int) -> None:
        # called for every encoder input given cache space: only the ones claimed from the tiers are loaded
        mm_hash = request.mm_features[index].identifier
        if self.is_consumer and mm_hash in self._staging and mm_hash not in self._to_load:
            self._to_load.append(mm_hash)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> ECConnectorMetadata:
        meta = TierECConnectorMetadata(self._to_load)
        self._to_load = []
        return meta

    # ================================================================ worker side
    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TierECConnectorMetadata)
        device = _device()
        for mm_hash in meta.mm_hashes:
            if mm_hash in encoder_cache:
                continue
            tensor = self._staging.take(mm_hash)
            if tensor is None:  # claimed in another process (a multi-process executor): read it here
                [tensor] = self.store.load_many([feature_key(self.namespace, mm_hash)])
            if tensor is None:
                raise RuntimeError(f"encoder output {mm_hash} was claimed from the tiers but cannot be read now")
            encoder_cache[mm_hash] = tensor.to(device)

    def save_caches(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs: Any) -> None:
        if not self.is_producer or mm_hash not in encoder_cache:
            return
        key = feature_key(self.namespace, mm_hash)
        try:
            if not self.store.contains_many([key])[0]:
                self.store.save_many([(key, encoder_cache[mm_hash].detach().to("cpu").contiguous(), None)])
        except Exception:  # best effort: an unsaved output is encoded again next time
            log.warning("saving encoder output %s to the tiers failed", mm_hash, exc_info=True)


def _device() -> str:
    from vllm.platforms import current_platform

    if current_platform.is_cuda_alike():
        return f"{current_platform.device_type}:{current_platform.current_device()}"
    return current_platform.device_type
