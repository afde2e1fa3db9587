"""Loading tokenizers and models through transformers, with errors a user can act on.

transformers raises long multi-line OSErrors for a wrong path or id; these helpers turn them into
one line naming what could not be loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from .errors import KDCacheError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_exists(name_or_path: str, what: str) -> None:
    """A local-looking path that does not exist is a typo, not a hub id to try online."""
    if not Path(name_or_path).expanduser().exists() and name_or_path.startswith((".", "/", "~")):
        raise KDCacheError(f"{what} path not found: {name_or_path}")


def load_tokenizer(name_or_path: str, what: str = "tokenizer"):
    _check_exists(name_or_path, what)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as error:
        raise KDCacheError(f"cannot load {what} from {name_or_path}: {first_line(error)}") from None


def load_config(name_or_path: str, what: str) -> PretrainedConfig:
    _check_exists(name_or_path, what)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as error:
        raise KDCacheError(f"cannot load {what} from {name_or_path}: {first_line(error)}") from None


def load_model(name_or_path: str, what: str, dtype: str = "auto", auto_class=AutoModelForCausalLM,
               device_map: str | None = None) -> PreTrainedModel:
    """A pretrained model through `auto_class` (the task's AutoModelFor... class).

    `device_map` (e.g. "auto") spreads a model too big for one device over all of them (big-model loading).
    """
    _check_exists(name_or_path, what)
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    placement = {} if device_map is None else {"device_map": device_map}
    try:
        return auto_class.from_pretrained(name_or_path, dtype=torch_dtype, **placement)
    except (OSError, ValueError, KeyError) as error:
        raise KDCacheError(f"cannot load {what} from {name_or_path}: {first_line(error)}") from None


def load_causal_lm(name_or_path: str, what: str, dtype: str = "auto") -> PreTrainedModel:
    return load_model(name_or_path, what, dtype, AutoModelForCausalLM)


def model_from_config(config_file: str, vocab_size: int, auto_class=AutoModelForCausalLM,
                          **overrides) -> PreTrainedModel:
    """A freshly initialised model from a config JSON; its vocabulary defaults to the cache's.

    `auto_class` is the task's AutoModelFor... class; `overrides` (e.g. the cache's labels) win
    over the file's values.
    """
    path = Path(config_file).expanduser()
    if not path.is_file():
        raise KDCacheError(f"student config not found: {config_file}")
    try:
        values = json.loads(path.read_text())
        model_type = values.pop("model_type")
    except ValueError as error:
        raise KDCacheError(f"student config {config_file} is not valid JSON: {error}") from None
    except KeyError:
        raise KDCacheError(f"student config {config_file} has no 'model_type'") from None
    values.setdefault("vocab_size", vocab_size)
    values.update(overrides)
    try:
        config = AutoConfig.for_model(model_type, **values)
        return auto_class.from_config(config)
    except (ValueError, KeyError, TypeError) as error:
        raise KDCacheError(f"cannot build a {auto_class.__name__.removeprefix('AutoModelFor')} model from "
                           f"{config_file}: {first_line(error)}") from None


def output_vocab_size(model: PreTrainedModel) -> int:
    """Rows of the output embedding: the logits' last dimension, padding included."""
    return model.get_output_embeddings().weight.shape[0]
