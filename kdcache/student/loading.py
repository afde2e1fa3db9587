"""Loading a student and checking that its ids and classes mean what the cache's ids mean."""

from __future__ import annotations

from pathlib import Path

from ..cache.cache import Cache
from ..cache.format import Manifest, tokenizer_fingerprint
from ..errors import KDCacheError
from ..models import load_model, load_tokenizer, model_from_config
from ..tasks import get_task


def check_student_matches_cache(model, student_tokenizer, manifest: Manifest) -> None:
    """Refuse a student whose ids mean something else than the cache's ids."""
    vocab = manifest.vocab_size
    get_task(manifest.task).check_student(model, manifest)
    if student_tokenizer is not None:
        fingerprint = tokenizer_fingerprint(student_tokenizer)
        if fingerprint["hash"] != manifest.tokenizer["hash"]:
            raise KDCacheError(f"student tokenizer ({fingerprint['vocab_size']} tokens) differs from the cache's "
                               f"tokenizer ({vocab} tokens): ids would not line up with the cached targets")


def load_cache_tokenizer(cache: Cache):
    """The cache's tokenizer, its files checked against the manifest's fingerprints before transformers reads
    them (`Cache.tokenizer_dir`), and the loaded vocabulary checked against the manifest's vocabulary hash,
    naming any difference."""
    manifest = cache.manifest
    tokenizer = load_tokenizer(str(cache.tokenizer_dir()), "cache tokenizer", local=True)
    loaded = tokenizer_fingerprint(tokenizer)
    differences = [f"{name} {manifest.tokenizer[name]} in the manifest, {loaded[name]} loaded"
                   for name in ("vocab_size", "hash") if loaded[name] != manifest.tokenizer[name]]
    if differences:
        raise KDCacheError(f"the cache's tokenizer does not match its manifest: {'; '.join(differences)}")
    return tokenizer


def load_student(student: str | None, student_config: str | None, manifest: Manifest):
    if (student is None) == (student_config is None):
        raise KDCacheError("give exactly one of `student` (pretrained) or `student_config` (fresh model)")
    if student_config is not None:
        task = get_task(manifest.task)
        model = model_from_config(student_config, manifest.vocab_size, task.auto_class,
                                  **task.student_config_overrides(manifest))
        check_student_matches_cache(model, None, manifest)
        return model
    return load_pretrained_student(student, manifest)


def load_pretrained_student(student: str, manifest: Manifest):
    """Load a pretrained student and check it (and its tokenizer, when it ships one) against the cache."""
    model = load_model(student, "student", "float32", get_task(manifest.task).auto_class)
    has_tokenizer = any((Path(student) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    check_student_matches_cache(model, load_tokenizer(student, "student tokenizer") if has_tokenizer else None, manifest)
    return model
