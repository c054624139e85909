"""Sequence parallelism: exact ring attention over ``torch.distributed`` (gloo on CPU, NCCL on GPU)."""

from attnkit.distributed.ring import RingStats, last_stats, ring_attention, shard, unshard

__all__ = ["RingStats", "last_stats", "ring_attention", "shard", "unshard"]
