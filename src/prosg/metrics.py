"""Forgetting metrics: accuracy by distance from the prompt, its area and half-life, perplexity.

All metrics are torchmetrics ``Metric``s whose states are fixed-shape counts/sums registered
with ``dist_reduce_fx="sum"``, so ``compute()`` gives the same value on every DDP rank as a
single process over all the data. Like any torchmetrics ``compute()``, it is a collective under
DDP: call it on every rank.

Inputs follow the batch contract (tensors aligned with ``input_ids`` positions):
``answer_kind`` 0 = not scored, 1 = local answer, 2 = prompt answer; ``distance`` = index in
the response for prompt answers, -1 elsewhere. ``correct[:, t]`` says whether the prediction
made at t-1 equals ``input_ids[:, t]`` (see ``next_token_correct``).

Distance buckets: bucket k holds distances in ``[edges[k], edges[k+1])``. Distances at or beyond
the last edge go to an *overflow* bucket ``acc/<last>-inf`` (or are dropped with
``overflow=False``); distances below the first edge are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from prosg import results
from prosg.errors import ConfigError, DataError

NO_DISTANCE = 2**62  # the min-distance state of an empty bucket

BATCH_KEYS = ("input_ids", "answer_kind", "distance", "loss_weight", "task", "n_facts")


def next_token_pred(logits: Tensor, input_ids: Tensor) -> Tensor:
    """(B, T, V) logits, (B, T) ids -> (B, T) long: the model's guess for token t (argmax at t-1; -1 at t=0)."""
    if logits.shape[:2] != input_ids.shape:
        raise DataError(
            f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}; "
            "pass logits of shape (B, T, V) for input_ids of shape (B, T)"
        )
    pred = torch.full_like(input_ids, -1)
    pred[:, 1:] = logits[:, :-1].argmax(dim=-1)
    return pred


def next_token_correct(logits: Tensor, input_ids: Tensor) -> Tensor:
    """(B, T, V) logits, (B, T) ids -> (B, T) bool: argmax at t-1 == id at t (False at t=0)."""
    return next_token_pred(logits, input_ids) == input_ids


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise DataError(f"inputs must all have the same (B, T) shape, got {shapes}; align them with input_ids")


def _check_edges(bucket_edges: Sequence[int]) -> list[int]:
    edges = [int(e) for e in bucket_edges]
    if len(edges) < 2 or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(
            f"bucket_edges={list(bucket_edges)} must be >= 2 strictly increasing non-negative ints, "
            "e.g. [0, 16, 32, 64, 128, 256]"
        )
    return edges


def trapezoid_area(x: Sequence[float], y: Sequence[float]) -> float:
    """Area under y(x) by the trapezoid rule, divided by the x range (the mean height).

    One point gives its own y; no points give NaN. For y in [0, 1] the result is in [0, 1].
    """
    if len(x) == 0:
        return math.nan
    if len(x) == 1:
        return float(y[0])
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(x, x[1:], y, y[1:]))
    return area / (x[-1] - x[0])


def half_life(x: Sequence[float], y: Sequence[float]) -> float:
    """First x where y falls to half of y[0], interpolated linearly between points.

    ``inf`` if y never falls that low; NaN with no points or y[0] == 0 (nothing to forget).
    """
    if len(x) == 0 or y[0] <= 0:
        return math.nan
    half = y[0] / 2
    for k in range(1, len(x)):
        if y[k] <= half:
            # y[k-1] > half >= y[k], so the denominator is positive.
            frac = (y[k - 1] - half) / (y[k - 1] - y[k])
            return x[k - 1] + frac * (x[k] - x[k - 1])
    return math.inf


@dataclass
class Binding:
    """A batch's answer-set comparisons (what binding error, not-in-prompt and the value-set ceiling count)."""

    has_set: Tensor  # (B, 1) the sample has an answer set
    in_set: Tensor  # (B, T) the prediction is one of the sample's answers
    share: Tensor  # (B, T) float64: the share of the answer set equal to the target (the value-set ceiling)

    @staticmethod
    def of(pred: Tensor, target: Tensor, candidates: Tensor) -> Binding:
        """From predictions and targets (B, T) and the answer sets (B, K), -1 padded."""
        valid = candidates >= 0  # (B, K)
        n_set = valid.sum(1)  # (B,)
        in_set = ((pred[..., None] == candidates[:, None, :]) & valid[:, None, :]).any(-1)
        share = ((target[..., None] == candidates[:, None, :]) & valid[:, None, :]).sum(-1)
        share = share.to(torch.float64) / n_set.clamp(min=1).to(torch.float64)[:, None]
        return Binding((n_set > 0)[:, None], in_set, share)


class ForgettingCurve(Metric):
    """Accuracy per distance bucket on answers of one kind (default 2 = prompt answers).

    ``compute()`` returns ``acc/<lo>-<hi>`` per bucket (NaN if the bucket is empty), the
    overflow bucket ``acc/<last>-inf`` (if ``overflow``), ``acc`` over all counted positions,
    ``area`` (mean accuracy over the distance range, trapezoid over the midpoints of the
    non-empty finite buckets; NaN with no data) and ``half_life`` (``half_life()`` over the
    same points: the distance where accuracy first falls to half the nearest bucket's, ``inf``
    if it never does, NaN if no data). A bucket's midpoint is the mean of the integer distances
    it holds, ``(lo + hi - 1) / 2``. The overflow bucket has no finite midpoint, so it enters
    ``acc`` but not ``area``, ``half_life`` or ``curve()``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    hits: Tensor
    total: Tensor

    def __init__(self, bucket_edges: Sequence[int], kind: int = 2, overflow: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.edges = _check_edges(bucket_edges)
        self.kind = int(kind)
        self.overflow = bool(overflow)
        self.n_buckets = len(self.edges) - 1
        self.register_buffer("_edges", torch.tensor(self.edges, dtype=torch.long), persistent=False)
        # One extra slot for the overflow bucket; it stays zero when overflow=False.
        n = self.n_buckets + 1
        for name in ("hits", "total", "other", "outside", "with_set", "with_chance"):
            self.add_state(name, torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        for name in ("ceiling_sum", "chance_sum"):  # float64: sums of many per-answer fractions
            self.add_state(name, torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("dmin", torch.full((n,), NO_DISTANCE, dtype=torch.long), dist_reduce_fx="min")
        self.add_state("dmax", torch.full((n,), -1, dtype=torch.long), dist_reduce_fx="max")

    def update(self, correct: Tensor, distance: Tensor, answer_kind: Tensor, chance: Tensor | None = None,
               binding: Binding | None = None) -> None:
        """Count positions with ``answer_kind == kind`` per distance bucket.

        With ``binding`` (``Binding.of(pred, target, candidates)``: the predictions compared with each sample's
        answer set, made once per batch for every curve) it also counts binding errors (a wrong prediction that
        is another of the prompt's answers), predictions outside the prompt's answers, and the value-set
        ceiling (the share of the set equal to the target); ``chance`` (B,) is averaged per bucket as the
        reference line.
        """
        _check_same_shape(correct=correct, distance=distance, answer_kind=answer_kind)
        # right=True: index i means edges[i-1] <= d < edges[i]; -1 -> below the first edge.
        bucket = torch.bucketize(distance, self._edges, right=True) - 1
        keep = (answer_kind == self.kind) & (bucket >= 0)
        if not self.overflow:
            keep &= bucket < self.n_buckets
        flat = bucket.clamp(min=0).flatten()
        kf = keep.flatten()
        # scatter_add with 0/1 weights instead of boolean indexing: no host sync on GPU.
        self.total.scatter_add_(0, flat, kf.long())
        self.hits.scatter_add_(0, flat, (keep & correct.bool()).flatten().long())
        self.dmin.scatter_reduce_(0, flat, torch.where(kf, distance.flatten(), NO_DISTANCE), "amin")
        self.dmax.scatter_reduce_(0, flat, torch.where(kf, distance.flatten(), -1), "amax")
        if chance is not None:
            ch = chance.to(torch.float64)[:, None].expand_as(distance)
            ok = keep & torch.isfinite(ch)
            self.with_chance.scatter_add_(0, flat, ok.flatten().long())
            self.chance_sum.scatter_add_(0, flat, torch.where(ok, ch, 0.0).flatten())
        if binding is None:
            return
        has_set, in_set, share = keep & binding.has_set, binding.in_set, binding.share
        wrong = ~correct.bool()
        self.with_set.scatter_add_(0, flat, has_set.flatten().long())
        self.other.scatter_add_(0, flat, (has_set & wrong & in_set).flatten().long())
        self.outside.scatter_add_(0, flat, (has_set & wrong & ~in_set).flatten().long())
        self.ceiling_sum.scatter_add_(0, flat, torch.where(has_set, share, 0.0).flatten())

    def _names(self) -> list[tuple[int, float]]:
        bounds: list[tuple[int, float]] = list(zip(self.edges, self.edges[1:]))
        if self.overflow:
            bounds.append((self.edges[-1], math.inf))
        return bounds

    def _summary(self) -> dict[str, float]:
        c = {name: getattr(self, name).tolist() for name in (
            "hits", "total", "other", "outside", "with_set", "with_chance", "ceiling_sum", "chance_sum", "dmin", "dmax")}

        def ratio(num: str, den: str, k: int | slice) -> float:
            n, d = c[num][k], c[den][k]
            n, d = (sum(n), sum(d)) if isinstance(k, slice) else (n, d)
            return n / d if d else math.nan

        out: dict[str, float] = {}
        stats = ((results.ACC, "hits", "total"), (results.BIND_ERR, "other", "with_set"),
                 (results.NOT_PROMPT, "outside", "with_set"), (results.CEILING, "ceiling_sum", "with_set"),
                 (results.CHANCE, "chance_sum", "with_chance"))
        for k, (lo, hi) in enumerate(self._names()):
            for stat, num, den in stats:
                out[results.curve_bucket(lo, hi, stat)] = ratio(num, den, k)
            out[results.curve_bucket(lo, hi, results.COUNT)] = float(c["total"][k])
            has = c["total"][k] > 0
            out[results.curve_bucket(lo, hi, results.DMIN)] = float(c["dmin"][k]) if has else math.nan
            out[results.curve_bucket(lo, hi, results.DMAX)] = float(c["dmax"][k]) if has else math.nan
        for stat, num, den in stats:
            out[stat] = ratio(num, den, slice(None))
        hits, total = c["hits"], c["total"]
        mids = [(lo + hi - 1) / 2 for lo, hi in zip(self.edges, self.edges[1:])]
        points = [(m, hits[k] / total[k]) for k, m in enumerate(mids) if total[k]]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        out[results.AREA] = trapezoid_area(xs, ys)
        out[results.HALF_LIFE] = half_life(xs, ys)
        return out

    def compute(self) -> dict[str, Tensor]:
        """Per-bucket statistics, overall ``acc``/binding/references, ``area`` and ``half_life`` as scalars."""
        return {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in self._summary().items()}

    def curve(self) -> tuple[Tensor, Tensor, Tensor]:
        """(midpoints, accuracy, counts) over the finite buckets, for plotting; synced like compute()."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            edges = self._edges.double()
            mids = (edges[:-1] + edges[1:] - 1) / 2
            total = self.total[: self.n_buckets].clone()
            acc = self.hits[: self.n_buckets].double() / total.double()  # 0/0 -> NaN for empty buckets
        return mids, acc, total


class SliceAccuracy(Metric):
    """Accuracy per declared slice name (e.g. ``"recall/n4/local"``), fixed-shape for DDP.

    ``update(correct, mask, slice_id)``: ``slice_id`` is a declared name or its index (the whole
    batch goes to that slice), or a long tensor of indices, shape (B,) per row or the shape of
    ``correct`` per position. ``compute()`` gives ``{name: accuracy}``, NaN for empty slices.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    hits: Tensor
    total: Tensor

    def __init__(self, slices: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.slices = [str(s) for s in slices]
        if not self.slices or len(set(self.slices)) != len(self.slices):
            raise ConfigError(f"slices={self.slices} must be a non-empty list of unique names")
        self._index = {name: i for i, name in enumerate(self.slices)}
        self.add_state("hits", torch.zeros(len(self.slices), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(len(self.slices), dtype=torch.long), dist_reduce_fx="sum")

    def index(self, name: str) -> int:
        """Slice name -> its index; unknown names raise DataError listing the declared ones."""
        if name not in self._index:
            raise DataError(f"unknown slice {name!r}; declared slices are {self.slices} (declare it in the config)")
        return self._index[name]

    def update(self, correct: Tensor, mask: Tensor, slice_id: str | int | Tensor) -> None:
        """Count hits/totals of ``correct`` where ``mask`` into the slice(s) given by ``slice_id``."""
        _check_same_shape(correct=correct, mask=mask)
        if isinstance(slice_id, str):
            slice_id = self.index(slice_id)
        if isinstance(slice_id, int):
            if not 0 <= slice_id < len(self.slices):
                raise DataError(f"slice index {slice_id} out of range for {len(self.slices)} slices {self.slices}")
            idx = torch.full_like(correct, slice_id, dtype=torch.long)
        else:
            idx = slice_id.to(device=correct.device, dtype=torch.long)
            if idx.dim() == 1 and correct.dim() == 2 and idx.shape[0] == correct.shape[0]:
                idx = idx[:, None].expand_as(correct)  # per-row slice
            if idx.shape != correct.shape:
                raise DataError(
                    f"slice_id shape {tuple(idx.shape)} must be (B,) or {tuple(correct.shape)} like correct"
                )
            if idx.numel() and (idx.min() < 0 or idx.max() >= len(self.slices)):
                raise DataError(f"slice indices must be in [0, {len(self.slices)}) for slices {self.slices}")
        idx = idx.flatten()
        mask = mask.bool().flatten()
        self.total.scatter_add_(0, idx, mask.long())
        self.hits.scatter_add_(0, idx, (mask & correct.bool().flatten()).long())

    def compute(self) -> dict[str, Tensor]:
        """``{slice name: accuracy}``; NaN for a slice with no counted positions."""
        acc = self.hits.float() / self.total.float()  # 0/0 -> NaN
        return {name: acc[i] for i, name in enumerate(self.slices)}


class ResponsePerplexity(Metric):
    """exp(mean next-token NLL) over positions with ``weight > 0`` (unweighted mean).

    Logits at t-1 predict the token at t, so the weight of position t selects the prediction
    made at t-1. Loss weights only select positions here: up-weighting answers in the loss does
    not change the perplexity.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    nll_sum: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # float64 sum: millions of per-token NLLs would lose digits in float32.
        self.add_state("nll_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, input_ids: Tensor, weight: Tensor) -> None:
        """Add the NLL of ``input_ids[:, 1:]`` under ``logits[:, :-1]`` where ``weight[:, 1:] > 0``."""
        _check_same_shape(input_ids=input_ids, weight=weight)
        if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
            raise DataError(
                f"logits {tuple(logits.shape)} must be (B, T, V) for input_ids {tuple(input_ids.shape)}"
            )
        keep = weight[:, 1:] > 0  # (B, T-1)
        # Select first, so the float32 upcast and log-softmax touch only scored positions.
        nll = F.cross_entropy(logits[:, :-1][keep].float(), input_ids[:, 1:][keep], reduction="sum")
        self.nll_sum += nll.double()
        self.count += keep.sum()

    def compute(self) -> Tensor:
        """Perplexity; NaN if no position was scored."""
        return torch.exp(self.nll_sum / self.count)  # 0/0 -> NaN


class ForgettingMetrics(nn.Module):
    """Forgetting curves, local-answer accuracy and perplexity per ``{task}/n{n}`` slice.

    ``update(batch, logits)`` once per step; ``compute()`` (a DDP collective, call it on every
    rank) returns a flat ``dict[str, float]``, already synchronised, with per slice and distance
    bucket ``{task}/n{n}/<stat>@{lo}-{hi}`` (+ the open ``{last}-inf`` bucket) for stat in acc,
    bind_err (wrong, but another prompt answer), not_prompt (wrong and none of the prompt's
    answers), ceiling (value-set ceiling), chance, n, dmin, dmax (distances the bucket holds);
    ``.../acc``, ``.../bind_err``, ``.../not_prompt``, ``.../ceiling``, ``.../chance``, ``.../area``,
    ``.../half_life`` (prompt answers), ``.../local_acc`` (local answers), the same under
    ``all/`` across slices, and ``ppl`` over response tokens with ``loss_weight > 0`` (keys built by
    ``prosg.results``).
    """

    def __init__(self, bucket_edges: Sequence[int], tasks: Sequence[str], n_facts: Sequence[int]) -> None:
        super().__init__()
        if not tasks or not n_facts:
            raise ConfigError(f"tasks={list(tasks)} and n_facts={list(n_facts)} must both be non-empty")
        pairs = [(str(t), int(n)) for t in tasks for n in n_facts]
        self.slice_names = [results.slice_name(t, n) for t, n in pairs]
        self._slice_index = {pair: i for i, pair in enumerate(pairs)}
        self.curves = nn.ModuleList(ForgettingCurve(bucket_edges, kind=2) for _ in self.slice_names)
        self.curve_all = ForgettingCurve(bucket_edges, kind=2)
        self.local = SliceAccuracy([*self.slice_names, results.ALL])
        self.ppl = ResponsePerplexity()

    def _row_slices(self, batch: dict[str, Any]) -> list[int]:
        tasks, n_facts = batch["task"], batch["n_facts"].tolist()
        rows = []
        for t, n in zip(tasks, n_facts):
            if (t, n) not in self._slice_index:
                raise DataError(
                    f"example slice {t}/n{n} is not declared; declared slices are {self.slice_names} "
                    "(add the task / n_facts to the metrics config)"
                )
            rows.append(self._slice_index[(t, n)])
        return rows

    @torch.no_grad()
    def update(self, batch: dict[str, Any], logits: Tensor) -> None:
        """Score a collated batch (see the batch contract) with the model's (B, T, V) logits."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise DataError(f"batch is missing {missing}; ForgettingMetrics needs {list(BATCH_KEYS)}")
        ids, kind, dist = batch["input_ids"], batch["answer_kind"], batch["distance"]
        pred = next_token_pred(logits, ids)  # one argmax over the vocabulary for accuracy and binding alike
        correct = pred == ids
        cands = batch.get("candidates")
        extra = dict(chance=batch.get("chance"), binding=None if cands is None else Binding.of(pred, ids, cands))
        rows = torch.tensor(self._row_slices(batch), device=ids.device)  # (B,)
        for s, curve in enumerate(self.curves):
            # Every slice is updated every step (zeroed kinds outside it): no rank skips a state.
            curve.update(correct, dist, torch.where(rows[:, None] == s, kind, 0), **extra)
        self.curve_all.update(correct, dist, kind, **extra)
        local = kind == 1
        self.local.update(correct, local, rows)
        self.local.update(correct, local, results.ALL)
        self.ppl.update(logits, ids, batch["loss_weight"])

    def compute(self) -> dict[str, float]:
        """Flat, DDP-synchronised ``{key: value}``; see the class docstring for the keys."""
        out: dict[str, float] = {}
        local = {k: float(v) for k, v in self.local.compute().items()}
        for name, curve in [*zip(self.slice_names, self.curves), (results.ALL, self.curve_all)]:
            for key, value in curve.compute().items():
                out[results.slice_key(name, results.flat_metric(key))] = float(value)
            out[results.slice_key(name, results.LOCAL_ACC)] = local[name]
        out[results.PPL] = float(self.ppl.compute())
        return out

    def reset(self) -> None:
        """Clear every state (call at the start/end of each evaluation epoch)."""
        for m in self.modules():
            if isinstance(m, Metric):
                m.reset()
