"""`init-student`: build a student from its teacher, the seed's "structure transformation".

Two ways, both keeping the teacher's model type, head and tokenizer, so the student fits the
teacher's cache as is:

- **carve** (default): copy the embeddings, the chosen transformer layers (in the given order) and
  the head (DistilBERT initialises its 6 layers from every other layer of BERT-base). The student
  starts out computing something close to the teacher, which distillation then refines.
- **narrow** (`hidden_size`): a freshly initialised model of the same type with `len(layers)`
  layers of width `hidden_size`; nothing can be copied across widths. Attention keeps the
  teacher's head dimension (heads = hidden_size / head_dim) and the feed-forward keeps its ratio.

Besides dump-teacher this is the only command that reads the teacher's weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from torch import nn

from ..errors import KDCacheError
from ..models import load_config, load_model, load_tokenizer
from ..sources import check_model_source, with_gguf_file
from ..tasks import get_task, infer_task
from .output import INIT_RECORD, commit_output, prepare_output


def _model_class(config, task: str | None):
    """The teacher's own class when its config names one transformers has, else the task's Auto class."""
    if task is not None:
        return get_task(task).auto_class
    for architecture in getattr(config, "architectures", None) or []:
        if hasattr(transformers, architecture):
            return getattr(transformers, architecture)
    return infer_task(config).auto_class


def _fresh_model(model_class, config):
    """A randomly initialised model: Auto classes build with `from_config`, model classes with `_from_config`."""
    build = getattr(model_class, "from_config", None) or model_class._from_config
    return build(config)


def _layer_stack(model: nn.Module, num_layers: int) -> str:
    """The dotted name of the ModuleList holding the transformer layers (bert.encoder.layer, model.layers, ...)."""
    stacks = [name for name, module in model.named_modules()
              if isinstance(module, nn.ModuleList) and len(module) == num_layers]
    if len(stacks) != 1:
        raise KDCacheError(f"cannot tell which module holds the {num_layers} layers of this {type(model).__name__} "
                           f"(candidates: {', '.join(stacks) or 'none'}); use `hidden_size` for a fresh model")
    return stacks[0]


def _student_config(config, layers: list[int], hidden_size: int | None):
    values = config.to_dict()
    teacher_layers = config.num_hidden_layers
    for key, value in values.items():  # per-layer settings (e.g. layer_types) follow their layers
        if isinstance(value, list) and len(value) == teacher_layers:
            values[key] = [value[index] for index in layers]
    values["num_hidden_layers"] = len(layers)
    if hidden_size is not None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if hidden_size % head_dim:
            raise KDCacheError(f"`hidden_size` {hidden_size} is not a multiple of the teacher's attention head "
                               f"size ({head_dim})")
        heads = hidden_size // head_dim
        if getattr(config, "num_key_value_heads", None):
            values["num_key_value_heads"] = max(1, config.num_key_value_heads * heads // config.num_attention_heads)
            if heads % values["num_key_value_heads"]:
                values["num_key_value_heads"] = heads
        if getattr(config, "intermediate_size", None):
            values["intermediate_size"] = config.intermediate_size * hidden_size // config.hidden_size
        values.update(hidden_size=hidden_size, num_attention_heads=heads)
    return type(config).from_dict(values)


def init_student(teacher: str, out: Path | str, layers: list[int], *, hidden_size: int | None = None,
                 task: str | None = None, gguf_file: str | None = None) -> dict:
    """Write a student built from `teacher` (or the GGUF file `gguf_file` in it) to `out` (model +
    tokenizer); return what was done. A GGUF teacher's student is saved as safetensors."""
    out = Path(out)
    teacher = with_gguf_file(teacher, gguf_file)
    check_model_source(teacher, "teacher")
    config = load_config(teacher, "teacher config")
    count = config.num_hidden_layers
    if not layers:
        raise KDCacheError("`layers` needs at least one layer, e.g. '0,2,4'")
    if any(not 0 <= layer < count for layer in layers) or len(set(layers)) != len(layers):
        raise KDCacheError(f"`layers` {','.join(map(str, layers))}: need distinct teacher layers in 0..{count - 1}")
    if hidden_size is not None and hidden_size <= 0:
        raise KDCacheError(f"`hidden_size` must be positive, got {hidden_size}")
    model_class = _model_class(config, task)
    student_config = _student_config(config, layers, hidden_size)
    tokenizer = load_tokenizer(teacher, "teacher tokenizer")
    if hidden_size is None:
        teacher_model = load_model(teacher, "teacher", "float32", model_class)
        stack = _layer_stack(teacher_model, count)
        student = _fresh_model(model_class, student_config)
        source = teacher_model.state_dict()
        state = {}
        for name in student.state_dict():
            if name.startswith(stack + "."):
                index, rest = name[len(stack) + 1:].split(".", 1)
                name_in_teacher = f"{stack}.{layers[int(index)]}.{rest}"
            else:
                name_in_teacher = name
            state[name] = source[name_in_teacher]
        student.load_state_dict(state, strict=True)
    else:
        torch.manual_seed(0)
        student = _fresh_model(model_class, student_config)
    prepare_output(out, resuming=False)
    record = {"teacher": teacher, "class": type(student).__name__, "layers": layers,
              "mode": "carve" if hidden_size is None else "narrow", "hidden_size": student_config.hidden_size,
              "num_parameters": sum(p.numel() for p in student.parameters())}

    def save(staging: Path) -> None:
        student.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / INIT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    commit_output(out, save)
    return record
