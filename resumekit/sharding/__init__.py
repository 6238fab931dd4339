"""Sharded entries: FSDP2 modules, DTensor parameters and their optimizers (internal).

``metadata`` (the versioned JSON sharding record of an entry), ``shards`` (save side: each rank's own
chunks, who writes a replicated chunk, the chunk index files), ``reshard`` (restore side: plan and read
the byte ranges each target shard overlaps, at any world size or into plain tensors). Internal: the
public API is ``resumekit.__all__``.
"""
