"""The index subsystem: embedding (embed), shard assignment and shard builds (shards), the manifest
(manifest), versioned folders and locks (layout), publication (publish), corpus -> index (build),
serving (search), incremental re-index (reindex) and hard-negative mining (mining)."""
