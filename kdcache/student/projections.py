"""Feature matching: which student layer imitates which cached teacher layer, through what projection."""

from __future__ import annotations

import torch
from torch import nn

from ..cache.format import Manifest
from ..errors import KDCacheError
from ..losses import hidden_loss
from .batching import Batch


def parse_layer_map(spec: str | None, manifest: Manifest, student_layers: int) -> dict[int, int]:
    """`"i:j,..."` → {student hidden_states index: cached teacher layer}; negatives allowed on both sides.

    Without a map, the student's last hidden state is matched to the last cached teacher layer.
    """
    cached = manifest.hidden_layers
    if not cached:
        raise KDCacheError("`hidden_weight` > 0 but the cache holds no hidden states (dump with `hidden_layers`)")
    if not spec:
        return {student_layers: max(cached)}
    teacher_count = int(manifest.teacher["num_hidden_layers"]) + 1
    mapping = {}
    for pair in spec.split(","):
        try:
            student_index, teacher_index = (int(part) for part in pair.split(":"))
        except ValueError:
            raise KDCacheError(f"`layer_map` entry '{pair}' is not 'student:teacher' (e.g. '2:6,4:12')") from None
        if not -(student_layers + 1) <= student_index <= student_layers:
            raise KDCacheError(f"`layer_map` student layer {student_index} out of range 0..{student_layers}")
        if teacher_index % teacher_count not in cached or not -teacher_count <= teacher_index < teacher_count:
            raise KDCacheError(f"`layer_map` teacher layer {teacher_index} is not cached "
                               f"(cached layers: {', '.join(map(str, cached))})")
        mapping[student_index % (student_layers + 1)] = teacher_index % teacher_count
    return mapping


class FeatureProjections(nn.Module):
    """One learned linear map per matched layer pair (and for the pooled output) when widths differ (FitNets);
    identity otherwise."""

    def __init__(self, layer_map: dict[int, int], student_width: int, teacher_sizes: dict[int, int],
                 kind: str = "mse", pooled_size: int | None = None):
        super().__init__()
        self.layer_map = layer_map
        self.kind = kind
        self.pooled = (None if pooled_size is None else
                       nn.Identity() if pooled_size == student_width else nn.Linear(student_width, pooled_size))
        self.maps = nn.ModuleDict({
            str(student_layer): (nn.Identity() if teacher_sizes[teacher_layer] == student_width
                                 else nn.Linear(student_width, teacher_sizes[teacher_layer]))
            for student_layer, teacher_layer in layer_map.items()})

    def forward(self, student_hidden: tuple[torch.Tensor, ...] | None, student_pooled: torch.Tensor | None,
                batch: Batch) -> dict[str, torch.Tensor]:
        """The feature-matching loss terms ("hidden", "pooled") this module is set up for.

        The losses are computed in `forward` so that, under several processes, the call goes through
        DistributedDataParallel, which then averages the projections' gradients across processes.
        """
        terms = {}
        if self.layer_map:
            valid = batch.valid
            terms["hidden"] = torch.stack([
                hidden_loss(self.maps[str(s)](student_hidden[s][valid].float()), batch.hidden[t][valid], self.kind)
                for s, t in self.layer_map.items()]).mean()
        if self.pooled is not None:
            terms["pooled"] = hidden_loss(self.pooled(student_pooled.float()), batch.pooled, self.kind)
        return terms
