"""The loss of one batch: the single definition `train-student` and the Trainer integration share.

`loss = ce_weight·CE + kd_weight·KD + hidden_weight·hidden + pooled_weight·pooled` (plus
`uld_weight·ULD` across tokenizers, see crosstok.py), with no other term; KD is already scaled by
T² inside `kd_loss`. Keeping it in one place is what makes a Hugging Face `Trainer` run
(integration.py) compute exactly what `train-student` computes.
"""

from __future__ import annotations


import torch

from ..cache.cache import Cache
from ..errors import KDCacheError, warn
from ..fused import ChunkTerms, OutputHead, fused_head_loss, kd_terms, rows_of, share
from ..losses import SparseTargets, kd_loss, mix_targets
from ..models import backbone_only, output_head
from ..tasks import CAUSAL_LM, get_task, pooler
from .batching import Batch, trained_targets
from .crosstok import CrossTokenizer, CrossTokenizerLoss, check_cross_tokenizer_cache
from .projections import FeatureProjections, parse_layer_map
from .settings import TrainSettings


def check_loss_settings(settings: TrainSettings, cache: Cache) -> str:
    """The target type to train on (`targets`, default the cache's own); refuse, before any training, a
    type the cache lacks or a loss it cannot compute.

    The divergence/tail rules live in `kd_loss`; it is asked on zero positions, so they are stated once.
    """
    manifest = cache.manifest
    targets = trained_targets(cache, settings.targets)
    if settings.ce_weight:
        get_task(manifest.task).check_gold_labels(manifest)
    if settings.pooled_weight and manifest.pooled_size is None:
        raise KDCacheError("`pooled_weight` > 0 but the cache holds no pooled output (dump with `pooled`)")
    if settings.student_tokenizer:
        check_cross_tokenizer_settings(settings, cache)
    if settings.teachers:
        check_ensemble_settings(settings, cache, targets)
    if not settings.kd_weight:
        return targets
    probe = SparseTargets(ids=torch.zeros(0, 1, dtype=torch.long), logprobs=torch.zeros(0, 1),
                          tail_logprob=torch.zeros(0) if targets == "topk" else None)
    try:
        kd_loss(torch.zeros(0, manifest.num_classes), probe, divergence=settings.loss, tail=settings.tail,
                temperature=settings.temperature)
    except ValueError as error:
        raise KDCacheError(f"`loss` {settings.loss}, `tail` {settings.tail}, `temperature` {settings.temperature:g} "
                           f"with `targets` {targets}: {error}") from None
    return targets


def check_ensemble_settings(settings: TrainSettings, cache: Cache, targets: str) -> None:
    """`teachers` must name teachers of a multi-teacher cache, each holding the target type trained on."""
    names = cache.manifest.teacher_names
    unknown = [name for name in settings.teacher_weights() if name not in names]
    if unknown:
        raise KDCacheError(f"`teachers` names {', '.join(unknown)}, but cache {cache} has "
                           + (f"the teachers {', '.join(names)}" if names else "one teacher (join caches of several "
                              "with `merge --teachers`)"))
    if settings.student_tokenizer:
        raise KDCacheError("`teachers` and `student_tokenizer` cannot be combined (the teachers of one cache share "
                           "its tokenizer; train across tokenizers from a single teacher)")
    for name, teacher in cache.teacher_caches().items():
        if name in settings.teacher_weights() and targets not in teacher.manifest.trainable_targets:
            raise KDCacheError(f"`targets` {targets}: teacher {name} of cache {cache} holds only "
                               f"{'/'.join(teacher.manifest.target_types)} targets")


def check_cross_tokenizer_settings(settings: TrainSettings, cache: Cache) -> None:
    """Training across tokenizers aligns next-token targets only: refuse what it cannot align."""
    if cache.manifest.task != CAUSAL_LM:
        raise KDCacheError(f"`student_tokenizer` is for causal-LM caches; cache {cache} is {cache.manifest.task}")
    check_cross_tokenizer_cache(cache)
    for name in ("hidden_weight", "pooled_weight", "val_fraction"):
        if getattr(settings, name):
            raise KDCacheError(f"`{name}` is not supported with `student_tokenizer` (teacher and student "
                               f"positions differ)")


def variant_start(manifest) -> int | None:
    """The first sample id of a cache's augmented variants (dump-teacher `augment`), None without any."""
    augmentation = manifest.dataset.get("augmentation")
    if augmentation is None:
        return None
    original_rows = augmentation.get("original_rows") if isinstance(augmentation, dict) else None
    if isinstance(original_rows, bool) or not isinstance(original_rows, int) or original_rows < 0:
        raise KDCacheError(f"invalid manifest: dataset.augmentation.original_rows must be a count, got "
                           f"{original_rows!r}")
    return original_rows


class DistillationLoss:
    """The weighted loss of one batch for `model`, as set up by `settings` for `cache`.

    Holds what the terms need besides the batch: the task (which logits face the targets), the
    layer map and the learned feature projections (FitNets; their parameters must be trained with
    the model's), and the student's pooler. Calling it returns `(loss, terms)`, the terms unweighted.
    """

    def __init__(self, settings: TrainSettings, cache: Cache, model: torch.nn.Module):
        self.targets = check_loss_settings(settings, cache)
        manifest = cache.manifest
        self.settings = settings
        self.task = get_task(manifest.task)
        self.num_classes = manifest.num_classes
        self.layer_map = (parse_layer_map(settings.layer_map, manifest, model.config.num_hidden_layers)
                          if settings.hidden_weight > 0 else {})
        self.pooler = pooler(model) if settings.pooled_weight else None
        self.original_rows = variant_start(manifest) if manifest.task == CAUSAL_LM else None
        self.projections: torch.nn.Module = FeatureProjections(
            self.layer_map, model.config.hidden_size, manifest.hidden_sizes, settings.hidden_loss,
            manifest.pooled_size if settings.pooled_weight else None)
        # Several teachers (`teachers`): the KD target is the mixture of theirs (`mix_targets`); the first teacher's
        # targets are the batch's own, the others' are read along (`Batch.teachers`).
        self.mixture = settings.teacher_weights()
        self.own_teacher = manifest.teacher_names[0] if manifest.teacher_names else None
        self.weights = {"ce": settings.ce_weight, "kd": settings.kd_weight, "hidden": settings.hidden_weight,
                        "pooled": settings.pooled_weight, "uld": settings.uld_weight}
        # Across tokenizers: batches come from `cross.collate`, the student's logits range over its own vocabulary.
        # Draws join as estimated probabilities (after a head-tail cache's head, unless `targets` topk asks for the
        # head and exact tail alone).
        self.cross = (CrossTokenizer.from_path(cache, settings.student_tokenizer,
                                               getattr(model.config, "max_position_embeddings", None),
                                               settings.token_map, targets=self.targets)
                      if settings.student_tokenizer else None)
        if self.cross is not None:
            self.num_classes = self.cross.student_vocab_size
            self.cross_terms = CrossTokenizerLoss(settings, self.cross, cache)
        self.model = model
        self.fused = self._fused_head(model) if settings.fused_loss else None

    def _fused_head(self, model: torch.nn.Module) -> OutputHead | None:
        """The head the fused path projects through, or None (with a one-line warning naming why) where it cannot.

        Only a causal LM's classes are its vocabulary: a classifier's output has `num_labels` columns, fewer than
        its hidden states have, so its logits cost nothing worth saving and it keeps the plain path.
        """
        if not self.task.classes_are_vocabulary:
            return None
        try:
            return output_head(model, self.num_classes)
        except KDCacheError as error:
            warn(f"`fused_loss` off, the student's full logits are computed: {error}")
            return None

    def gold_labels(self, batch: Batch, where: torch.Tensor | None = None) -> torch.Tensor:
        """The task's gold labels, or a causal LM's next tokens at `where` [B, L] (across tokenizers CE takes every
        valid token); a causal LM's augmented variants have none (their words were changed, so their next tokens
        are the teacher's business, not the text's: KD only)."""
        labels = self.task.gold_labels(batch) if where is None else batch.next_token_labels(where)
        if self.original_rows is None:
            return labels
        where = batch.targets_at if where is None else where
        is_variant = torch.tensor([sample_id >= self.original_rows for sample_id in batch.sample_ids])
        rows = torch.arange(len(batch.sample_ids))[:, None].expand_as(where)[where]
        return torch.where(is_variant.to(labels.device)[rows.to(labels.device)], -100, labels)

    @property
    def other_teachers(self) -> tuple[str, ...]:
        """The teachers whose rows the batches must carry besides the cache's own (`Cache.sequences(teachers=...)`)."""
        return tuple(name for name in self.mixture if name != self.own_teacher)

    def mixture_terms(self, batch: Batch, labels: torch.Tensor | None, options: dict) -> ChunkTerms:
        """CE and the KD to the mixture of the `teachers`, chunk by chunk: the mixture spreads each teacher's tail
        by the student's own (detached) probabilities, so it is formed per chunk from that chunk's logits, the
        same on the fused and the full-logits path."""
        missing = [name for name in self.other_teachers if name not in batch.teachers]
        if missing:  # a dataset of one's own, read without them
            raise KDCacheError(f"the batch carries no targets of teacher {', '.join(missing)} of `teachers`: read the "
                               f"rows with CacheDataset(cache, teachers={list(self.other_teachers)!r})")
        targets = [(batch if name == self.own_teacher else batch.teachers[name]).sparse_targets(self.targets)
                   for name in self.mixture]
        weights, n, ce = list(self.mixture.values()), targets[0].ids.shape[0], kd_terms(None, labels, **options)

        def terms(logits: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
            mixed = mix_targets([rows_of(target, rows) for target in targets], weights, logits)
            return ce(logits, rows) | {"kd": kd_loss(logits, mixed, **options) * share(logits.shape[0], n)}
        return terms

    @property
    def teacher_layers(self) -> list[int]:
        """The cached hidden layers the batches must carry (`Cache.sequences(hidden_layers=...)`)."""
        return sorted(set(self.layer_map.values()))

    @property
    def matches_features(self) -> bool:
        """Whether hidden or pooled states are matched (then the projections are part of the student)."""
        return bool(self.layer_map) or self.pooler is not None

    def head_terms(self, batch: Batch) -> list[tuple[torch.Tensor | None, ChunkTerms]]:
        """The terms on the student's logits (CE, KD, ULD) as chunk shares (kdcache/fused.py), by the positions
        they take: None for the task's target positions (`Task.student_logits`), or a [B, L] mask. Across
        tokenizers the next-token CE takes every token and KD only the aligned positions."""
        settings = self.settings
        options = {"divergence": settings.loss, "tail": settings.tail, "temperature": settings.temperature}
        labels = self.gold_labels(batch, None if self.cross is None else batch.valid) if settings.ce_weight else None
        if self.cross is None and self.mixture and settings.kd_weight:
            return [(None, self.mixture_terms(batch, labels, options))]
        if self.cross is None:
            targets = batch.sparse_targets(self.targets) if settings.kd_weight else None
            return [(None, kd_terms(targets, labels, **options))] if targets is not None or labels is not None else []
        groups = [(batch.valid, kd_terms(None, labels, **options))] if labels is not None else []
        if settings.kd_weight or settings.uld_weight:
            groups.append((batch.targets_at, self.cross_terms.terms(batch)))
        return groups

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fused = self.fused is not None
        output = model(**batch.model_inputs(), output_hidden_states=self.matches_features or fused,
                       **(backbone_only(batch.input_ids.device) if fused else {}))
        terms: dict[str, torch.Tensor] = {}
        loss = 0.0
        if fused:  # the head's weight is read now: it may have moved since __init__ (device placement)
            head = output_head(self.model, self.num_classes, check=False)
            for where, head_terms in self.head_terms(batch):
                where = batch.targets_at if where is None else where  # a causal LM's targets
                part, part_terms = fused_head_loss(output.hidden_states[-1][where], head, head_terms, self.weights)
                loss, terms = loss + part, terms | part_terms
        else:
            for where, head_terms in self.head_terms(batch):
                logits = (self.task.student_logits(output.logits, batch, self.num_classes) if where is None
                          else output.logits[where][:, :self.num_classes])
                terms |= head_terms(logits, slice(0, logits.shape[0]))
            loss = sum(self.weights[name] * value for name, value in terms.items())
        if self.matches_features:
            pooled = self.pooler(output.hidden_states[-1]) if self.pooler is not None else None
            features = self.projections(output.hidden_states, pooled, batch)
            terms |= features
            loss = sum((self.weights[name] * value for name, value in features.items()), loss)
        return loss, terms
