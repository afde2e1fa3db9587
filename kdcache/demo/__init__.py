"""`kdcache demo`: the whole pipeline on a generated language (see run.py)."""

from .run import STUDENT_SHAPE, TEACHER_SHAPE, llama_config, run_demo, train_demo_teacher, write_jsonl
from .synthetic import SyntheticLanguage, build_word_tokenizer

__all__ = ["STUDENT_SHAPE", "SyntheticLanguage", "TEACHER_SHAPE", "build_word_tokenizer", "llama_config", "run_demo",
           "train_demo_teacher", "write_jsonl"]
