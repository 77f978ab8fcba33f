"""What a coordinator's policy pass reads from a node agent: its pressure report (``NodeAgentLogic.pressure``)
and, for cluster-wide eviction, its candidates (``NodeAgentLogic.candidates``).

Metadata side only, and it crosses processes (Ray pickles it as itself), so it is typed rather than a nested
dict: the coordinator's placement, admission and relief read its fields by name. ``to_dict`` is the one path
into JSON (``qwen3vl-ray status --json``, the dashboard's status), with the keys the dict it replaced had.
The core monitor's sample (``qwen3vl_ray.cache.pressure.PressureReport``) is what the agent builds it from; this
one adds what only the agent knows (its node, epoch and entry counts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qwen3vl_ray.keys import CacheKey


@dataclass(frozen=True, slots=True)
class TierReport:
    """One of a node agent's tiers (``host``: the Ray object store; ``disk``: its NVMe tier).

    Attributes:
        used: bytes stored in the tier (encoded size, as its budget counts them).
        capacity: the tier's budget in bytes.
        entries: chunks stored in the tier.
        high: fraction of ``capacity`` above which the tier is under pressure (``AgentConfig.high_watermark``).
        low: fraction of ``capacity`` that relief drains the tier down to (``AgentConfig.low_watermark``).
        system: the physical memory or disk under the tier is short, whatever its own budget says; the tier
            then counts as under pressure.
    """

    used: int
    capacity: int
    entries: int
    high: float
    low: float
    system: bool = False

    @property
    def over_high(self) -> bool:
        """Whether relief is due: above the high watermark, or short of physical room."""
        return self.system or self.used > self.high * self.capacity

    @property
    def room(self) -> float:
        """Bytes that still fit below the high watermark (negative when above it)."""
        return self.high * self.capacity - self.used

    @property
    def excess(self) -> float:
        """Bytes above the low watermark: what relief frees (negative when below it)."""
        return self.used - self.low * self.capacity


@dataclass(frozen=True, slots=True)
class NodeReport:
    """A node agent's pressure report.

    Attributes:
        node_id: the agent's node (hex Ray node id).
        epoch: the agent's incarnation (a new one after each restart).
        tiers: the agent's tiers by name, top first (``host``, then ``disk`` when it has one).
        host_memory: ``(used, total)`` bytes of the machine's RAM.
        disk_free: free bytes under each disk tier's directory, by path.
    """

    node_id: str
    epoch: str
    tiers: dict[str, TierReport]
    host_memory: tuple[int, int] = (0, 0)
    disk_free: dict[str, int] = field(default_factory=dict)

    def with_used(self, tier: str, used: int) -> "NodeReport":
        """This report with ``tier``'s ``used`` bytes replaced (the coordinator books a placement on it until
        the agent's next report)."""
        tiers = dict(self.tiers)
        tiers[tier] = dataclasses.replace(tiers[tier], used=used)
        return dataclasses.replace(self, tiers=tiers)

    def to_dict(self) -> dict:
        """Plain JSON-ready form: ``{"node_id", "epoch", "tiers": {name: {"used", "capacity", "entries", "high",
        "low", "system"}}, "host_memory": [used, total], "disk_free": {path: bytes}}``."""
        d = dataclasses.asdict(self)
        d["host_memory"] = list(self.host_memory)
        return d


@dataclass(frozen=True, slots=True)
class EvictionCandidate:
    """One entry an agent offers for cluster-wide eviction, in its policy's order (``NodeAgentLogic.candidates``).

    Attributes:
        key: the entry's cache key.
        nbytes: bytes it frees (stored size, as the tier's budget counts it).
        value: recompute seconds saved per stored byte x likelihood of reuse; the coordinator takes the next
            entry from the node whose front candidate is worth least.
    """

    key: CacheKey
    nbytes: int
    value: float
