"""Shortcut audit: what could answer a prompt question besides memory of the prompt?

For every scored prompt answer (kind 2) of generated examples, solvers that never look at the
prompt's *bindings* are scored — each is given exactly what a model could exploit without
remembering which prompt key goes with which answer:

``chance``             a uniform guess over the task's answers;
``value_set``          a uniform pick from the prompt's answer set (remembers *which* answers the
                       prompt held, not where each belongs: the value-set ceiling);
``elimination``        the same, minus the answers already given to earlier prompt questions in
                       the response (the shortcut of tasks that ask every fact once, in order);
``last_prompt_value``  the prompt's last answer (recency);
``most_frequent``      the answer seen most often so far in the response;
``copy_response``      an induction copy from the response alone: what followed the last earlier
                       occurrence of the three tokens before the answer (copying from the output).

Each solver's score is its *expected* accuracy on the answer (a uniform pick scores the share of
its choices that are right), averaged per distance bucket, next to the task's analytic baseline
(``Task.shortcut_baselines``: the score if nothing but the prompt decides the answer). A solver
well above its baseline in a bucket is a shortcut the task lets through.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

SOLVERS = ("chance", "value_set", "elimination", "last_prompt_value", "most_frequent", "copy_response")
CONTEXT = 3  # tokens the induction copy matches


def solver_scores(example: dict[str, Any]) -> list[dict[str, float]]:
    """Per prompt answer of ``example``: distance, answer index and each solver's expected accuracy."""
    resp, kinds = example["response_ids"], example["answer_kind"]
    cands, chance = list(example.get("candidates") or []), float(example.get("chance", math.nan))
    given: list[int] = []  # answers to earlier prompt questions
    seen: Counter[int] = Counter()  # every earlier scored answer (local or prompt)
    rows = []
    for t, (tok, kind) in enumerate(zip(resp, kinds)):
        if kind == 2:
            remaining = Counter(cands) - Counter(given)
            n_left = sum(remaining.values())
            ctx = tuple(resp[max(0, t - CONTEXT) : t])
            copied = next((resp[s] for s in range(t - 1, CONTEXT - 1, -1)
                           if len(ctx) == CONTEXT and tuple(resp[s - CONTEXT : s]) == ctx), None)
            frequent = min(seen, key=lambda v: (-seen[v], v)) if seen else None
            rows.append({
                "distance": example["distance"][t],
                "answer_index": len(given),
                "chance": chance,
                "value_set": cands.count(tok) / len(cands) if cands else math.nan,
                "elimination": remaining[tok] / n_left if n_left else 0.0,
                "last_prompt_value": float(bool(cands) and cands[-1] == tok),
                "most_frequent": chance if frequent is None else float(frequent == tok),
                "copy_response": chance if copied is None else float(copied == tok),
            })
            given.append(tok)
        if kind >= 1:
            seen[tok] += 1
    return rows


@dataclass
class BucketAudit:
    """One distance bucket: answers, distance range, and per solver (measured, analytic, tolerance)."""

    lo: int
    hi: float
    n: int
    dmin: int
    dmax: int
    measured: dict[str, float]
    baseline: dict[str, float]
    tolerance: dict[str, float]

    def shortcuts(self) -> list[str]:
        """Solvers whose measured accuracy exceeds their baseline beyond sampling noise."""
        return [s for s in SOLVERS if self.measured[s] > self.baseline[s] + self.tolerance[s]]


def audit(examples: Iterable[dict[str, Any]], task: Any, edges: list[int]) -> list[BucketAudit]:
    """Score every solver on ``examples`` of ``task``, per distance bucket of ``edges``."""
    rows = [r for ex in examples for r in solver_scores(ex)]
    bounds = list(zip(edges, edges[1:])) + [(edges[-1], math.inf)]
    out = []
    for lo, hi in bounds:
        inside = [r for r in rows if lo <= r["distance"] < hi]
        if not inside:
            continue
        base = [task.shortcut_baselines(r["answer_index"]) for r in inside]
        measured = {s: float(np.mean([r[s] for r in inside])) for s in SOLVERS}
        baseline = {s: float(np.mean([b[s] for b in base])) for s in SOLVERS}
        # 4 standard errors of a mean of answers that are right with probability p, plus rounding slack
        tol = {s: 4 * math.sqrt(max(p, 1e-3) * (1 - min(p, 1 - 1e-3)) / len(inside)) + 1e-3 for s, p in baseline.items()}
        dists = [r["distance"] for r in inside]
        out.append(BucketAudit(lo, hi, len(inside), min(dists), max(dists), measured, baseline, tol))
    return out


def format_audit(buckets: list[BucketAudit]) -> str:
    """The audit as a text table: per bucket and solver, measured % (analytic baseline %), flags."""
    head = f"{'bucket':>10} {'n':>6} {'dist':>9} " + " ".join(f"{s:>19}" for s in SOLVERS)
    lines = [head, "-" * len(head)]
    for b in buckets:
        hi = "inf" if math.isinf(b.hi) else str(int(b.hi))
        cells = []
        for s in SOLVERS:
            flag = " !" if s in b.shortcuts() else "  "
            cells.append(f"{100 * b.measured[s]:7.1f} ({100 * b.baseline[s]:5.1f}){flag}")
        lines.append(f"{f'{b.lo}-{hi}':>10} {b.n:>6} {f'{b.dmin}-{b.dmax}':>9} " + " ".join(f"{c:>19}" for c in cells))
    lines.append("measured % (analytic baseline %); ! = above its baseline beyond 4 standard errors: a shortcut")
    return "\n".join(lines)
