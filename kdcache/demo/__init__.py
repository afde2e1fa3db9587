"""`kdcache demo`: the whole pipeline on a generated language (see run.py)."""

from .run import run_demo
from .synthetic import SyntheticLanguage, build_word_tokenizer

__all__ = ["SyntheticLanguage", "build_word_tokenizer", "run_demo"]
