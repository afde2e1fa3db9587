"""`recode`: rewrite a cache into another codec without the teacher.

What can be derived from a cache is exactly what a student could derive from it: a top-k (or head)
can shrink to a smaller k or a mass-adaptive head (dropped ids join the exact tail), log-probs can be
narrowed to 8-bit codes, the layout and compression can change, and a head-tail cache's head alone
is a top-k cache. What needs the teacher is refused: draws cannot be made from top-k targets (the
distribution inside the tail is not in the cache), and a head cannot grow. The new cache is written
like a dump (shards under `.partial` names, then hashed; the manifest last), verified, and gets its
own fingerprint derived from the source's and the recode settings.

Recoding into the compact codec also ranks the ids by how often the cache lists them (format 4, see
cache/codecs.py): a dump cannot, since it writes its first shard before it has seen the ids of the others.
The ranking is kept only if it makes a sample of the rows smaller: the ids' own order can carry structure
that ranking destroys (systematic draws from a nearly flat distribution are evenly spaced in id order, so
their gaps are nearly constant; on a random teacher ranking made such a cache 50% larger).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..cache.cache import Cache, open_cache
from ..cache.codecs import MAX_RANKED_IDS, Codec
from ..cache.format import Manifest, ShardInfo, column_groups, sha256_json, shard_schema
from ..cache.reader import content_sha256
from ..cache.store import CacheStore
from ..cache.teachers import describe_teachers
from ..cache.transfer import Destination, copy_tokenizer
from ..cache.writer import CachedSequence, ShardWriter, to_record_batch
from ..errors import KDCacheError
from ..settings import applies_threads, recorded
from .settings import DumpSettings, RecodeSettings
from .targets import TopKTargets, select_head

RANKING_SAMPLE_ROWS = 256  # rows of the first shard encoded both ways to decide whether ranking pays


@applies_threads
def recode_cache(cache: Path | str, out: Path | str, settings: RecodeSettings = RecodeSettings(),
                 progress: bool = True) -> Manifest:
    """Write the targets of the cache at `cache` in the codec `settings` asks for to `out`; return its manifest.

    A failed recode (a refused source, a full disk) removes `out`, which it created: nothing half-written stays."""
    cache, out = Path(cache), Path(out)
    if out.exists():
        raise KDCacheError(f"`out` {out} already exists: recode writes a new cache")
    try:
        return _recode(cache, out, settings, progress)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _recode(cache: Path, out: Path, settings: RecodeSettings, progress: bool) -> Manifest:
    opened = open_cache(cache)
    source = opened.manifest
    target = _target_settings(source, settings)
    groups = column_groups(target.target_types)
    _check_derivable(source, target)
    opened.verify(progress=progress)  # every teacher of a multi-teacher cache too
    for entry in source.teachers[1:]:  # each other teacher is a cache of its own: recoded alike, shards aligned
        recode_cache(cache / entry["path"], out / entry["path"], settings, progress)
    fingerprint = sha256_json({"recoded_from": source.dump_fingerprint, "settings": recorded(settings)})

    def schema_for(codec: Codec, hidden_sizes: dict[int, int]) -> pa.Schema:
        return shard_schema(top_k=target.top_k, vocab_size=source.num_classes, logprob_dtype=_float_type(target),
                            hidden_sizes=hidden_sizes, dump_fingerprint=fingerprint,
                            target_types=target.target_types, optional_columns=source.optional_columns,
                            pooled_size=source.pooled_size, codec=codec,
                            draws=source.draws if "sampled" in groups else None)

    def rows_of(shard: ShardInfo, hidden_layers: list[int]) -> Iterator[CachedSequence]:
        for row in Cache(opened.store, dataclasses.replace(source, shards=[shard])).sequences(
                hidden_layers=hidden_layers):
            yield _recoded(row, target, keep_topk="topk" in groups, keep_sampled="sampled" in groups)

    codec = target.stored_codec
    if settings.rank_ids and codec.layout == "compact" and source.shards:
        ranked = dataclasses.replace(codec, id_ranking=_id_ranking(opened, "topk" in groups, "sampled" in groups,
                                                                   progress))
        sample = list(itertools.islice(rows_of(source.shards[0], []), RANKING_SAMPLE_ROWS))
        if sample and (_encoded_size(sample, schema_for(ranked, {}), ranked)
                       < _encoded_size(sample, schema_for(codec, {}), codec)):
            codec = ranked
    schema = schema_for(codec, source.hidden_sizes)
    copy_tokenizer(opened.store, source, Destination(out))  # file by file, as checked (no symlink followed)
    shards = []
    for index, shard in enumerate(source.shards):
        writer = ShardWriter(out, schema, shard_rows=shard.rows, prefix="recoded", start_index=index, codec=codec)
        with writer:
            writer.write(list(rows_of(shard, source.hidden_layers)))
            shards += writer.close()
    manifest = dataclasses.replace(
        source, settings=recorded(target) | {"hidden_layers": source.hidden_layers},
        columns={key: value for key, value in source.columns.items() if key != "codec"}
        | {"targets": list(target.target_types), "topk_logprobs": target.logprob_dtype}
        | ({"codec": codec.to_manifest()} if codec.layout == "compact" else {}),
        dump_fingerprint=fingerprint, shards=shards, format_version=codec.format_version,
        stats={key: value for key, value in source.stats.items() if key not in ("fidelity", "shard_stats")}
        | {"fidelity": None, "recoded_from": {"dump_fingerprint": source.dump_fingerprint,
                                              "fidelity": source.stats.get("fidelity")}},
        kdcache_version=__version__,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if "topk" not in groups:
        manifest.stats.pop("captured_mass", None)
    if source.teachers:
        manifest.teachers = describe_teachers(out, manifest, source.teachers)
    if content_sha256(out, manifest, shards) != source.stats.get("content_sha256",
                                                                 content_sha256(cache, source, source.shards)):
        raise KDCacheError(f"recoding {cache} changed its rows: nothing was committed")
    Cache(CacheStore(out), manifest).verify(progress=progress)
    manifest.save(out)
    return manifest


def _encoded_size(rows: list[CachedSequence], schema: pa.Schema, codec: Codec) -> int:
    """Bytes of `rows` as one record batch of a shard in `codec`; without the schema's metadata, which a whole
    shard carries once, not once per sample."""
    schema = schema.remove_metadata()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema, options=codec.write_options()) as writer:
        writer.write_batch(to_record_batch(rows, schema, codec))
    return sink.getvalue().size


def _id_ranking(cache: Cache, topk: bool, sampled: bool, progress: bool) -> tuple[int, ...]:
    """The ids the source lists most often in the target groups the new cache keeps (head, draws), most frequent
    first, ties by id: at most MAX_RANKED_IDS of them, each listed at least once."""
    counts = np.zeros(cache.manifest.num_classes, dtype=np.int64)
    pending, held = [], 0
    for row in tqdm(cache.sequences(hidden_layers=[]), total=cache.manifest.total_rows, desc="rank ids", unit="row",
                    disable=not progress):
        listed = ([row.topk_ids[row.topk_logprobs > -np.inf]] if topk else []) + \
            ([row.sampled_ids.values] if sampled else [])
        pending += listed
        held += sum(len(ids) for ids in listed)
        if held > 1 << 22:  # one bincount per few million ids, not one per row over the whole vocabulary
            counts += np.bincount(np.concatenate(pending).astype(np.int64), minlength=len(counts))
            pending, held = [], 0
    if pending:
        counts += np.bincount(np.concatenate(pending).astype(np.int64), minlength=len(counts))
    listed = np.flatnonzero(counts)
    ranked = listed[np.lexsort((listed, -counts[listed]))][:MAX_RANKED_IDS]
    return tuple(int(token) for token in ranked)


def _target_settings(source: Manifest, settings: RecodeSettings) -> DumpSettings:
    """The source's dump settings with the recode's codec: validated like a dump's own."""
    known = {field.name for field in dataclasses.fields(DumpSettings)}
    dumped = {name: value for name, value in source.settings.items() if name in known}
    dumped["hidden_layers"] = tuple(dumped.get("hidden_layers", ()))
    dumped.setdefault("sampling", "independent")  # the draws of a cache from before `sampling` existed
    changes = {"logprob_dtype": settings.logprob_dtype, "codec": settings.codec, "compression": settings.compression,
               "top_p": settings.top_p, "targets": settings.targets or _dumped_targets(source),
               "top_k": settings.top_k or source.top_k}
    if changes["codec"] == "plain" and changes["logprob_dtype"] == "uint8":
        changes["logprob_dtype"] = "float16" if source.codec.logprobs == "uint8" else source.codec.logprobs
    return DumpSettings(**dumped | changes)


def _dumped_targets(source: Manifest) -> str:
    return "both" if source.target_types == ("topk", "sampled") else source.target_types[0]


def _check_derivable(source: Manifest, target: DumpSettings) -> None:
    have, want = source.target_types, target.target_types
    drawn_from_teacher = "sampled" in have
    if "sampled" in want and not drawn_from_teacher:
        raise KDCacheError(f"`targets` {target.targets}: sampled draws cannot be made from a {'/'.join(have)} cache "
                           f"(the teacher's distribution beyond the listed ids is not in it); dump the teacher again "
                           f"with `targets` sampled")
    if "head-tail" in want and ("head-tail" not in have or target.top_k != source.top_k):
        raise KDCacheError(f"`targets` head-tail needs a head-tail cache with the same head (`top_k` {source.top_k}): "
                           f"a head cannot grow, and shrinking it would need draws from the teacher; dump again")
    if "topk" in want and not {"topk", "head-tail"} & set(have):
        raise KDCacheError(f"`targets` topk: a {'/'.join(have)} cache lists no exact head to keep")
    if "topk" in column_groups(want) and target.top_k > source.top_k:
        raise KDCacheError(f"`top_k` {target.top_k} is more than the source's {source.top_k}: the teacher would be "
                           f"needed for the missing ids")
    if target.codec == "plain" and source.settings.get("top_p") is not None:
        raise KDCacheError("`codec` plain stores a fixed k per position; the source lists fewer at some positions")


def _float_type(target: DumpSettings) -> str:
    return target.logprob_dtype if target.logprob_dtype != "uint8" else "float32"


def _recoded(row: CachedSequence, target: DumpSettings, *, keep_topk: bool, keep_sampled: bool) -> CachedSequence:
    """One row with its head re-selected (smaller k, top_p) and the target groups the new cache keeps."""
    changes = {}
    if keep_topk:
        head = select_head(TopKTargets(ids=torch.from_numpy(row.topk_ids.astype(np.int64)),
                                       logprobs=torch.from_numpy(row.topk_logprobs.astype(np.float32)),
                                       tail_logprob=torch.from_numpy(row.tail_logprob.astype(np.float32)),
                                       next_logprob=torch.zeros(len(row.tail_logprob))),
                           top_k=target.top_k, top_p=target.top_p)
        dtype = np.float16 if target.logprob_dtype == "float16" else np.float32
        changes |= {"topk_ids": head.ids.numpy(), "topk_logprobs": head.logprobs.numpy().astype(dtype),
                    "tail_logprob": head.tail_logprob.numpy()}
    else:
        changes |= {"topk_ids": None, "topk_logprobs": None, "tail_logprob": None}
    if not keep_sampled:
        changes |= {"sampled_ids": None, "sampled_counts": None}
    return dataclasses.replace(row, **changes)
