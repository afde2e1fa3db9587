"""Loading the text a teacher is dumped on: anything Hugging Face `datasets` can load.

Local files are routed to the matching packaged builder by extension, a directory written by
`save_to_disk` goes through `load_from_disk`, and anything else is treated as a hub dataset id.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from ..cache.format import sha256_file
from ..errors import KDCacheError, first_line
from ..sources import DATA_BUILDERS, check_data_source


def load_rows(source: str, split: str = "train") -> datasets.Dataset:
    """Load one split of `source` as a `datasets.Dataset`, with a one-line error on failure."""
    path = Path(source).expanduser()
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise KDCacheError(f"split '{split}' not in {source} (has {', '.join(loaded)})")
                loaded = loaded[split]
            return loaded
        if path.is_file():
            if path.stat().st_size == 0:
                raise KDCacheError(f"dataset {source} is empty")
            builder = DATA_BUILDERS.get(path.suffix)
            if builder is None:
                raise KDCacheError(f"unsupported data file type '{path.suffix}' for {source} "
                                   f"(use one of {', '.join(sorted(DATA_BUILDERS))})")
            loaded = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
            loaded.data.table.validate(full=True)  # e.g. text that is not UTF-8: refused now, not mid-dump
            return loaded
        if path.is_dir():
            return datasets.load_dataset(str(path), split=split)
        check_data_source(source)
        return datasets.load_dataset(source, split=split)
    except KDCacheError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of `datasets` on the user's data is a data problem
        raise KDCacheError(f"cannot load data {source} (split '{split}'): {first_line(error)}") from None


def describe(rows: datasets.Dataset, source: str, split: str, text_column: str) -> dict:
    """What the manifest records about the data: enough for the team that receives the cache to find
    the same data again and notice a change.

    Never the path typed on the dumping machine (`../corpus/transfer.jsonl` means nothing elsewhere):
    local data is named by its file or directory name and identified by the name, size and sha256
    of each file; hub data by its id, config and the `datasets` fingerprint.
    """
    path = Path(source).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(
            file for file in path.rglob("*") if file.is_file()
            and not any(part.startswith(".") for part in file.relative_to(path).parts))
        origin = {"source": portable_name(source), "location": "local",
                  "files": [{"name": file.name if file == path else str(file.relative_to(path)),
                             "bytes": file.stat().st_size, "sha256": sha256_file(file)} for file in files]}
    else:
        origin = {"source": source, "location": "hub", "config_name": rows.info.config_name}
    return origin | {"split": split, "text_column": text_column, "num_rows": len(rows),
                     "fingerprint": getattr(rows, "_fingerprint", None)}


def portable_name(name_or_path: str) -> str:
    """A hub id as it is; a local file or directory by its own name (`./teacher/` -> `teacher`), the part
    of its path that still means something on another machine."""
    path = Path(name_or_path).expanduser()
    return path.resolve().name if path.exists() else name_or_path
