"""Datasets on disk: ``{split}.jsonl`` (or ``.parquet``) plus ``manifest.json`` with checksums.

The manifest records the generator version, seed, every split's task knobs, counts per split and
a sha256 per file, so a stored set can be verified (``read_dataset``) and traced back to the
config that made it. Writing is deterministic: the same source gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from prosg import __version__
from prosg.data.tasks import GENERATOR_VERSION, default_bucket_edges
from prosg.errors import ConfigError, DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FORMATS = ("jsonl", "parquet")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def utf8_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file; a line that is not UTF-8 is a DataError naming file, line and byte."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    "save the file as UTF-8"
                ) from None


def _encode_line(ex: dict[str, Any]) -> str:
    # sort_keys + fixed separators: identical bytes for identical examples, whatever the dict order.
    return json.dumps(ex, sort_keys=True, separators=(",", ":")) + "\n"


def _examples_info(data: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Manifest info for bare examples (no DataModule): what can be read off the data itself."""
    exs = [ex for split in data.values() for ex in split]
    if not exs:
        raise DataError("no examples to write; give at least one example")
    max_r = max(len(ex["response_ids"]) for ex in exs)
    return {
        "source": "examples",
        "vocab_size": 1 + max(max(ex["prompt_ids"] + ex["response_ids"]) for ex in exs),
        "pad_id": 0,
        "bucket_edges": default_bucket_edges(max_r),
        "max_len": max(len(ex["prompt_ids"]) + len(ex["response_ids"]) for ex in exs),
        "tasks": list(dict.fromkeys(ex["task"] for ex in exs)),
    }


def _write_parquet(examples: Iterable[dict[str, Any]], path: Path) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("format 'parquet' needs pyarrow; `pip install pyarrow` or use format jsonl") from None
    rows = list(examples)
    fields = ("prompt_ids", "response_ids", "answer_kind", "distance", "loss_weight", "task", "n_facts")
    cols = {k: [ex[k] for ex in rows] for k in fields}
    cols["candidates"] = [ex.get("candidates", []) for ex in rows]
    cols["chance"] = [ex.get("chance", math.nan) for ex in rows]
    cols["meta"] = [json.dumps(ex.get("meta", {}), sort_keys=True) for ex in rows]  # heterogeneous dicts -> JSON text
    schema = pa.schema([
        ("prompt_ids", pa.list_(pa.int64())), ("response_ids", pa.list_(pa.int64())),
        ("answer_kind", pa.list_(pa.int64())), ("distance", pa.list_(pa.int64())),
        ("loss_weight", pa.list_(pa.float64())), ("task", pa.string()), ("n_facts", pa.int64()),
        ("candidates", pa.list_(pa.int64())), ("chance", pa.float64()), ("meta", pa.string()),
    ])
    pq.write_table(pa.table(cols, schema=schema), path)
    return len(rows)


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path} is parquet, which needs pyarrow; `pip install pyarrow`") from None
    rows = pq.read_table(path).to_pylist()
    for row in rows:
        row["meta"] = json.loads(row["meta"])
    return rows


def write_dataset(source: Any, out_dir: str | Path, fmt: str = "jsonl", splits: list[str] | None = None,
                  overwrite: bool = False) -> Path:
    """Write a DataModule's splits (or ``{split: examples}``, a list = train) to ``out_dir``; returns the manifest."""
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} unknown; use one of {FORMATS}")
    out = Path(out_dir)
    if (out / MANIFEST).exists() and not overwrite:
        raise ConfigError(f"{out} already holds a dataset ({MANIFEST}); choose another --out or pass --overwrite")
    if isinstance(source, list):
        source = {"train": source}
    if isinstance(source, Mapping):
        available = [s for s in source if len(source[s])]
        get = lambda s: iter(source[s])  # noqa: E731
        info_of = lambda: _examples_info(source)  # noqa: E731
    else:  # a DataModule: split_names(), examples(split), dataset_info()
        available = source.split_names()
        get = source.examples
        info_of = source.dataset_info
    chosen = available if splits is None else list(splits)
    missing = [s for s in chosen if s not in available]
    if missing:
        raise ConfigError(f"split(s) {missing} not available (have {available}); drop them from --splits")
    existing = [name for name in [*(f"{s}.{fmt}" for s in chosen), MANIFEST] if (out / name).exists()]
    if existing and not overwrite:  # e.g. the user's own train.jsonl in a directory without a manifest
        raise ConfigError(
            f"{out} already has {', '.join(existing)}, which this build would replace; choose another --out or "
            "pass --overwrite"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(
            f"cannot write the dataset to {str(out)!r} ({e.strerror or type(e).__name__}); choose a writable --out"
        ) from None
    files: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for split in chosen:
        name = f"{split}.{fmt}"
        tmp = out / (name + ".tmp")
        if fmt == "jsonl":
            n = 0
            with open(tmp, "w", encoding="utf-8") as f:
                for ex in get(split):
                    f.write(_encode_line(ex))
                    n += 1
        else:
            n = _write_parquet(get(split), tmp)
        os.replace(tmp, out / name)
        counts[split] = n
        files[split] = {
            "file": name, "format": fmt, "sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size
        }
    info = info_of()
    manifest = {
        "format_version": FORMAT_VERSION,
        "prosg_version": __version__,
        "generator_version": info.get("generator_version", GENERATOR_VERSION),
        "seed": info.get("seed"),
        "counts": counts,
        "files": files,
        "info": info,
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a stored dataset directory (DataError if missing or unreadable)."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise DataError(
            f"{mpath} not found: {path} is not a stored dataset; build one with `prosg data build --out {path}`"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{mpath} is not valid JSON ({e.msg}, line {e.lineno}); rebuild the dataset") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{mpath} is not a manifest (a JSON object); rebuild the dataset with `prosg data build`")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{mpath} has format_version {manifest.get('format_version')!r}, this prosg reads {FORMAT_VERSION}; "
            "rebuild the dataset"
        )
    for key in ("files", "counts"):
        if not isinstance(manifest.get(key), dict):
            raise DataError(
                f"{mpath} has no {key!r} mapping (every split's file and example count); it was not written by "
                "`prosg data build` or was edited: rebuild the dataset"
            )
    for split, entry in manifest["files"].items():
        absent = [k for k in ("file", "format", "sha256") if not isinstance(entry, dict) or k not in entry]
        if absent or split not in manifest["counts"]:
            what = f"keys {absent}" if absent else "an example count"
            raise DataError(f"{mpath}: the {split!r} entry lacks {what}; rebuild the dataset")
    return manifest


def read_dataset(
    path: str | Path, splits: list[str] | None = None, verify: bool = True
) -> dict[str, list[dict[str, Any]]]:
    """Examples per split from a stored dataset, after checking every file's sha256 against the manifest."""
    root = Path(path)
    manifest = read_manifest(root)
    files = manifest["files"]
    chosen = list(files) if splits is None else list(splits)
    out: dict[str, list[dict[str, Any]]] = {}
    for split in chosen:
        if split not in files:
            raise DataError(f"{root} has no {split} split (has {sorted(files)}); rebuild with that split")
        entry = files[split]
        fpath = root / entry["file"]
        if not fpath.is_file():
            raise DataError(f"{fpath} is listed in {MANIFEST} but missing; rebuild the dataset")
        if verify:
            actual = sha256_file(fpath)
            if actual != entry["sha256"]:
                raise DataError(
                    f"checksum mismatch for {fpath}: manifest says sha256 {entry['sha256'][:16]}..., file has "
                    f"{actual[:16]}...; the file was modified or corrupted, rebuild it with `prosg data build`"
                )
        if entry["format"] == "parquet":
            exs = _read_parquet(fpath)
        else:
            exs = []
            for lineno, line in utf8_lines(fpath):
                try:
                    exs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{fpath}:{lineno}: bad JSON ({e.msg}); rebuild the dataset") from None
        if len(exs) != manifest["counts"][split]:
            raise DataError(
                f"{fpath} has {len(exs)} examples, manifest says {manifest['counts'][split]}; rebuild the dataset"
            )
        out[split] = exs
    return out
