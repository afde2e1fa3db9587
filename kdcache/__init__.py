"""kdcache: offline knowledge distillation through a cache of teacher soft targets.

Phase 1, `dump_teacher`, runs a teacher once and writes its soft targets to a cache; phase 2,
`train_student`, trains students from the cache without the teacher. Everything a user or a tool
needs is importable from here; the subpackages are the implementation:

    cache/    the format shared between teams (no torch)
    teacher/  dump-teacher
    student/  train-student, eval, init-student
    tasks/    causal LM, token and sequence classification
    demo/     the embedded demo

Names are loaded on first use (PEP 562), so `import kdcache` and `kdcache --help` do not pay for
torch and transformers until something needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Cache": ".cache.cache",
    "open_cache": ".cache.cache",
    "KDCacheError": ".errors",
    "KDCacheWarning": ".errors",
    "copy_cache": ".cache.transfer",
    "merge_caches": ".cache.merge",
    "join_teachers": ".cache.teachers",
    "export_cache": ".interop",
    "import_dataset": ".interop",
    "SparseTargets": ".losses",
    "dense_kd_loss": ".losses",
    "map_targets": ".losses",
    "mix_targets": ".losses",
    "uld_loss": ".losses",
    "hidden_loss": ".losses",
    "kd_loss": ".losses",
    "fused_kd_loss": ".fused",
    "OutputHead": ".fused",
    "output_head": ".models",
    "next_token_ce": ".losses",
    "DumpHooks": ".teacher",
    "DumpSettings": ".teacher",
    "dump_teacher": ".teacher",
    "RecodeSettings": ".teacher",
    "recode_cache": ".teacher",
    "TrainHooks": ".student",
    "Batch": ".student.batching",
    "collate": ".student.batching",
    "CacheDataset": ".student.integration",
    "DistillationTrainer": ".student.integration",
    "collate_inputs": ".student.integration",
    "training_arguments": ".student.integration",
    "DistillationLoss": ".student.objective",
    "TrainSettings": ".student",
    "CrossTokenizer": ".student.crosstok",
    "evaluate": ".student",
    "init_student": ".student",
    "train_student": ".student",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:  # what static tools and IDEs see
    from .cache.cache import Cache, open_cache
    from .cache.merge import merge_caches
    from .cache.teachers import join_teachers
    from .cache.transfer import copy_cache
    from .errors import KDCacheError, KDCacheWarning
    from .interop import export_cache, import_dataset
    from .fused import OutputHead, fused_kd_loss
    from .models import output_head
    from .losses import (SparseTargets, dense_kd_loss, hidden_loss, kd_loss, map_targets, mix_targets,
                         next_token_ce, uld_loss)
    from .student import TrainHooks, TrainSettings, evaluate, init_student, train_student
    from .student.batching import Batch, collate
    from .student.crosstok import CrossTokenizer
    from .student.integration import CacheDataset, DistillationTrainer, collate_inputs, training_arguments
    from .student.objective import DistillationLoss
    from .teacher import DumpHooks, DumpSettings, RecodeSettings, dump_teacher, recode_cache


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
