"""The one column table in cache/format.py describes what the shards really hold."""

from __future__ import annotations

import pyarrow as pa

import kdcache
from kdcache.cache.format import COLUMNS, HIDDEN_PREFIX, STORED_TYPES


def innermost(data_type: pa.DataType) -> pa.DataType:
    while pa.types.is_list(data_type) or pa.types.is_fixed_size_list(data_type):
        data_type = data_type.value_type
    return data_type


def test_every_stored_column_is_in_the_table_with_its_arrow_type(cache_dir):
    cache = kdcache.open_cache(cache_dir)
    schema = cache.open_shard(cache.manifest.shards[0]).schema
    for field in schema:
        name = HIDDEN_PREFIX if field.name.startswith(HIDDEN_PREFIX) else field.name
        assert name in COLUMNS, f"column {field.name} is missing from the format table"
        assert innermost(field.type) in [STORED_TYPES[stored].arrow for stored in COLUMNS[name]], field.name


def test_a_column_widens_to_one_torch_dtype_whatever_it_is_stored_as():
    for name, alternatives in COLUMNS.items():
        assert len({STORED_TYPES[stored].torch for stored in alternatives}) == 1, name
    for stored, types in STORED_TYPES.items():
        assert types.numpy.__name__ == stored and pa.from_numpy_dtype(types.numpy) == types.arrow, stored
