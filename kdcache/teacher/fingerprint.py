"""Identifying a teacher in the manifest, so a receiving team can tell which model made a cache."""

from __future__ import annotations

import hashlib
from typing import Any

from ..cache.format import sha256_bytes
from ..models import gguf_record
from .data import portable_name


def teacher_fingerprint(model, name_or_path: str) -> dict[str, Any]:
    """Identify the teacher's architecture and weights without hashing every byte.

    The weights hash covers each tensor's name, shape, dtype and a strided sample of up to
    4096 of its values: enough to tell checkpoints apart, cheap for a 70B model. `name_or_path` is kept
    as another team can use it: a hub id (with the revision loaded, when the hub reported one) or
    the local directory's (or GGUF file's) name, not its path on this machine. A GGUF teacher also
    gets its file's name, size and full sha256 (`gguf`).
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].float().cpu().numpy()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sample.tobytes())
    config = model.config
    revision = getattr(config, "_commit_hash", None)
    gguf = gguf_record(name_or_path)
    return {
        "name_or_path": portable_name(name_or_path),
        **({"revision": revision} if revision else {}),
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or [type(model).__name__]),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_hidden_layers": config.num_hidden_layers,
        "config_sha256": sha256_bytes(config.to_json_string(use_diff=False).encode()),
        "weights_sha256": digest.hexdigest(),
        **({"gguf": gguf} if gguf else {}),
    }
