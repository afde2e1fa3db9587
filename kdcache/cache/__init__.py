"""The cache on disk, the contract shared between teams (docs/format.md): format and manifest
(format.py), `Cache` and `open_cache` (cache.py), shard writing, streaming reading, stores. No torch."""
