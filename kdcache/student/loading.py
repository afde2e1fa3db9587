"""Loading a student and checking that its ids and classes mean what the cache's ids mean."""

from __future__ import annotations

from pathlib import Path

from ..cache.cache import Cache
from ..cache.format import Manifest, tokenizer_fingerprint
from ..errors import KDCacheError
from ..models import load_model, load_tokenizer, model_from_config, output_vocab_size
from ..sources import check_student_sources
from ..tasks import get_task


def check_student_matches_cache(model, student_tokenizer, manifest: Manifest) -> None:
    """Refuse a student whose ids mean something else than the cache's ids."""
    vocab = manifest.vocab_size
    if student_tokenizer is not None:
        fingerprint = tokenizer_fingerprint(student_tokenizer)
        if fingerprint["hash"] != manifest.tokenizer["hash"]:
            raise KDCacheError(f"student tokenizer ({fingerprint['vocab_size']} tokens) differs from the cache's "
                               f"tokenizer ({vocab} tokens): ids would not line up with the cached targets "
                               f"(set `student_tokenizer` to train across tokenizers)")
    get_task(manifest.task).check_student(model, manifest)


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


def check_student_matches_tokenizer(model, student_tokenizer, shipped_tokenizer) -> None:
    """Across tokenizers: the student's output must cover `student_tokenizer`, which it must ship if it ships one."""
    vocab = len(student_tokenizer)
    if output_vocab_size(model) < vocab:
        raise KDCacheError(f"student vocabulary ({output_vocab_size(model)}) is smaller than `student_tokenizer` "
                           f"({vocab} tokens)")
    if shipped_tokenizer is not None and tokenizer_fingerprint(shipped_tokenizer)["hash"] != \
            tokenizer_fingerprint(student_tokenizer)["hash"]:
        raise KDCacheError("the student ships a tokenizer that differs from `student_tokenizer`")


def load_student(student: str | None, student_config: str | None, manifest: Manifest,
                 student_tokenizer: str | None = None):
    """The student to train, checked against the cache, or against `student_tokenizer` across tokenizers."""
    check_student_sources(student, student_config)
    cross = load_tokenizer(student_tokenizer, "student tokenizer") if student_tokenizer else None
    if student_config is not None:
        task = get_task(manifest.task)
        model = model_from_config(student_config, manifest.vocab_size if cross is None else len(cross),
                                  task.auto_class, **task.student_config_overrides(manifest))
        if cross is None:
            check_student_matches_cache(model, None, manifest)
        else:
            check_student_matches_tokenizer(model, cross, None)
        return model
    return load_pretrained_student(student, manifest, cross)


def load_pretrained_student(student: str, manifest: Manifest, cross_tokenizer=None):
    """Load a pretrained student and check it (and its tokenizer, when it ships one) against the cache,
    or against `cross_tokenizer` when it trains across tokenizers."""
    model = load_model(student, "student", "float32", get_task(manifest.task).auto_class)
    has_tokenizer = any((Path(student) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    shipped = load_tokenizer(student, "student tokenizer") if has_tokenizer else None
    if cross_tokenizer is not None:
        check_student_matches_tokenizer(model, cross_tokenizer, shipped)
    else:
        check_student_matches_cache(model, shipped, manifest)
    return model
