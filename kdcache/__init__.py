"""kdcache: offline knowledge distillation through a cache of teacher soft targets."""

__version__ = "0.1.0"
