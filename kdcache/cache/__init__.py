"""The cache on disk: format and manifest, shard writing, streaming reading."""
