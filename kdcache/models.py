"""Loading tokenizers and models through transformers, with errors a user can act on.

transformers raises long multi-line OSErrors for a wrong path or id; these helpers turn them into
one line naming what could not be loaded.

Models, tokenizers and caches come from other teams, so nothing they ship is ever run: every load
passes `trust_remote_code=False`, and a local directory whose config asks for its own code
(`auto_map`) is refused up front, naming the file, rather than left to transformers (which would
prompt on a terminal, or run the code once someone answers yes).

Every loader also takes a GGUF file (llama.cpp's format, how many LLMs are shared): a path ending
in `.gguf` is loaded through transformers' GGUF support (`from_pretrained(directory, gguf_file=name)`,
which dequantizes the weights and converts the tokenizer), so dump-teacher, init-student and
anything else that loads a teacher or its tokenizer accept one the same way.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from .cache.format import sha256_file
from .errors import KDCacheError, first_line
from .sources import check_model_source, is_gguf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


NO_CODE = {"trust_remote_code": False}


def _source(name_or_path: str, what: str, local: bool = False) -> tuple[str, dict]:
    """(what `from_pretrained` takes, its extra keyword arguments): a GGUF file becomes its directory
    plus `gguf_file`, after checking that the file and the `gguf` package are there."""
    check_model_source(name_or_path, what, local)
    if not is_gguf(name_or_path):
        return name_or_path, {}
    if importlib.util.find_spec("gguf") is None:
        raise KDCacheError(f"{what} {name_or_path} is a GGUF file, which needs the `gguf` package: "
                           f"pip install 'kdcache[gguf]'")
    path = Path(name_or_path).expanduser()
    return str(path.parent), {"gguf_file": path.name}


def gguf_record(name_or_path: str) -> dict | None:
    """What the manifest records about a GGUF teacher (file name, bytes, sha256), None for anything else.

    The weights fingerprint only samples the dequantized tensors; the file's own hash names exactly
    which quantized file a cache came from.
    """
    if not is_gguf(name_or_path):
        return None
    path = Path(name_or_path).expanduser()
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def load_tokenizer(name_or_path: str, what: str = "tokenizer", local: bool = False):
    """`local`: `name_or_path` is a directory kdcache found (a cache's tokenizer), never a hub id."""
    source, extra = _source(name_or_path, what, local)
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local, **extra, **NO_CODE)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise KDCacheError(f"cannot load {what} from {name_or_path}: {first_line(error)}") from None


def load_config(name_or_path: str, what: str) -> PretrainedConfig:
    source, extra = _source(name_or_path, what)
    try:
        return AutoConfig.from_pretrained(source, **extra, **NO_CODE)
    except (OSError, ValueError, KeyError) as error:
        raise KDCacheError(f"cannot load {what} from {name_or_path}: {first_line(error)}") from None


def load_model(name_or_path: str, what: str, dtype: str = "auto", auto_class=AutoModelForCausalLM,
               device_map: str | None = None) -> PreTrainedModel:
    """A pretrained model through `auto_class` (the task's AutoModelFor... class).

    `device_map` (e.g. "auto") spreads a model too big for one device over all of them (big-model loading).
    """
    source, extra = _source(name_or_path, what)
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    placement = {} if device_map is None else {"device_map": device_map}
    try:
        return auto_class.from_pretrained(source, dtype=torch_dtype, **placement, **extra, **NO_CODE)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
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
        return auto_class.from_config(config, **NO_CODE)
    except (ValueError, KeyError, TypeError, StrictDataclassError) as error:
        # transformers validates configs (e.g. heads dividing the width) through huggingface_hub's strict
        # dataclasses, whose error wraps the validator's ValueError: name that cause
        raise KDCacheError(f"cannot build a {auto_class.__name__.removeprefix('AutoModelFor')} model from "
                           f"{config_file}: {first_line(error.__cause__ or error)}") from None


def output_vocab_size(model: PreTrainedModel) -> int:
    """Rows of the output embedding: the logits' last dimension, padding included."""
    return model.get_output_embeddings().weight.shape[0]
