"""Equal tuning effort: pick each method's best setting on validation, report it on test.

A sweep file may name the axes that are tuned and the validation metric that decides::

    tune:
      over: [lr, steps]          # axes tuned separately for every cell of the other axes
      by: val/all/acc            # maximised; the mean over the sweep's seeds decides (as Zoology picks its lr)
      seeds: [1, 2]              # optional: then run each cell's chosen setting on these seeds too

``collect`` then adds a table with, per cell of the other axes, the chosen setting (its labels on
the tuned axes), its validation score and its test metrics over seeds — every method gets the same
grid and the same rule, and the test split never takes part in the choice. With ``seeds``, the grid
runs on the sweep's ``seeds`` only (the tuning seeds, which alone decide), and ``prosg sweep`` then
runs the chosen settings on the extra seeds: the table reports the chosen setting over all of them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from prosg import results
from prosg.errors import ConfigError


@dataclass
class Tuning:
    """Axes tuned per cell, and the metric (maximised) that picks the setting."""

    over: list[str]
    by: str
    seeds: list[int] = field(default_factory=list)  # extra seeds the chosen settings run on (not used to choose)

    def cell(self, labels: dict[str, str], axis_names: list[str]) -> tuple[str, ...]:
        """The labels of the untuned axes: the cell a run is tuned within ("" for an axis it skips)."""
        return tuple(labels.get(a, "") for a in axis_names if a not in self.over)

    def setting(self, labels: dict[str, str]) -> tuple[str, ...]:
        """The labels of the tuned axes: the setting a run tries within its cell."""
        return tuple(labels.get(a, "") for a in self.over)


def parse_tuning(raw: Any, axis_names: list[str], path: Path) -> Tuning | None:
    """The ``tune:`` section of a sweep file, checked against its axes (None when absent)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"over", "by", "seeds"} or "over" not in raw:
        raise ConfigError(f"{path}: tune must be {{over: [axis, ...], by: val/all/acc, seeds: [extra seeds]}}; got {raw!r}")
    over = [raw["over"]] if isinstance(raw["over"], str) else list(raw["over"])
    unknown = [a for a in over if a not in axis_names]
    if unknown or not over:
        raise ConfigError(f"{path}: tune.over names {unknown or over}, not axes of this sweep ({axis_names})")
    by = str(raw.get("by", "val/all/acc"))
    key = results.parse_key(by)
    if key is None or key.split != "val":
        raise ConfigError(f"{path}: tune.by={by!r} must be a validation metric (val/...): the test split never picks")
    seeds = raw.get("seeds") or []
    if not isinstance(seeds, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: tune.seeds must be a list of distinct ints (the extra seeds of the chosen settings); "
                          f"got {seeds!r}")
    return Tuning(over, by, list(seeds))


def planned_runs(labels: Iterable[dict[str, str]], tuning: Tuning, axis_names: list[str]) -> dict[tuple, int]:
    """Cell -> how many tuning runs the sweep's grid holds for it (``labels``: one per grid run, tuning seeds only)."""
    return dict(Counter(tuning.cell(lab, axis_names) for lab in labels))


def best_per_cell(done: list[dict], tuning: Tuning, axis_names: list[str], planned: dict[tuple, int] | None = None) -> list[dict]:
    """Per cell of the untuned axes: the tuned setting with the best mean ``tuning.by`` and its runs.

    Each entry: ``labels`` (untuned axes), ``chosen`` (tuned axes -> label), ``score`` (Stats of the
    validation metric over the tuning seeds), ``runs`` (the chosen setting's runs, one per seed, the
    confirmation seeds included), ``tried`` (settings compared), ``runs_done`` / ``planned`` (tuning runs done /
    in the grid, from ``planned_runs``; ``runs_done`` when not given) and ``provisional`` (runs_done < planned:
    the cell is still being tuned, on any tuning seed, so its choice may change; the same cells
    ``confirmation_runs`` holds back). Runs on ``tuning.seeds`` never decide; a tie goes to the setting met first
    in the grid's order; a cell with one setting is chosen without a score (n/a in the table).
    """
    kept = [a for a in axis_names if a not in tuning.over]
    cells: dict[tuple, dict[tuple, list[dict]]] = {}
    for r in done:
        cell = tuning.cell(r["labels"], axis_names)
        setting = tuning.setting(r["labels"])
        cells.setdefault(cell, {}).setdefault(setting, []).append(r)
    out = []
    for cell, settings in cells.items():
        scored = [(results.cell_stats([r for r in runs if r["seed"] not in tuning.seeds], tuning.by), setting, runs)
                  for setting, runs in settings.items()]
        # a cell with one setting has nothing to choose: it stands without a validation score (a method evaluated
        # as is, e.g. a frozen backbone at max_steps 0, never validates), and is confirmed like the others
        if len(scored) > 1:
            scored = [s for s in scored if not math.isnan(s[0].mean)]
        if not scored:
            continue
        stats, setting, runs = max(scored, key=lambda s: s[0].mean)
        done_n = sum(r["seed"] not in tuning.seeds for rs in settings.values() for r in rs)
        planned_n = (planned or {}).get(cell, done_n)
        out.append({"labels": dict(zip(kept, cell)), "chosen": dict(zip(tuning.over, setting)), "score": stats,
                    "runs": runs, "tried": len(settings), "runs_done": done_n, "planned": planned_n,
                    "provisional": done_n < planned_n})
    return out


def tuning_markdown(best: list[dict], tuning: Tuning, axis_names: list[str], split: str = "test") -> str:
    """The tuned table: chosen setting, its validation score, then the forgetting table of the chosen runs."""
    kept = [a for a in axis_names if a not in tuning.over]
    head = [*kept, *(f"best {a}" for a in tuning.over), tuning.by, "settings tried", "seeds reported"]
    lines = [f"## Best per cell on validation (tuned over {', '.join(tuning.over)}; by {tuning.by})", "",
             *results.md_head(head)]
    for b in best:
        cells = [b["labels"][a] or "–" for a in kept] + [b["chosen"][a] for a in tuning.over]
        tried = f"{b['runs_done']} of {b['planned']} runs (provisional)" if b["provisional"] else str(b["tried"])
        cells += [results.format_stats(b["score"]), tried, str(len(b["runs"]))]
        lines.append(results.md_row(cells))
    chosen = {id(r): b for b in best for r in b["runs"]}
    rows = [r for b in best for r in b["runs"]]

    def label(r: dict) -> list[str]:
        b = chosen[id(r)]
        cells = [b["labels"][a] or "–" for a in kept] or ["run"]
        # a choice from part of the grid must not read as a result in the table a reader copies
        return cells[:-1] + [cells[-1] + " (provisional)"] if b["provisional"] else cells

    table = results.forgetting_table(rows, label, split)
    lines += ["", f"The chosen settings on {split} (accuracy %, binding error %, mean ± std over seeds):", "",
              results.forgetting_markdown(table, kept or ["run"])]
    return "\n".join(lines) + "\n"
