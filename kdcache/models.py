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

import contextlib
import importlib.util
import json
import struct
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
from .fused import OutputHead
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


@contextlib.contextmanager
def _loading(what: str, name_or_path: str, errors: tuple[type[BaseException], ...]):
    """Turn what a loader raises for a damaged source into one line naming it. transformers' GGUF reader
    unpacks the header with `struct`, so a GGUF file cut short (a partial download) raises struct.error."""
    try:
        yield
    except struct.error as error:
        raise KDCacheError(f"cannot load {what} from {name_or_path}: not a complete GGUF file, truncated or "
                           f"damaged ({first_line(error)})") from None
    except errors as error:
        raise KDCacheError(f"cannot load {what} from {name_or_path}: {first_line(error)}") from None


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
    with _loading(what, name_or_path, (OSError, ValueError, KeyError, TypeError)):
        return AutoTokenizer.from_pretrained(source, local_files_only=local, **extra, **NO_CODE)


def load_config(name_or_path: str, what: str) -> PretrainedConfig:
    source, extra = _source(name_or_path, what)
    with _loading(what, name_or_path, (OSError, ValueError, KeyError)):
        return AutoConfig.from_pretrained(source, **extra, **NO_CODE)


def load_model(name_or_path: str, what: str, dtype: str = "auto", auto_class=AutoModelForCausalLM,
               device_map: str | None = None) -> PreTrainedModel:
    """A pretrained model through `auto_class` (the task's AutoModelFor... class).

    `device_map` (e.g. "auto") spreads a model too big for one device over all of them (big-model loading).
    """
    source, extra = _source(name_or_path, what)
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    placement = {} if device_map is None else {"device_map": device_map}
    with _loading(what, name_or_path, (OSError, ValueError, KeyError, RuntimeError, SafetensorError)):
        return auto_class.from_pretrained(source, dtype=torch_dtype, **placement, **extra, **NO_CODE)


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


def backbone_only(device) -> dict:
    """The forward keyword that keeps no position's logits (`logits_to_keep` = no index): the model runs to its
    final hidden states (`output_hidden_states=True`, last entry) and never builds batch × length × vocabulary."""
    return {"logits_to_keep": torch.zeros(0, dtype=torch.long, device=device)}


def output_head(model: PreTrainedModel, num_classes: int | None = None, check: bool = True) -> OutputHead:
    """The model's output head (`get_output_embeddings()`, sliced to `num_classes` rows) with the scaling and
    soft-capping its config says it applies, for the fused losses (kdcache/fused.py).

    Checked once on an 8-token probe: the model's logits must equal this head applied to its last hidden
    states, and `backbone_only` must skip the logits; a model that does anything else (an unknown transform,
    a non-linear head) is refused with a one-line KDCacheError naming why. `check=False` skips the probe (the
    model was checked before; its weights are read again because they may have moved to another device).
    """
    name = type(model).__name__
    layer = model.get_output_embeddings()
    if not isinstance(layer, torch.nn.Linear):
        raise KDCacheError(f"{name}'s output layer is {type(layer).__name__}, not a Linear layer")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    head = OutputHead(layer.weight, layer.bias, scale, getattr(config, "final_logit_softcapping", None))
    if check:
        _check_head(model, head)
    rows = slice(None, num_classes)
    return OutputHead(head.weight[rows], None if head.bias is None else head.bias[rows], head.scale, head.softcap)


def _check_head(model: PreTrainedModel, head: OutputHead) -> None:
    name = type(model).__name__
    device = head.weight.device
    probe = (torch.arange(8, device=device) % head.weight.shape[0])[None]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=probe, use_cache=False).logits
            fused = model(input_ids=probe, use_cache=False, output_hidden_states=True, **backbone_only(device))
    except (TypeError, ValueError) as error:
        raise KDCacheError(f"{name} cannot run to its hidden states without logits: {first_line(error)}") from None
    finally:
        model.train(training)
    if fused.logits is not None and fused.logits.numel():
        raise KDCacheError(f"{name} ignores `logits_to_keep`: it would still build every position's logits")
    with torch.no_grad():
        expected = head.logits(fused.hidden_states[-1])
    tolerance = 1e-4 if logits.dtype in (torch.float32, torch.float64) else 3e-2
    if expected.shape != logits.shape or \
            (expected.float() - logits.float()).abs().max() > tolerance * (1 + logits.float().abs().max()):
        raise KDCacheError(f"{name}'s logits are not its output layer applied to its last hidden states "
                           f"(it transforms them in a way kdcache does not know)")
