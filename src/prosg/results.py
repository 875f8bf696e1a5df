"""Result keys and their statistics over seeds: the one module that builds, parses and averages them.

A metric key is ``<split>/<slice>/<metric>``: split ``train``/``val``/``test``; slice ``all`` or
``<task>/n<n>`` (free-running scores put ``gen/`` in front); metric ``acc``, ``area``, ``half_life``,
``local_acc`` or a distance bucket ``acc@<lo>-<hi>`` (``hi`` is ``inf`` for the open last bucket).
Split-wide metrics have no slice: ``<split>/ppl``, ``train/loss``. A ``ForgettingCurve`` names its
buckets ``acc/<lo>-<hi>``; ``ForgettingMetrics`` files them as ``acc@<lo>-<hi>`` under each slice.

A run's ``metrics.json`` is strict JSON (NaN -> null, +-inf -> "inf"/"-inf"); ``flat_metrics`` reads it
back into one ``{key: float}`` per run, the rows that sweep tables, plots, the demo and notebooks share.
Statistics over seeds are the mean and sample std (``statistics.stdev``) of the non-NaN values.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Sequence, TypeVar

ALL = "all"  # the slice over every task and fact count
FREE = "free"  # the slices of free-running metrics (prosg.lmeval): <split>/free/<mode>/...
ACC, AREA, HALF_LIFE, LOCAL_ACC, PPL, LOSS = "acc", "area", "half_life", "local_acc", "ppl", "loss"
# what a forgetting curve reports per distance bucket besides accuracy: binding errors (another prompt
# answer), answers outside the prompt, the reference lines, and the distances the bucket really holds
BIND_ERR, NOT_PROMPT, CEILING, CHANCE = "bind_err", "not_prompt", "ceiling", "chance"
COUNT, DMIN, DMAX = "n", "dmin", "dmax"
BUCKET_STATS = (ACC, BIND_ERR, NOT_PROMPT, CEILING, CHANCE, COUNT, DMIN, DMAX)
SPLITS = ("test", "val", "train")  # the parts of metrics.json, in the order rows read them
RUN_COLUMNS = ("wall_s", "global_step")  # per-run numbers of metrics.json besides the split metrics
SIZE_COLUMNS = {"memory": "memory", "trainable params": "trainable_params"}  # table title -> key in "sizes"
_BOUNDS = r"(\d+)-(\d+|inf)"
_BUCKET_RE = re.compile(rf"^{ACC}@{_BOUNDS}$")
_STAT_RE = re.compile(rf"^(\w+)@{_BOUNDS}$")
_CURVE_RE = re.compile(rf"^(\w+)/{_BOUNDS}$")
_LABEL_RE = re.compile(rf"^{_BOUNDS}$")

V = TypeVar("V")
Row = Mapping[str, Any]  # a collected run: at least "seed" and "metrics" ({key: float})


# -- building keys -------------------------------------------------------------------------------
def _bound(x: float) -> str:
    """A bucket edge as key text: an int, or ``inf``."""
    return "inf" if math.isinf(x) else str(int(x))


def bucket_label(lo: int, hi: float) -> str:
    """``lo-hi`` (``lo-inf`` for the open bucket): a bucket by itself, as results.json names it."""
    return f"{lo}-{_bound(hi)}"


def bucket_metric(lo: int, hi: float, stat: str = ACC) -> str:
    """``<stat>@lo-hi`` (default ``acc@lo-hi``): the metric name of a distance bucket in a flat key."""
    return f"{stat}@{bucket_label(lo, hi)}"


def curve_bucket(lo: int, hi: float, stat: str = ACC) -> str:
    """``<stat>/lo-hi``: a bucket statistic as ``ForgettingCurve.compute()`` names it."""
    return f"{stat}/{bucket_label(lo, hi)}"


def flat_metric(curve_name: str) -> str:
    """A ``ForgettingCurve`` name -> the metric part of a flat key (``acc/0-4`` -> ``acc@0-4``)."""
    m = _CURVE_RE.match(curve_name)
    return bucket_metric(int(m[2]), _hi(m[3]), m[1]) if m and m[1] in BUCKET_STATS else curve_name


def slice_name(task: str, n_facts: int) -> str:
    """``<task>/n<n>``: the slice of one task at one fact count."""
    return f"{task}/n{n_facts}"


def slice_key(slice_: str, metric: str) -> str:
    """``<slice>/<metric>``: a key as ``ForgettingMetrics.compute()`` returns it (no split yet)."""
    return f"{slice_}/{metric}"


def prefix(split: str, slice_: str | None = ALL) -> str:
    """``<split>/<slice>`` (``<split>`` for split-wide metrics): what keys of one slice start with."""
    return split if slice_ is None else f"{split}/{slice_}"


def metric_key(split: str, slice_: str | None, metric: str) -> str:
    """``<split>/<slice>/<metric>``, or ``<split>/<metric>`` for a split-wide metric (slice None)."""
    return f"{prefix(split, slice_)}/{metric}"


# -- parsing keys --------------------------------------------------------------------------------
def _hi(text: str) -> float:
    """An upper bucket edge from key text (``inf`` or an int)."""
    return math.inf if text == "inf" else int(text)


def parse_bounds(label: str) -> tuple[int, float] | None:
    """``lo-hi`` -> (lo, hi) with hi = inf for ``lo-inf``; None if it is not a bucket label."""
    m = _LABEL_RE.match(label)
    return (int(m[1]), _hi(m[2])) if m else None


@dataclass(frozen=True)
class Key:
    """A parsed metric key; ``str(key)`` gives the key back."""

    split: str
    slice: str | None  # None for split-wide metrics (ppl, loss)
    metric: str

    def __str__(self) -> str:
        return metric_key(self.split, self.slice, self.metric)

    @property
    def prefix(self) -> str:
        """``<split>/<slice>`` (or ``<split>``)."""
        return prefix(self.split, self.slice)

    @property
    def bucket(self) -> tuple[int, float] | None:
        """(lo, hi) of a distance-bucket accuracy, hi = inf for the open bucket; None for other metrics."""
        m = _BUCKET_RE.match(self.metric)
        return (int(m[1]), _hi(m[2])) if m else None

    @property
    def bucket_stat(self) -> tuple[str, int, float] | None:
        """(stat, lo, hi) of any per-bucket statistic (``bind_err@16-32`` -> ("bind_err", 16, 32)); else None."""
        m = _STAT_RE.match(self.metric)
        return (m[1], int(m[2]), _hi(m[3])) if m and m[1] in BUCKET_STATS else None


def parse_key(key: str) -> Key | None:
    """``split/slice/metric`` (or ``split/metric``) -> Key; None for a name without a split (``wall_s``)."""
    parts = key.split("/")
    if len(parts) < 2:
        return None
    return Key(parts[0], "/".join(parts[1:-1]) or None, parts[-1])


def of_split(metrics: Mapping[str, V], split: str) -> dict[str, V]:
    """The entries of ``metrics`` whose key belongs to ``split`` (``test/...``)."""
    return {k: v for k, v in metrics.items() if (p := parse_key(k)) is not None and p.split == split}


def bucket_keys(keys: Iterable[str], under: str | None = None) -> list[tuple[str, int, float]]:
    """The distance-bucket keys among ``keys`` (only those under prefix ``under``) as (key, lo, hi), nearest first."""
    found = []
    for k in keys:
        parsed = parse_key(k)
        if parsed is not None and parsed.bucket is not None and (under is None or parsed.prefix == under):
            found.append((*parsed.bucket, k))
    return [(k, lo, hi) for lo, hi, k in sorted(found)]


def is_open_bucket(key: str) -> bool:
    """Whether ``key`` is the open last distance bucket (``.../acc@lo-inf``)."""
    bucket = parsed.bucket if (parsed := parse_key(key)) is not None else None
    return bucket is not None and math.isinf(bucket[1])


def sort_labels(labels: Iterable[str]) -> list[str]:
    """Bucket labels (``lo-hi``) in distance order, ``lo-inf`` after every finite bucket at ``lo``."""
    return sorted(labels, key=lambda b: parse_bounds(b) or (math.inf, math.inf))


def is_metric_column(name: str) -> bool:
    """Whether a results.csv column holds a number of the run (else it is an axis or run/status/seed)."""
    return parse_key(name) is not None or name in RUN_COLUMNS or name in SIZE_COLUMNS.values()


def headline_keys(rows: Sequence[Row], split: str | None = None, slice_: str = ALL,
                  finite: bool = False) -> dict[str, str]:
    """Table columns (title -> key): acc, area, half-life, nearest and farthest bucket with data, local acc, ppl.

    ``split`` None: ``test`` if any run logged a test metric, else ``val``. ``finite``: leave the open
    bucket out of near/far. Only keys some run logged are kept.
    """
    logged = {k for r in rows for k in r["metrics"]}
    if split is None:
        split = "test" if any((p := parse_key(k)) and p.split == "test" for k in logged) else "val"
    where = prefix(split, slice_)
    cols = {"acc": metric_key(split, slice_, ACC), "area": metric_key(split, slice_, AREA),
            "half-life": metric_key(split, slice_, HALF_LIFE)}
    with_data = {k for r in rows for k, v in r["metrics"].items() if not math.isnan(v)}
    present = [k for k, _, hi in bucket_keys(with_data, under=where) if not (finite and math.isinf(hi))]
    if present:
        near, far = present[0], present[-1]
        cols[f"near {parse_key(near).metric}"] = near
        if far != near:
            cols[f"far {parse_key(far).metric}"] = far
    cols["local acc"] = metric_key(split, slice_, LOCAL_ACC)
    cols["ppl"] = metric_key(split, None, PPL)
    return {title: key for title, key in cols.items() if key in logged}


# -- metrics.json <-> numbers -------------------------------------------------------------------
def json_number(x: float) -> float | str | None:
    """NaN -> null (empty bucket), +-inf -> "inf"/"-inf" (e.g. a half-life never reached): strict JSON."""
    if math.isnan(x):
        return None
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def number(x: Any) -> float:
    """Inverse of ``json_number`` (also accepts CSV text, "" = NaN)."""
    if x is None or x == "":
        return math.nan
    return float(x)


def json_scalars(metrics: Mapping[str, float]) -> dict[str, float | str | None]:
    """``{key: float}`` -> the same, sorted by key, as strict-JSON values."""
    return {k: json_number(float(v)) for k, v in sorted(metrics.items())}


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """A run's metrics.json -> ``{key: float}``: test, val, train metrics, wall_s, global_step, sizes."""
    flat = {k: number(v) for part in SPLITS for k, v in (metrics.get(part) or {}).items()}
    flat.update({k: number(metrics.get(k)) for k in RUN_COLUMNS})
    sizes = metrics.get("sizes") or {}
    flat.update({k: number(sizes[k]) for k in SIZE_COLUMNS.values() if k in sizes})
    return flat


# -- statistics over seeds ------------------------------------------------------------------------
class Stats(NamedTuple):
    """Mean and sample std over seeds, and how many seeds had a value."""

    mean: float
    std: float  # NaN with fewer than two values, or when a value is infinite
    n: int

    def band(self) -> float:
        """The std for an error bar or band: 0 for a single value (no spread seen), NaN with none."""
        return 0.0 if self.n == 1 else self.std


def mean_std(values: Iterable[float]) -> Stats:
    """Mean and sample std over the non-NaN values (inf propagates), and how many there were."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return Stats(math.nan, math.nan, 0)
    if any(math.isinf(v) for v in vals):  # e.g. a half-life never reached: the mean is inf, a std means nothing
        return Stats(statistics.fmean(vals), math.nan, len(vals))
    return Stats(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan, len(vals))


def cell_stats(rows: Iterable[Row], key: str) -> Stats:
    """``mean_std`` of ``key`` over the runs of one cell (a missing key counts as NaN)."""
    return mean_std(r["metrics"].get(key, math.nan) for r in rows)


def per_seed(rows: Iterable[Row], key: str) -> dict[str, float]:
    """``{seed: value}`` of ``key`` over the runs of one cell, NaN (and missing) values left out."""
    return {str(r["seed"]): r["metrics"][key] for r in rows if not math.isnan(r["metrics"].get(key, math.nan))}


def format_stats(s: Stats, of: int | None = None) -> str:
    """``mean ± std`` (3 decimals); ``(n=k)`` when only k of the ``of`` seeds had a value; ``n/a`` with none."""
    if s.n == 0 or math.isnan(s.mean):
        return "n/a"
    if math.isinf(s.mean):
        text = "inf" if s.mean > 0 else "-inf"
    else:
        text = f"{s.mean:.3f}" if math.isnan(s.std) else f"{s.mean:.3f} ± {s.std:.3f}"
    return text if of is None or s.n == of else f"{text} (n={s.n})"


# -- the forgetting table: per group and distance bucket, every bucket statistic over seeds ---------
def forgetting_table(rows: Sequence[Row], group_of: Any, split: str = "test",
                     slice_: str = ALL) -> dict[tuple[str, ...], dict[str, dict[str, dict[str, Any]]]]:
    """group -> bucket label -> stat -> {seeds, mean, std}, over the runs of each group.

    ``group_of(row)`` names a row's group (a tuple of labels). Buckets are those with data under
    ``<split>/<slice>``, in distance order; stats are ``BUCKET_STATS`` (accuracy, binding error, answers
    outside the prompt, value-set ceiling, chance, answers counted, distances held).
    """
    where = prefix(split, slice_)
    groups: dict[tuple[str, ...], list[Row]] = {}
    for r in rows:
        if r["metrics"]:
            groups.setdefault(tuple(group_of(r)), []).append(r)
    table: dict = {}
    for g, group in groups.items():
        cells: dict[str, dict[str, dict[str, Any]]] = {}
        with_data = {k for r in group for k, v in r["metrics"].items() if not math.isnan(v)}
        for key, lo, hi in bucket_keys(with_data, under=where):
            label = bucket_label(lo, hi)
            for stat in BUCKET_STATS:
                k = metric_key(split, slice_, bucket_metric(lo, hi, stat))
                seeds = per_seed(group, k)
                s = mean_std(seeds.values())
                cells.setdefault(label, {})[stat] = {"seeds": seeds, "mean": s.mean, "std": s.band()}
        table[g] = {b: cells[b] for b in sort_labels(cells)}
    return table


def bucket_range(cell: dict[str, dict[str, Any]]) -> str:
    """``lo–hi`` distances a bucket held (over every seed)."""
    lo = min((v for v in cell[DMIN]["seeds"].values()), default=math.nan)
    hi = max((v for v in cell[DMAX]["seeds"].values()), default=math.nan)
    return "–" if math.isnan(lo) else f"{int(lo)}–{int(hi)}"


def md_row(cells: Iterable[str]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(cells) + " |"


def md_head(head: Sequence[str]) -> list[str]:
    """A markdown table's header row and its separator."""
    return [md_row(head), "|" + "|".join("---" for _ in head) + "|"]


def forgetting_markdown(table: dict, group_names: Sequence[str]) -> str:
    """The forgetting table as markdown: per group and bucket ``acc ± std`` (%) with the binding error,
    then the distances each bucket really held, chance and the value-set ceiling (from the data)."""
    buckets = sort_labels({b for cells in table.values() for b in cells})
    head = [*group_names, *(f"d {b}" for b in buckets)]
    lines = md_head(head)
    pct = lambda c, s: f"{100 * c[s]['mean']:.1f}"  # noqa: E731
    for g, cells in table.items():
        vals = []
        for b in buckets:
            c = cells.get(b)
            if c is None or math.isnan(c[ACC]["mean"]):
                vals.append("–")
                continue
            std = "" if math.isnan(c[ACC]["std"]) else f" ± {100 * c[ACC]['std']:.1f}"
            bind = "" if math.isnan(c[BIND_ERR]["mean"]) else f" (bind {pct(c, BIND_ERR)})"
            vals.append(f"{pct(c, ACC)}{std}{bind}")
        lines.append(md_row([*g, *vals]))
    ref = next(iter(table.values()), {})
    pad = [""] * (len(group_names) - 1)

    def row(title: str, fn: Any) -> str:
        return md_row([title, *pad, *(fn(ref[b]) if b in ref else "–" for b in buckets)])

    lines.append(row("*distances*", bucket_range))
    lines.append(row("*chance / value-set ceiling*", lambda c: f"{pct(c, CHANCE)} / {pct(c, CEILING)}"))
    return "\n".join(lines)
