"""Collecting a sweep: every run's metrics.json -> results.csv, results.md (mean ± std over seeds), plots.

``--collect`` (also run at the end of every sweep) writes into ``out_dir``: ``results.csv`` (one row
per run: run, status, seed, the axes, then every metric, ``memory`` and ``trainable_params``),
``results.md`` (one row per grid cell: mean ± std over seeds of the headline metrics, then the
memory and trainable parameters; then the forgetting table: accuracy and binding error per distance
bucket, with the distances each bucket held, chance and the value-set ceiling; then, for runs with the
free-running instruction evaluation (``prosg.lmeval``), its compliance tables) and PNG plots:
``forgetting.png`` (accuracy by distance from the prompt), ``acc_vs_rank.png`` (against a numeric
``rank`` axis), ``acc_vs_memory.png`` (against the numbers a sample's memory holds, state + method,
drawn when runs differ in it) and ``compliance_<mode>.png`` (free-running compliance by distance, per
decoding mode).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection

from prosg import results
from prosg.sweep.runner import read_json, read_status
from prosg.sweep.spec import Axis, Run, Sweep, reseed
from prosg.sweep.tuning import best_per_cell, planned_runs, tuning_markdown

MEMORY = results.SIZE_COLUMNS["memory"]
FREE = results.FREE


@dataclass
class Collected:
    """What ``collect`` found and wrote."""

    rows: list[dict[str, Any]]  # one per run: run, status, seed, labels, axes, metrics
    summary: list[dict[str, Any]]  # one per grid cell: labels, n, and Stats (mean, std, n) per column
    columns: dict[str, str]  # column title -> metric key: the headline metrics, then the sizes
    problems: list[dict[str, Any]]  # runs that are not done: name, status, error, log
    files: list[Path]
    notes: list[str]


def _read_runs(out: Path, runs: list[Run]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per run (with its flat metrics when it is done), and the runs that are not done."""
    rows, problems = [], []
    for run in runs:
        d = out / run.name
        status = read_status(d)
        state = status.get("status", "missing")
        metrics = read_json(d / "metrics.json") if state == "done" else None
        if metrics is None:
            log = status.get("log") or (str(d / "log.txt") if (d / "log.txt").exists() else "")
            problems.append({"name": run.name, "status": state if state != "done" else "no metrics.json",
                             "error": status.get("error", ""), "log": log})
        rows.append({"run": run.name, "status": state, "seed": run.seed, "labels": run.labels, "axes": run.axes,
                     "metrics": results.flat_metrics(metrics) if metrics else {}})
    return rows, problems


def confirmation_runs(sweep: Sweep, runs: list[Run], rows: list[dict[str, Any]] | None = None) -> tuple[list[Run], list[str]]:
    """The chosen setting of every tuned cell whose tuning runs are all done, on each of ``tune.seeds``; and the
    cells still waiting for their tuning runs (their choice is not made yet). ``rows``: ``runs`` already read."""
    if sweep.tune is None or not sweep.tune.seeds:
        return [], []
    if rows is None:
        rows, _ = _read_runs(sweep.out_dir, runs)
    axis_names = [a.name for a in sweep.axes]
    waiting = {sweep.tune.cell(r["labels"], axis_names) for r in rows if not r["metrics"]}
    by_name = {r.name: r for r in runs}
    done = [r for r in rows if r["metrics"] and sweep.tune.cell(r["labels"], axis_names) not in waiting]
    confirm = [reseed(by_name[b["runs"][0]["run"]], seed, sweep.seed_keys)
               for b in best_per_cell(done, sweep.tune, axis_names) for seed in sweep.tune.seeds]
    return confirm, ["-".join(c) or "run" for c in sorted(waiting)]


def collect(sweep: Sweep, runs: list[Run], plots: bool = True) -> Collected:
    """Read every run's metrics.json (with a tuned sweep's confirmation runs); write results.csv, results.md and
    plots into out_dir; print the table."""
    out = sweep.out_dir
    out.mkdir(parents=True, exist_ok=True)
    rows, problems = _read_runs(out, runs)
    names = {r.name for r in runs}
    confirm = [r for r in confirmation_runs(sweep, runs, rows)[0] if r.name not in names]
    more_rows, more_problems = _read_runs(out, confirm)
    rows, problems = rows + more_rows, problems + more_problems
    axis_names = [a.name for a in sweep.axes]
    done = [r for r in rows if r["metrics"]]
    headline = results.headline_keys(done)
    sizes = {title: key for title, key in results.SIZE_COLUMNS.items() if any(key in r["metrics"] for r in done)}
    columns = {**headline, **sizes}
    files = [_write_csv(out / "results.csv", rows, axis_names)]

    cells: dict[tuple, list[dict]] = {}
    for r in done:
        cells.setdefault(tuple(r["labels"].get(a, "") for a in axis_names), []).append(r)
    summary = [
        {"labels": dict(zip(axis_names, labels)), "n": len(group),
         **{title: results.cell_stats(group, key) for title, key in columns.items()}}
        for labels, group in cells.items()
    ]
    notes: list[str] = []
    best = None
    if sweep.tune is not None:
        planned = planned_runs([r.labels for r in runs], sweep.tune, axis_names)
        best = best_per_cell(done, sweep.tune, axis_names, planned)
    if plots and done:
        files += _plots(sweep, done, best, headline.get("acc"), out, notes)
    md = _markdown(sweep, axis_names, summary, headline, columns, rows, problems, notes)
    if done:
        split = results.parse_key(headline["acc"]).split if "acc" in headline else "test"
        table = results.forgetting_table(done, lambda r: [r["labels"].get(a, "–") for a in axis_names], split)
        md += (f"\n## Forgetting by distance ({split}, all tasks)\n\nPrompt-answer accuracy % (mean ± std over "
               "seeds) and binding error % (a wrong answer that is another prompt fact's); the last rows give the "
               "distances each bucket held and the reference lines computed from the data.\n\n"
               + results.forgetting_markdown(table, axis_names or ["run"]) + "\n")
        if best is not None:
            md += "\n" + tuning_markdown(best, sweep.tune, axis_names, split)
        if any(f"/{FREE}/" in k for r in done for k in r["metrics"]):  # runs with prosg.lmeval.FreeRunningEval
            from prosg import lmeval

            free_md, free_plots = lmeval.sections(done, axis_names, out, sweep.name, plots)
            md += free_md
            files += free_plots
    md_path = out / "results.md"
    md_path.write_text(md)
    files.insert(1, md_path)
    print(md)
    return Collected(rows, summary, columns, problems, files, notes)


def _write_csv(path: Path, rows: list[dict[str, Any]], axis_names: list[str]) -> Path:
    """results.csv: one row per run, every metric (empty = NaN or not logged)."""
    metric_keys = sorted({k for r in rows for k in r["metrics"]})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "status", "seed", *axis_names, *metric_keys])
        for r in rows:
            vals = [r["metrics"].get(k, math.nan) for k in metric_keys]
            w.writerow([r["run"], r["status"], r["seed"], *(r["axes"].get(a, "") for a in axis_names),
                        *("" if math.isnan(v) else repr(v) for v in vals)])
    return path


def read_csv(path: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """A results.csv (``_write_csv``) -> (axis names, one row per run: run, status, seed, axes (text), metrics (NaN
    when empty)), the rows ``results.forgetting_table`` and ``results.cell_stats`` take."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, raw = reader.fieldnames or [], list(reader)
    meta = ("run", "status", "seed")
    axes = [c for c in header if c not in meta and not results.is_metric_column(c)]
    rows = [{"run": r["run"], "status": r["status"], "seed": int(r["seed"]), "axes": {a: r[a] for a in axes},
             "labels": {a: r[a] for a in axes},  # the values as text: what tables and tuning group by
             "metrics": {c: results.number(v) for c, v in r.items() if results.is_metric_column(c)}} for r in raw]
    return axes, rows


def _cell_text(title: str, stats: results.Stats, of: int) -> str:
    """A results.md cell: a size as a whole number (it is the same for every seed), a metric as mean ± std."""
    if title in results.SIZE_COLUMNS and stats.n and not stats.std > 0:
        return f"{stats.mean:.0f}" if stats.n == of else f"{stats.mean:.0f} (n={stats.n})"
    return results.format_stats(stats, of)


def _seed_text(sweep: Sweep) -> str:
    """What a seed re-draws in this sweep (a reader cannot tell initialisation-only ± from data ± otherwise)."""
    keys = sweep.seed_keys
    what = [w for k, w in (("seed_everything", "the initialisation"), ("data.init_args.seed", "the data")) if k in keys]
    what += [k for k in keys if k not in ("seed_everything", "data.init_args.seed")]
    return "Each seed re-draws " + (" and ".join(what) if what else "nothing") + "."


def _markdown(sweep: Sweep, axis_names: list[str], summary: list[dict], headline: dict[str, str],
              columns: dict[str, str], rows: list[dict], problems: list[dict], notes: list[str]) -> str:
    """results.md: the per-cell table, the runs that are not done, and notes on skipped plots."""
    n_done = sum(bool(r["metrics"]) for r in rows)
    first = next(iter(headline.values()), None)
    source = results.parse_key(first).prefix if first else "no metrics"
    lines = [f"# {sweep.name}", "",
             f"{n_done}/{len(rows)} runs done; mean ± std over seeds (sample std; n = seeds with results). "
             f"Columns from {source}. {_seed_text(sweep)}", ""]
    header = [*axis_names, "n", *columns]
    lines += results.md_head(header)
    for entry in summary:
        cells = [entry["labels"][a] or "–" for a in axis_names]
        cells += [str(entry["n"]), *(_cell_text(t, entry[t], entry["n"]) for t in columns)]
        lines.append(results.md_row(cells))
    if problems:
        lines += ["", f"## Not done ({len(problems)})", ""]
        for p in problems:
            err = f": {p['error'].splitlines()[0]}" if p["error"] else ""
            log = f" (log: {p['log']})" if p["log"] else ""
            lines.append(f"- {p['name']} — {p['status']}{err}{log}")
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


# -- plots ---------------------------------------------------------------------------------------
def _is_numeric(axis: Axis) -> bool:
    """Whether every value of the axis is a number (bools are not)."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in axis.values.values())


def _numeric_axis(sweep: Sweep, names: tuple[str, ...]) -> Axis | None:
    """The first numeric axis named, or keyed by an argument ending in, one of ``names``."""
    for axis in sweep.axes:
        leaf = (axis.key or "").rsplit(".", 1)[-1]
        if (axis.name in names or leaf in names) and _is_numeric(axis):
            return axis
    return None


def _memory_axes(sweep: Sweep, done: list[dict]) -> set[str]:
    """Numeric axes along which memory changes: the memory plot's x, not lines of their own."""
    found = set()
    for axis in filter(_is_numeric, sweep.axes):
        others: dict[tuple, set] = {}
        for r in done:
            if axis.name in r["labels"]:
                rest = tuple(sorted((a, label) for a, label in r["labels"].items() if a != axis.name))
                others.setdefault(rest, set()).add(r["metrics"].get(MEMORY))
        if any(len(memories) > 1 for memories in others.values()):
            found.add(axis.name)
    return found


def _series(done: list[dict], axis_names: list[str], skip: set[str], y_key: str,
            x_of: Callable[[dict], float | None]) -> dict[str, dict[float, list[float]]]:
    """group label (the labels of the axes not in ``skip``) -> x -> ``y_key`` over the runs there."""
    series: dict[str, dict[float, list[float]]] = {}
    for r in done:
        x = x_of(r)
        if x is not None:
            pts = series.setdefault(_group_label(r, axis_names, skip), {})
            pts.setdefault(x, []).append(r["metrics"].get(y_key, math.nan))
    return series


def _group_label(r: dict, axis_names: list[str], skip: Collection[str] = ()) -> str:
    """A run's line in a plot: its labels on the axes not skipped, joined (``all`` if none)."""
    return "-".join(r["labels"][a] for a in axis_names if a not in skip and a in r["labels"]) or "all"


def _tuned_label(best: dict[str, Any]) -> str:
    """A tuned cell's legend label: its untuned labels, then the chosen setting in brackets."""
    cell = "-".join(v for v in best["labels"].values() if v) or "run"
    chosen = ", ".join(v for v in best["chosen"].values() if v)
    return f"{cell} ({chosen})" if chosen else cell


def _plots(sweep: Sweep, done: list[dict], best: list[dict] | None, acc_key: str | None, out: Path,
           notes: list[str]) -> list[Path]:
    """forgetting.png (and tuned_forgetting.png for a tuned sweep), acc_vs_rank.png and acc_vs_memory.png, each when
    the runs have what it shows."""
    from prosg import plots

    axis_names = [a.name for a in sweep.axes]
    prefix = results.parse_key(acc_key).prefix if acc_key else results.prefix("test")
    files = []
    groups: dict[str, list[dict[str, float]]] = {}
    for r in done:
        groups.setdefault(_group_label(r, axis_names), []).append(r["metrics"])
    path = out / "forgetting.png"
    if plots.forgetting_curves(groups, prefix, path, title=f"{sweep.name}: forgetting curves ({prefix})"):
        files.append(path)
    else:
        notes.append(f"no distance-bucket accuracies under {prefix}: forgetting plot skipped")
    if best:  # one curve per cell at its chosen setting (cells still being tuned left out): every curve would hide it
        tuned = {_tuned_label(b): [r["metrics"] for r in b["runs"]] for b in best if not b["provisional"]}
        path = out / "tuned_forgetting.png"
        if tuned and plots.forgetting_curves(tuned, prefix, path, title=f"{sweep.name}: each cell's setting chosen on "
                                             f"{sweep.tune.by} ({prefix})"):
            files.append(path)

    rank = _numeric_axis(sweep, ("rank",))
    if rank is None:
        notes.append("no numeric rank axis (named or keyed rank): acc-vs-rank plot skipped")
    elif acc_key is None:
        notes.append("no accuracy metric: acc-vs-rank plot skipped")
    else:
        series = _series(done, axis_names, {rank.name}, acc_key,
                         lambda r: float(r["axes"][rank.name]) if rank.name in r["axes"] else None)
        path = out / "acc_vs_rank.png"
        plots.metric_vs_axis(series, xlabel=rank.key or rank.name, ylabel=acc_key, path=path,
                             title=f"{sweep.name}: accuracy vs {rank.name}")
        files.append(path)

    if len({r["metrics"][MEMORY] for r in done if MEMORY in r["metrics"]}) < 2:
        notes.append("runs do not differ in memory (sizes.memory in metrics.json): acc-vs-memory plot skipped")
    elif acc_key is None:
        notes.append("no accuracy metric: acc-vs-memory plot skipped")
    else:
        series = _series(done, axis_names, _memory_axes(sweep, done), acc_key, lambda r: r["metrics"].get(MEMORY))
        path = out / "acc_vs_memory.png"
        plots.metric_vs_axis(series, xlabel="memory (numbers per sample: state + method)", ylabel=acc_key,
                             path=path, title=f"{sweep.name}: accuracy vs memory")
        files.append(path)
    return files
