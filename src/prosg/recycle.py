"""``prosg recycle``: carry trained soft prompts and SG heads over to an updated backbone, without task data.

After Lester et al. 2022 ("Reducing Retraining by Recycling Parameter-Efficient Prompts"): a method
trained on a source backbone S is transformed to work on a target T of the same family (here the same
config pretrained with another seed: a "backbone update"), with no task data, no prompt pairs and no
training on T. It is *recycled* when it then beats T's no-prompt baseline (T alone) on the task's test
accuracy (``test/all/acc``, the test split of the source run's data).

Soft prompts (prefix P_S ∈ R^{n×d_S}) use the token-embedding tables E_S ∈ R^{V×d_S}, E_T ∈ R^{V×d_T}
of the shared vocabulary (the same tokenizer: ids 0..V-1):

* ``identity``: P_T = P_S (sanity; the same width only);
* ``linear``: W = argmin_W ‖E_S W − E_T‖² (closed-form least squares, minimum norm; ``ridge`` λ adds
  λ·mean(S²)·‖W‖², S the singular values of E_S), P_T = P_S W;
* ``combination``: each prefix vector p as a least-squares combination of its ``top_k`` most similar
  source token embeddings (cosine), p ≈ cᵀ E_S[K], rebuilt with the same coefficients on the target's
  embeddings of those tokens, p_T = cᵀ E_T[K]. With k = V this is the linear recycler (both are
  P_S E_S⁺ E_T, as are ridge versions of both); a small k keeps each vector a mix of a few tokens.

SG heads (``ProSG``) read, at each target linear ℓ of block b, its prompt inputs X_ℓ and the residual
stream H_b entering the block, and write ΔW_ℓ = −η_ℓ U_ℓ V_ℓᵀ (docs/method.md). Maps are fitted by
least squares on hidden states of *task-free* text — uniformly random token sequences run through both
models, position by position (random tokens use no task data, as the paper's setting demands, and
reach every embedding): row vectors, x_S ≈ x_T A_ℓ, h_S ≈ h_T B_b, y_T ≈ y_S C_ℓ for the linear's inputs
x, block inputs h and linear outputs y. Directions the text never produces (the inputs of a linear behind
a LayerNorm span d − 1 dimensions; the head may still write outside the outputs' span) map to themselves
(``fit_linear``'s identity prior), so identical models give identity maps. The recycled head
(``RecycledHead``) keeps the source head's parameters and, on the target, reads the target's X, H
mapped into the source's spaces, so it sees inputs it knows: (U_S, V_S) = head(X_T A_ℓ, H_T B_b).
Its delta acts on target inputs x through the source's input space and is written back into the
target's output space:

    Δy_T = C_ℓᵀ Δy_S = C_ℓᵀ (−η_ℓ U_S V_Sᵀ (A_ℓᵀ x)) = −η_ℓ (C_ℓᵀ U_S)(A_ℓ V_S)ᵀ x,

so U_T = C_ℓᵀ U_S ∈ R^{o_T×r} and V_T = A_ℓ V_S ∈ R^{i_T×r}: a delta of the target's shapes, applied by
the same session machinery (parallel pass and stepping). The ``identity`` recycler uses no maps (the
numbers are exactly the source head's on a copy of the source backbone).

Evaluation, per source method (one per seed of a sweep): the target alone (the no-prompt baseline),
the source method on its own backbone, each recycled method on the target and, when the sweep has it,
the method re-trained on the target with the same seed, all on the same test set. Recycle rate = the
share of recycled methods that beat the baseline; gain kept = mean(recycled − base) /
mean(re-trained − base). ``prosg recycle`` runs (or resumes) the sweep and writes ``recycle.md`` and
``recycle.json`` into its out_dir.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prosg import results
from prosg.backbones.base import Backbone
from prosg.errors import ConfigError
from prosg.methods import GlobalPromptCell, Method, Oracle, Plain, ProSG, SoftPrompt
from prosg.sg.head import SGHead

RECYCLE_SWEEP = "sweep/recycle.yaml"  # in prosg.paths.conf_dir()
PROMPT_RECYCLERS = ("identity", "linear", "combination")
HEAD_RECYCLERS = ("identity", "linear")


# -- least squares -------------------------------------------------------------------------------------
def fit_linear(x: Tensor, y: Tensor, ridge: float = 0.0, identity_prior: bool = False, rcond: float = 1e-5) -> Tensor:
    """M = argmin ‖x M − y‖² for x (N, a), y (N, b), in closed form (float64, from the SVD x = U S Vᵀ).

    Directions of R^a the data does not determine (singular values below ``rcond`` of the largest: hidden
    states are float32, so an exact null direction shows up near 1e-7) map to zero, or with
    ``identity_prior`` (a = b) to themselves, so identical data gives exactly the identity map. ``ridge`` λ
    > 0 shrinks towards that prior instead: M = argmin ‖x M − y‖² + λ·mean(S²)·‖M − M₀‖², M₀ = 0 or I.
    """
    xs, ys = x.detach().double().cpu(), y.detach().double().cpu()
    u, sv, vh = torch.linalg.svd(xs, full_matrices=False)
    if ridge > 0:
        f = sv / (sv**2 + ridge * float((sv**2).mean().clamp(min=1e-300)))
    else:
        f = torch.where(sv > rcond * sv[0], 1.0 / sv, torch.zeros_like(sv))
    m = vh.T @ (f[:, None] * (u.T @ ys))
    if identity_prior:
        if xs.shape[1] != ys.shape[1]:
            raise ConfigError(f"an identity prior needs a square map, not {xs.shape[1]} -> {ys.shape[1]}")
        m = m + torch.eye(xs.shape[1], dtype=m.dtype) - vh.T @ ((sv * f)[:, None] * vh)
    return m.to(dtype=x.dtype, device=x.device)


# -- soft prompts --------------------------------------------------------------------------------------
@torch.no_grad()
def embedding_table(backbone: Backbone, vocab: int) -> Tensor:
    """The input embeddings (vocab, D) of token ids 0..vocab-1."""
    device = next(backbone.parameters()).device
    return backbone.embed(torch.arange(vocab, device=device)).detach()


@torch.no_grad()
def recycle_prefix(prefix: Tensor, e_src: Tensor, e_tgt: Tensor, recycler: str, top_k: int = 8,
                   ridge: float = 0.0) -> Tensor:
    """A source prefix (n, d_S) -> the target's (n, d_T), from the shared vocabulary's embeddings (module docstring)."""
    if e_src.shape[0] != e_tgt.shape[0]:
        raise ConfigError(f"the embedding tables cover {e_src.shape[0]} and {e_tgt.shape[0]} tokens; pass the shared vocabulary")
    if recycler == "identity":
        if prefix.shape[1] != e_tgt.shape[1]:
            raise ConfigError(f"the identity recycler needs equal widths (source {prefix.shape[1]}, target {e_tgt.shape[1]})")
        return prefix.clone()
    if recycler == "linear":
        return prefix @ fit_linear(e_src, e_tgt, ridge)
    if recycler == "combination":
        k = min(top_k, e_src.shape[0])
        sim = torch.nn.functional.normalize(prefix, dim=-1) @ torch.nn.functional.normalize(e_src, dim=-1).T
        rows = []
        for p, idx in zip(prefix, sim.topk(k, dim=-1).indices):
            coef = fit_linear(e_src[idx].T, p[:, None], ridge)  # (k, 1): p ≈ E_S[K]ᵀ c
            rows.append(coef[:, 0] @ e_tgt[idx])
        return torch.stack(rows)
    raise ConfigError(f"prompt recycler {recycler!r}; choose one of {', '.join(PROMPT_RECYCLERS)}")


class RecycledPrompt(SoftPrompt):
    """A soft prompt with a given (recycled) prefix instead of a trained one."""

    def __init__(self, prefix: Tensor) -> None:
        super().__init__(prefix.shape[0])
        self.recycled = prefix.detach().clone()

    def attach(self, backbone: Backbone) -> None:
        Method.attach(self, backbone)  # not SoftPrompt.attach: the prefix is given, not drawn from the vocabulary
        if self.recycled.shape[1] != backbone.d_model:
            raise ConfigError(f"the recycled prefix is {self.recycled.shape[1]} wide; the backbone's width is {backbone.d_model}")
        ref = next(backbone.parameters())
        self.prefix = torch.nn.Parameter(self.recycled.to(device=ref.device, dtype=ref.dtype))


# -- SG heads ----------------------------------------------------------------------------------------
@dataclass
class HeadMaps:
    """Linear maps between the spaces an SG head reads and writes (row vectors; module docstring)."""

    context: dict[int, Tensor] = field(default_factory=dict)  # block b -> B_b (d_T, d_S): h_S ≈ h_T B_b
    inputs: dict[str, Tensor] = field(default_factory=dict)  # linear -> A_ℓ (i_T, i_S): x_S ≈ x_T A_ℓ
    outputs: dict[str, Tensor] = field(default_factory=dict)  # linear -> C_ℓ (o_S, o_T): y_T ≈ y_S C_ℓ


@torch.no_grad()
def record_hidden(backbone: Backbone, ids: Tensor, blocks: list[int], linears: list[str]) -> dict[str, Tensor]:
    """Block inputs (``block.<b>``) and linear inputs / outputs (``in.<name>``, ``out.<name>``) on ``ids``, as (N, dim)."""
    found: dict[str, list[Tensor]] = {}
    modules = dict(backbone.named_modules())

    def keep(key: str, t: Tensor) -> None:
        found.setdefault(key, []).append(t.detach().reshape(-1, t.shape[-1]).float())
        return None  # a pre-hook returning nothing leaves the block's input as it is

    def linear_hook(name: str):
        def hook(module: torch.nn.Module, args: tuple, out: Tensor) -> None:
            keep(f"in.{name}", args[0])
            keep(f"out.{name}", out)
        return hook

    handles = [backbone.blocks[b].register_forward_pre_hook(lambda m, a, b=b: keep(f"block.{b}", a[0])) for b in blocks]
    handles += [modules[n].register_forward_hook(linear_hook(n)) for n in linears]
    try:
        backbone(ids)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in found.items()}


def task_free_ids(vocab: int, n_seqs: int = 64, seq_len: int = 64, seed: int = 0) -> Tensor:
    """Uniformly random token sequences (n_seqs, seq_len): text without any task in it."""
    return torch.randint(0, vocab, (n_seqs, seq_len), generator=torch.Generator().manual_seed(seed))


def fit_head_maps(head: SGHead, source: Backbone, target: Backbone, ids: Tensor, ridge: float = 0.0) -> HeadMaps:
    """The maps a recycled ``head`` needs, fitted on the hidden states of ``ids`` through both backbones."""
    blocks = sorted({t.block for t in head.targets})
    names = [t.name for t in head.targets]
    src = record_hidden(source, ids.to(next(source.parameters()).device), blocks, names)
    tgt = record_hidden(target, ids.to(next(target.parameters()).device), blocks, names)

    def fit(x: Tensor, y: Tensor) -> Tensor:  # same widths: what the text never shows maps to itself
        return fit_linear(x, y, ridge, identity_prior=x.shape[1] == y.shape[1])

    return HeadMaps(
        context={b: fit(tgt[f"block.{b}"], src[f"block.{b}"]) for b in blocks},
        inputs={n: fit(tgt[f"in.{n}"], src[f"in.{n}"]) for n in names},
        outputs={n: fit(src[f"out.{n}"], tgt[f"out.{n}"]) for n in names},
    )


class RecycledHead(SGHead):
    """A source SG head on a target backbone: reads the target's inputs mapped into the source's spaces and
    writes its delta back into the target's (U_T = Cᵀ U_S, V_T = A V_S); no maps = the identity recycler."""

    def __init__(self, source: SGHead, maps: HeadMaps | None = None) -> None:
        if source.mode != "synthetic":
            raise ConfigError("only a synthetic-gradient head is recycled (the oracle has no trained network to carry over)")
        super().__init__(source.target_patterns, source.rank, source.compression, source.d_hidden, source.d_layer_emb,
                         source.transform_inputs, source.mode, source.eta_init)
        self._source = [source]  # a list, so the source head is not registered as a submodule
        self.maps = maps

    def attach(self, backbone: Backbone) -> None:
        source = self._source[0]
        super().attach(source.backbone)  # the source head's targets and parameter shapes ...
        self.load_state_dict(source.state_dict())
        self._backbone_ref = [backbone]  # ... reading and writing the target's linears
        modules = dict(backbone.named_modules())
        for t in self.targets:
            lin = modules.get(t.name)
            if lin is None or backbone.block_index(t.name) != t.block:
                raise ConfigError(f"the target backbone has no linear {t.name!r} in block {t.block}; recycle between "
                                  "backbones of the same family and depth")
            if self.maps is None and (lin.in_features, lin.out_features) != (t.d_in, t.d_out):
                raise ConfigError(f"the identity recycler needs equal shapes; {t.name} is {lin.out_features}x"
                                  f"{lin.in_features} on the target, {t.d_out}x{t.d_in} on the source")
        if self.maps is None and backbone.d_model != source.backbone.d_model:
            raise ConfigError(f"the identity recycler needs equal widths ({source.backbone.d_model} vs {backbone.d_model})")

    def features(self, h: Tensor, targets: Any, block_of: Any = None) -> Tensor:
        """The source trunk on the target's block contexts H (nb, B, P, D_T) mapped into the source's: H_T B_b."""
        if self.maps is None:
            return super().features(h, targets, block_of)
        # context i is the block of the targets that read it (SGHead.features: block_of[j], or the only one)
        blocks = {0: targets[0].block} if block_of is None else {i: t.block for i, t in zip(block_of, targets)}
        mapped = torch.stack([h[i] @ self.maps.context[blocks[i]].to(h) for i in range(h.shape[0])])
        return super().features(mapped, targets, block_of)

    def factors(self, targets: Any, xs: Any, mask: Tensor, feats: Tensor | None, alpha: Tensor | None,
                grads: Any = None) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The source head's factors of the target's inputs mapped into the source's (X_T A_ℓ), written back into
        the target's spaces: U_T = C_ℓᵀ U_S, V_T = A_ℓ V_S (and Δ̂_T = Δ̂_S C_ℓ)."""
        if self.maps is None:
            return super().factors(targets, xs, mask, feats, alpha, grads)
        a = [self.maps.inputs[t.name].to(x) for t, x in zip(targets, xs)]
        made = super().factors(targets, [x @ m for x, m in zip(xs, a)], mask, feats, alpha, grads)
        out = []
        for t, m, (u, v, g) in zip(targets, a, made):
            c = self.maps.outputs[t.name].to(u)
            out.append((torch.einsum("os,bor->bsr", c, u), torch.einsum("ts,bsr->btr", m, v),
                        None if g is None else g @ c))
        return out


def recycled_sg(source: ProSG, maps: HeadMaps | None) -> ProSG:
    """A ProSG method (to attach to the target) whose head is ``source``'s, recycled with ``maps``."""
    h = source.head
    method = ProSG(h.target_patterns, h.rank, h.compression, h.d_hidden, h.d_layer_emb, h.transform_inputs,
                   h.eta_init, eta_clip=source.eta_clip)
    method.head = RecycledHead(h, maps)
    return method


def recyclers_for(method: Method) -> tuple[str, ...]:
    """The recyclers that apply to a trained method."""
    if isinstance(method, Oracle):
        raise ConfigError("the oracle has no trained network to recycle; recycle a ProSG head or a soft prompt")
    if isinstance(method, ProSG):
        return HEAD_RECYCLERS
    if type(method) is SoftPrompt:
        return PROMPT_RECYCLERS
    kind = "GPC" if isinstance(method, GlobalPromptCell) else type(method).__name__
    raise ConfigError(f"prosg recycle carries soft prompts and ProSG heads over; {kind} is neither")


def check_same_family(source: Backbone, target: Backbone) -> None:
    """Recycling maps between two backbones of one family that read the same tokenizer's ids; anything else is an error."""
    if source.family != target.family:
        raise ConfigError(f"the source backbone is {source.family or type(source).__name__} and the target "
                          f"{target.family or type(target).__name__}; recycle between backbones of the same family")
    if source.vocab_size != target.vocab_size:
        raise ConfigError(f"the source backbone's vocabulary has {source.vocab_size} ids and the target's {target.vocab_size}; "
                          "recycling needs the same tokenizer (a shared vocabulary)")


def recycle(method: Method, target: Backbone, recycler: str, fit_ids: Tensor | None = None, ridge: float = 0.0,
            top_k: int = 8) -> Method:
    """``method`` (trained on its own backbone) recycled for ``target``: a new method, not yet attached."""
    if recycler not in recyclers_for(method):
        raise ConfigError(f"recycler {recycler!r} does not apply to {type(method).__name__}; "
                          f"choose one of {', '.join(recyclers_for(method))}")
    source = method.backbone
    check_same_family(source, target)
    vocab = source.vocab_size  # the shared vocabulary: the same tokenizer's ids
    if isinstance(method, ProSG):
        if recycler == "identity":
            return recycled_sg(method, None)
        ids = fit_ids if fit_ids is not None else task_free_ids(vocab)
        return recycled_sg(method, fit_head_maps(method.head, source, target, ids, ridge))
    prefix = recycle_prefix(method.prefix.detach(), embedding_table(source, vocab), embedding_table(target, vocab),
                            recycler, top_k, ridge)
    return RecycledPrompt(prefix)


# -- evaluation --------------------------------------------------------------------------------------
def evaluate(module: Any, datamodule: Any) -> dict[str, float]:
    """Test metrics of a ``ProSGModule`` on ``datamodule``'s test split."""
    import logging

    import lightning as L

    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)  # a hundred evaluations: no "GPU available: False" banner for each
    try:
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.test(module, datamodule=datamodule, verbose=False)
    finally:
        log.setLevel(level)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def module_for(backbone: Backbone, method: Method, datamodule: Any) -> Any:
    """A ``ProSGModule`` of ``method`` on ``backbone`` with the data's facts linked (as the CLI links them)."""
    from prosg.module import ProSGModule
    from prosg.train import DATA_LINKS

    links = {arg: getattr(datamodule, fact) for fact, arg in DATA_LINKS.items()}
    return ProSGModule(backbone=backbone, method=method, **links).eval()


def headline(metrics: dict[str, float]) -> dict[str, Any]:
    """Overall prompt-fact accuracy and the farthest distance bucket's (where forgetting shows)."""
    buckets = [b for b in results.bucket_keys(metrics, under="test/all") if not math.isnan(metrics[b[0]])]
    far = buckets[-1] if buckets else None  # the farthest bucket the test set has answers in
    return {"acc": metrics.get("test/all/acc", math.nan), "far": metrics[far[0]] if far else math.nan,
            "far_bucket": results.bucket_label(far[1], far[2]) if far else ""}


@dataclass
class Case:
    """One trained source method to recycle: its checkpoint, and the same method re-trained on the target."""

    label: str | None  # the method's name in the table (its sweep label; None: the method's own name)
    seed: int | None
    source_ckpt: Path
    retrained_ckpt: Path | None = None


def recycle_case(case: Case, target_dir: str, recyclers: list[str] | None, fit: dict[str, Any],
                 base_cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every number of one source method: source on source, base, recycled (per recycler), re-trained."""
    from prosg.backbones import from_pretrained
    from prosg.generate_cli import checkpoint_datamodule, load_checkpoint, open_checkpoint

    src, saved = open_checkpoint(str(case.source_ckpt))
    src.eval()
    dm = checkpoint_datamodule(saved)
    if dm is None:
        raise ConfigError(f"{case.source_ckpt}: the checkpoint's data cannot be rebuilt here, so there is no test set to score on")
    data_key = json.dumps(saved.get("datamodule_hyper_parameters"), sort_keys=True, default=str)
    target = from_pretrained(target_dir).eval()
    check_same_family(src.backbone, target)  # before any evaluation: a one-line error, not a stack of them
    if data_key not in base_cache:  # the target alone, once per test set
        base_cache[data_key] = headline(evaluate(module_for(target, Plain(), dm), dm))
    record: dict[str, Any] = {"method": case.label or src.method.name, "seed": case.seed, "source_ckpt": str(case.source_ckpt),
                              "kind": type(src.method).__name__, "base": base_cache[data_key],
                              "source": headline(evaluate(src, dm)), "recycled": {}}
    ids = task_free_ids(target.vocab_size, fit["seqs"], fit["len"], fit["seed"])
    for name in recyclers or recyclers_for(src.method):
        if name not in recyclers_for(src.method):
            continue
        method = recycle(src.method, target, name, ids, fit["ridge"], fit["top_k"])
        record["recycled"][name] = headline(evaluate(module_for(target, method, dm), dm))
    if case.retrained_ckpt is not None:
        record["retrained_ckpt"] = str(case.retrained_ckpt)
        record["retrained"] = headline(evaluate(load_checkpoint(str(case.retrained_ckpt)).eval(), dm))
    return record


def _mean(xs: list[float]) -> float:
    return results.mean_std(xs).mean


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and recycler: recycle rate, mean accuracies, the share of the re-trained gain kept."""
    rows = []
    for label in dict.fromkeys(r["method"] for r in records):
        mine = [r for r in records if r["method"] == label]
        for name in dict.fromkeys(n for r in mine for n in r["recycled"]):
            have = [r for r in mine if name in r["recycled"]]
            rec = [r["recycled"][name] for r in have]
            base = [r["base"] for r in have]
            re = [r["retrained"] for r in have if "retrained" in r]
            paired = [(r["recycled"][name]["acc"] - r["base"]["acc"], r["retrained"]["acc"] - r["base"]["acc"])
                      for r in have if "retrained" in r]
            gain = _mean([p[1] for p in paired]) if paired else math.nan
            rows.append({
                "method": label, "recycler": name, "n": len(have),
                "recycled": sum(x["acc"] > b["acc"] for x, b in zip(rec, base)),
                "rate": sum(x["acc"] > b["acc"] for x, b in zip(rec, base)) / len(have),
                "base_acc": _mean([b["acc"] for b in base]), "acc": _mean([x["acc"] for x in rec]),
                "retrained_acc": _mean([x["acc"] for x in re]), "source_acc": _mean([r["source"]["acc"] for r in have]),
                "gain_kept": _mean([p[0] for p in paired]) / gain if paired and gain != 0 else math.nan,
                "base_far": _mean([b["far"] for b in base]), "far": _mean([x["far"] for x in rec]),
                "retrained_far": _mean([x["far"] for x in re]),
                "far_bucket": have[0]["base"]["far_bucket"],
            })
    return rows


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The recycle-rate table."""
    def pct(x: float) -> str:
        return "–" if math.isnan(x) else f"{100 * x:.1f}"

    far = rows[0]["far_bucket"] if rows else ""
    head = ["method", "recycler", "recycled / sources", "recycle rate %", "acc: target alone", "recycled",
            "re-trained on target", "source on source", "gain kept %", f"far d {far}: target alone", "recycled",
            "re-trained"]
    lines = [f"## {title}", "", "Test prompt-fact accuracy % (mean over sources). A recycled method counts when it beats "
             "the target alone on the same test set; gain kept = mean(recycled − alone) / mean(re-trained − alone).", "",
             *results.md_head(head)]
    for r in rows:
        cells = [r["method"], r["recycler"], f"{r['recycled']} / {r['n']}", pct(r["rate"]), pct(r["base_acc"]),
                 pct(r["acc"]), pct(r["retrained_acc"]), pct(r["source_acc"]), pct(r["gain_kept"]), pct(r["base_far"]),
                 pct(r["far"]), pct(r["retrained_far"])]
        lines.append(results.md_row(cells))
    return "\n".join(lines) + "\n"


# -- the command ---------------------------------------------------------------------------------------
def last_checkpoint(run_dir: Path) -> Path:
    """The newest ``last.ckpt`` a run wrote."""
    found = sorted(run_dir.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"{run_dir} holds no last.ckpt; did the run finish (status.json), with checkpointing on?")
    return found[-1]


def sweep_cases(sweep: Any, runs: list[Any], axis: str, source: str, target: str) -> tuple[list[Case], str]:
    """Cases from a finished sweep: runs labelled ``source`` on ``axis`` (their twins labelled ``target`` re-train
    them on the target); the target backbone is the target runs' ``model.pretrained``."""
    from prosg.sweep import read_status

    if not any(axis in r.labels for r in runs):
        raise ConfigError(f"{sweep.path}: no axis {axis!r}; name the axis whose labels are the source and target backbones (--axis)")
    sources = [r for r in runs if r.labels.get(axis) == source]
    targets = {(tuple(sorted((k, v) for k, v in r.labels.items() if k != axis)), r.seed): r
               for r in runs if r.labels.get(axis) == target}
    dirs = {r.overrides.get("model.pretrained") for r in runs if r.labels.get(axis) == target}
    if not sources or len(dirs) != 1 or None in dirs:
        raise ConfigError(f"{sweep.path}: axis {axis!r} needs runs labelled {source!r} and {target!r}, the latter with "
                          f"one model.pretrained (found {sorted(map(str, dirs))})")
    cases = []
    for r in sources:
        twin = targets.get((tuple(sorted((k, v) for k, v in r.labels.items() if k != axis)), r.seed))
        label = "-".join(v for k, v in r.labels.items() if k != axis) or "method"
        done = twin is not None and read_status(sweep.out_dir / twin.name).get("status") == "done"
        cases.append(Case(label, r.seed, last_checkpoint(sweep.out_dir / r.name),
                          last_checkpoint(sweep.out_dir / twin.name) if done else None))
    return cases, str(dirs.pop())


def pretrained_exist(runs: list[Any]) -> None:
    """Stop before training when a backbone the runs load is missing (it is made by `prosg pretrain`)."""
    missing = sorted({str(p) for r in runs if (p := r.overrides.get("model.pretrained")) and not Path(p).exists()})
    if missing:
        raise ConfigError(f"the sweep's backbones {', '.join(missing)} do not exist here; make them first with "
                          "`prosg pretrain` (run from the directory they are relative to)")


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the recycling sweep, recycle every source method to the target, write the table."""
    from prosg.sweep.command import run_sweep, sweep_options

    p = argparse.ArgumentParser(prog="prosg recycle", description=__doc__.split("\n\n")[0])
    sweep_options(p, RECYCLE_SWEEP)
    p.add_argument("--axis", default="backbone", help="the sweep axis whose labels are the backbones (default: backbone)")
    p.add_argument("--source", default="source", help="its label of the source backbone (default: source)")
    p.add_argument("--target", default="target", help="its label of the target backbone (default: target)")
    p.add_argument("--ckpt", nargs="*", help="instead of a sweep: `prosg fit` checkpoints of source methods")
    p.add_argument("--retrained", nargs="*", help="with --ckpt: the same methods re-trained on the target (in order)")
    p.add_argument("--target-backbone", help="with --ckpt: the target backbone (any layout from_pretrained knows)")
    p.add_argument("--recyclers", nargs="*", help=f"which recyclers (default: all that apply: {', '.join(PROMPT_RECYCLERS)})")
    p.add_argument("--fit-seqs", type=int, default=64, help="random sequences the head maps are fitted on (default 64)")
    p.add_argument("--fit-len", type=int, default=64, help="their length (default 64)")
    p.add_argument("--ridge", type=float, default=0.0, help="ridge λ of every fitted map, relative (default 0: least squares)")
    p.add_argument("--top-k", type=int, default=8, help="tokens per prefix vector of the combination recycler (default 8)")
    p.add_argument("--out", help="where recycle.md / recycle.json go (default: the sweep's out_dir, or .)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.recyclers or []) - set(PROMPT_RECYCLERS) - set(HEAD_RECYCLERS))
    if unknown:
        raise ConfigError(f"--recyclers {unknown}; choose from {', '.join(PROMPT_RECYCLERS)}")
    if args.fit_seqs < 1 or args.fit_len < 1 or args.top_k < 1 or args.ridge < 0:
        raise ConfigError("--fit-seqs, --fit-len and --top-k must be >= 1 and --ridge >= 0")

    if args.ckpt:
        if not args.target_backbone:
            raise ConfigError("--ckpt needs --target-backbone (the backbone to recycle onto)")
        if args.retrained and len(args.retrained) != len(args.ckpt):
            raise ConfigError(f"--retrained gives {len(args.retrained)} checkpoints for {len(args.ckpt)} --ckpt; pair them in order")
        cases = [Case(None, None, Path(c), Path(r) if r else None)
                 for c, r in zip(args.ckpt, args.retrained or [None] * len(args.ckpt))]
        target_dir, title, out, outcome = args.target_backbone, f"Recycled onto {args.target_backbone}", Path(args.out or "."), None
    else:
        outcome = run_sweep(args, RECYCLE_SWEEP, check=pretrained_exist)
        sweep, failed = outcome.sweep, outcome.failed
        done = [r for r in outcome.runs if r.name not in failed]
        cases, target_dir = sweep_cases(sweep, done, args.axis, args.source, args.target)
        title = f"Recycling {sweep.name}: {args.source} -> {args.target} ({target_dir})"
        out = Path(args.out) if args.out else sweep.out_dir
    if not Path(target_dir).exists():
        raise ConfigError(f"the target backbone {target_dir} does not exist; make it first (`prosg pretrain`)")
    fit = {"seqs": args.fit_seqs, "len": args.fit_len, "seed": 0, "ridge": args.ridge, "top_k": args.top_k}
    base_cache: dict[str, dict[str, Any]] = {}
    records = []
    for case in cases:
        print(f"recycling {case.source_ckpt}", file=sys.stderr)
        records.append(recycle_case(case, target_dir, args.recyclers, fit, base_cache))
    rows = summarise(records)
    text = markdown(rows, title)
    out.mkdir(parents=True, exist_ok=True)
    from prosg.results import json_number

    def clean(obj: Any) -> Any:
        if isinstance(obj, float):
            return json_number(obj)
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        return [clean(v) for v in obj] if isinstance(obj, list) else obj

    (out / "recycle.json").write_text(json.dumps(clean({"target": target_dir, "fit": fit, "summary": rows,
                                                        "sources": records}), indent=2) + "\n")
    (out / "recycle.md").write_text(text)
    print(text)
    print(f"wrote {out / 'recycle.md'} and {out / 'recycle.json'}", file=sys.stderr)
    return 0 if outcome is None else outcome.exit_status()
