"""Free-running instruction following: does a model still apply a rule of its prompt after writing d tokens?

For test example i of the ``instruction`` task (prompt: ``In your story, the dog is named falcon, the
bird is named comet.``), the model (any ``Method`` on any backbone: plain, JRT, soft prompt, ProSG)

1. reads the prompt its own way and GENERATES FREELY d tokens of its own story (greedy, or sampled with
   a seeded generator; d drawn per example bucket-first over the distance buckets, like the task's own
   distances);
2. is given the trigger cue ``The <adjective> <trigger> named `` as forced text after its story
   (``generate(..., forced=...)``: it reaches the model through the state, the method's delta in place);
3. writes the name itself. The rule appears nowhere in its input but the prompt, and the story it wrote
   does not say which name the asked trigger has (``leak`` counts the stories that do name it).

``check`` scores the first word it writes: ``acc`` = the rule's name (compliance), ``letter`` = its first
letter right (what the teacher-forced task scores), ``bind_err`` = the name another rule gave another
trigger (binding error), ``not_prompt`` = a name of the pool that the prompt did not use, ``not_name`` =
anything else. Per distance bucket (d = tokens of free text before the cue; bytes for byte-level models)
they are reported with chance (1 / pool size) and the value-set ceiling (1 / number of rules), under the
keys ``<split>/free/<mode>/<stat>@<lo>-<hi>`` (``prosg.results``), beside the teacher-forced proxy
(``<split>/all/...``: the first byte of the name predicted after the task's own teacher-forced story).

Used three ways: ``prosg lm-eval`` (a checkpoint or a bare backbone -> results.json, results.md,
compliance.png), ``FreeRunningEval`` (a callback that adds the metrics to ``prosg test`` and to every
run of a sweep), and the sweep report (``sections``: the compliance table and plot over seeds).
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import numpy as np

from prosg import results
from prosg.data.tasks import SPLIT_IDS, InstructionTask, default_bucket_edges, generate_example
from prosg.data.tasks.base import draw_distance
from prosg.data.tasks.instruction import ADJECTIVES, NAMES
from prosg.errors import ConfigError

MODES = ("greedy", "sampled")
LETTER, NOT_NAME, LEAK = "letter", "not_name", "leak"
OUTCOMES = (results.ACC, results.BIND_ERR, results.NOT_PROMPT, NOT_NAME)  # exclusive; they sum to 1
STATS = (*OUTCOMES, LETTER, LEAK)
FREE = results.FREE
STREAM = 7  # the free-running draws (d, adjective) use their own RNG stream beside the example's


def free_slice(mode: str) -> str:
    """``free/<mode>``: the metric slice of one decoding mode."""
    return f"{FREE}/{mode}"


# -- the checker ----------------------------------------------------------------------------------
def first_word(text: str) -> str:
    """The first run of letters of ``text`` after leading whitespace, lower-cased ('' if it starts otherwise)."""
    m = re.match(r"\s*([A-Za-z]+)", text)
    return m[1].lower() if m else ""


def check(generated: str, rules: dict[str, str], asked: str, pool: Sequence[str]) -> dict[str, float]:
    """Score the text written after the cue: one exclusive outcome (``OUTCOMES``) plus ``letter``."""
    word, name = first_word(generated), rules[asked]
    others = {n for t, n in rules.items() if t != asked}
    outcome = (results.ACC if word == name else results.BIND_ERR if word in others
               else results.NOT_PROMPT if word in pool and word not in rules.values() else NOT_NAME)
    scores = {o: float(o == outcome) for o in OUTCOMES}
    scores[LETTER] = float(bool(word) and word[0] == name[0])
    return scores


def mentions(text: str, name: str) -> bool:
    """Whether ``name`` occurs as a word in ``text`` (the model's own story gave the answer away)."""
    return re.search(rf"\b{re.escape(name)}\b", text, re.IGNORECASE) is not None


def cue_text(story: str, adjective: str, trigger: str) -> str:
    """The forced cue after a story: ``The <adjective> <trigger> named ``, joined to the story as a new sentence."""
    cue = f"The {adjective} {trigger} named "
    if not story or story[-1].isspace():
        return cue
    return (" " if story[-1] in ".!?" else ". ") + cue


# -- the examples ---------------------------------------------------------------------------------
@dataclass
class Item:
    """One evaluation example: the rules, the asked trigger, the story length d, and what happened."""

    index: int
    rules: dict[str, str]
    asked: str
    adjective: str
    distance: int
    prompt_ids: list[int]
    candidates: list[int]
    example: dict[str, Any]
    story: str = ""
    cue: str = ""
    generated: str = ""
    scores: dict[str, float] = field(default_factory=dict)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """``<bos> text <sep>`` with the ids the tokenizer has (the byte tokenizer's is the task's own prompt)."""
    bos, sep = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "sep_id", None)
    return ([bos] if bos is not None else []) + tokenizer.encode(text) + ([sep] if sep is not None else [])


def make_items(task: InstructionTask, tokenizer: Any, n: int, seed: int, edges: Sequence[int],
               max_distance: int, split: str = "test") -> list[Item]:
    """Examples 0..n-1 of ``split`` (the task's own prompts and asked triggers), each with a story length d
    drawn bucket-first in [0, max_distance] and a cue adjective, from its own RNG stream."""
    items = []
    for i in range(n):
        ex = generate_example([task], [1.0], seed, split, i)
        rng = np.random.default_rng([int(seed), SPLIT_IDS[split], i, STREAM])
        d = draw_distance(rng, list(range(max_distance + 1)), list(edges))
        rules, asked = dict(ex["meta"]["rules"]), ex["meta"]["asked"]
        text = InstructionTask._instruction_text(list(rules.items()))
        items.append(Item(i, rules, asked, ADJECTIVES[int(rng.integers(len(ADJECTIVES)))], d,
                          encode_prompt(tokenizer, text), [tokenizer.encode(nm)[0] for nm in rules.values()], ex))
    return items


# -- generation ------------------------------------------------------------------------------------
@dataclass
class Decoding:
    """How one mode decodes: greedy (temperature 0) or sampled (temperature, top-k, top-p, seed)."""

    mode: str
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0


def decodings(modes: Sequence[str], temperature: float, top_k: int | None, top_p: float | None, seed: int) -> list[Decoding]:
    """The ``Decoding`` of each mode name (``greedy``, ``sampled``)."""
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise ConfigError(f"modes {list(modes)}: choose among {list(MODES)}")
    if temperature <= 0 and "sampled" in modes:
        raise ConfigError(f"temperature {temperature} must be > 0 for the sampled mode (greedy is its own mode)")
    return [Decoding(m, 0.0) if m == "greedy" else Decoding(m, temperature, top_k, top_p, seed) for m in modes]


def text_only(tokenizer: Any, vocab_size: int) -> Callable:
    """A step hook that keeps decoding to text: special ids and ids the tokenizer cannot decode get -inf."""
    import torch

    from prosg.data.tokenizers import ByteTokenizer

    banned = torch.zeros(vocab_size, dtype=torch.bool)
    banned[min(int(getattr(tokenizer, "vocab_size", vocab_size)), vocab_size):] = True
    if isinstance(tokenizer, ByteTokenizer):
        banned[256:] = True
    for name in ("pad_id", "eos_id", "bos_id", "sep_id"):
        idx = getattr(tokenizer, name, None)
        if idx is not None and idx < vocab_size:
            banned[idx] = True

    def hook(t: int, logits):
        return logits.masked_fill(banned.to(logits.device), float("-inf"))

    return hook


def run_items(method: Any, items: list[Item], tokenizer: Any, dec: Decoding, batch_size: int = 32,
              name_tokens: int = 8, device: Any = "cpu") -> None:
    """Story, cue, name for every item (filled in place): prompts of equal length share a batch."""
    import torch

    from prosg.generate import generate

    vocab = method.backbone.vocab_size
    hooks = [text_only(tokenizer, vocab)]
    gen = torch.Generator(device=device).manual_seed(dec.seed)
    kw = dict(temperature=dec.temperature, top_k=dec.top_k, top_p=dec.top_p, hooks=hooks, generator=gen)
    by_len: dict[int, list[Item]] = {}
    for it in items:
        by_len.setdefault(len(it.prompt_ids), []).append(it)
    for _, group in sorted(by_len.items()):
        for chunk in (group[i : i + batch_size] for i in range(0, len(group), batch_size)):
            prompts = torch.tensor([it.prompt_ids for it in chunk], device=device)
            longest = max(it.distance for it in chunk)
            # one free-running pass per chunk: the first d tokens of a longer story are the story of length d
            story = generate(method, prompts, longest, **kw) if longest else prompts.new_zeros(len(chunk), 0)
            forced: dict[int, list[tuple[Item, list[int]]]] = {}
            for row, it in enumerate(chunk):
                own = story[row, : it.distance].tolist()
                it.story = tokenizer.decode(own)
                it.cue = cue_text(it.story, it.adjective, it.asked)
                ids = own + tokenizer.encode(it.cue)
                forced.setdefault(len(ids), []).append((it, ids))
            for _, rows in sorted(forced.items()):  # the cue is forced text: equal lengths share a call
                p = torch.tensor([it.prompt_ids for it, _ in rows], device=device)
                f = torch.tensor([ids for _, ids in rows], device=device)
                answers = torch.tensor([it.candidates for it, _ in rows], device=device)
                new = generate(method, p, name_tokens, forced=f, answers=answers, **kw)
                for (it, _), out in zip(rows, new.tolist()):
                    it.generated = tokenizer.decode(out)


def score_items(items: list[Item], pool: Sequence[str]) -> None:
    """Fill every item's scores: the checker's outcome and letter, and whether its story leaked the name."""
    for it in items:
        it.scores = {**check(it.generated, it.rules, it.asked, pool), LEAK: float(mentions(it.story, it.rules[it.asked]))}


def bucket_metrics(items: list[Item], edges: Sequence[int], slice_: str, split: str, chance: float,
                   ceiling: float) -> dict[str, float]:
    """Flat keys ``<split>/<slice>/<stat>@lo-hi`` per bucket (+ the open last one) and overall ``<stat>``."""
    bounds = [*zip(edges, edges[1:]), (edges[-1], math.inf)]
    out: dict[str, float] = {}
    key = lambda metric: results.metric_key(split, slice_, metric)  # noqa: E731
    for lo, hi in bounds:
        inside = [it for it in items if lo <= it.distance < hi]
        if not inside and math.isinf(hi):
            continue  # the open bucket only when distances reach it
        mean = lambda s: float(np.mean([it.scores[s] for it in inside])) if inside else math.nan  # noqa: E731,B023
        for stat in STATS:
            out[key(results.bucket_metric(lo, hi, stat))] = mean(stat)
        out[key(results.bucket_metric(lo, hi, results.CHANCE))] = chance if inside else math.nan
        out[key(results.bucket_metric(lo, hi, results.CEILING))] = ceiling if inside else math.nan
        out[key(results.bucket_metric(lo, hi, results.COUNT))] = float(len(inside))
        ds = [it.distance for it in inside]
        out[key(results.bucket_metric(lo, hi, results.DMIN))] = float(min(ds)) if ds else math.nan
        out[key(results.bucket_metric(lo, hi, results.DMAX))] = float(max(ds)) if ds else math.nan
    for stat in STATS:
        out[key(stat)] = float(np.mean([it.scores[stat] for it in items])) if items else math.nan
    return out


def teacher_forced(method: Any, items: list[Item], task: InstructionTask, edges: Sequence[int], split: str,
                   batch_size: int = 32, device: Any = "cpu") -> dict[str, float]:
    """The teacher-forced proxy on the same examples: the name's first byte after the task's own story."""
    import torch

    from prosg.data.collate import collate
    from prosg.metrics import ForgettingMetrics

    metrics = ForgettingMetrics(list(edges), [task.name], [task.slice_n])
    pad = task.pad_id
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            batch = collate([it.example for it in items[i : i + batch_size]], pad)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            batch = method.prepare(batch, pad)
            metrics.update(batch, method(batch).logits.float())
    return {f"{split}/{k}": v for k, v in metrics.compute().items()}


def evaluate(method: Any, task: InstructionTask, tokenizer: Any, n: int = 128, seed: int = 0,
             edges: Sequence[int] | None = None, max_distance: int | None = None,
             modes: Sequence[Decoding] = (Decoding("greedy"),), batch_size: int = 32, name_tokens: int = 8,
             split: str = "test", proxy: bool = True, device: Any = "cpu") -> tuple[dict[str, float], dict[str, list[Item]]]:
    """Every mode on ``n`` examples: flat metrics (free-running, and the teacher-forced proxy when the
    tokenizer is the task's bytes) and the scored items per mode."""
    from prosg.data.tokenizers import ByteTokenizer

    max_distance = task.distance_range[1] if max_distance is None else int(max_distance)
    edges = list(edges) if edges is not None else default_bucket_edges(max_distance + 1, first=32)
    if n < 1 or max_distance < 0:
        raise ConfigError(f"n={n} must be >= 1 and max_distance={max_distance} >= 0")
    pool = NAMES[: task.n_keywords]
    metrics: dict[str, float] = {}
    scored: dict[str, list[Item]] = {}
    was_training = method.training
    method.eval()
    try:
        for dec in modes:
            items = make_items(task, tokenizer, n, seed, edges, max_distance, split)
            run_items(method, items, tokenizer, dec, batch_size, name_tokens, device)
            score_items(items, pool)
            metrics.update(bucket_metrics(items, edges, free_slice(dec.mode), split, 1 / task.n_keywords, 1 / task.n_facts))
            scored[dec.mode] = items
        if proxy and isinstance(tokenizer, ByteTokenizer):
            metrics.update(teacher_forced(method, next(iter(scored.values())), task, edges, split, batch_size, device))
    finally:
        method.train(was_training)
    return metrics, scored


# -- the callback: the same metrics at the end of `prosg test` and of every sweep run -------------
class FreeRunningEval(L.Callback):
    """At the end of testing, the free-running instruction evaluation of the model under test, logged as
    ``test/free/<mode>/...`` next to the teacher-forced metrics (so a sweep's metrics.json holds both).

    The task is the first ``instruction`` task of the test split of the DataModule (its prompts, pool and
    distances: d up to its longest query distance), the buckets are the DataModule's; ``n_examples`` per
    mode. Add it with ``trainer.callbacks+: {class_path: prosg.lmeval.FreeRunningEval}``.
    """

    def __init__(self, n_examples: int = 128, modes: list[str] = list(MODES), temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = 0.9, batch_size: int = 32, name_tokens: int = 8,
                 max_distance: int | None = None) -> None:
        super().__init__()
        self.n, self.batch_size, self.name_tokens, self.max_distance = n_examples, batch_size, name_tokens, max_distance
        self.modes = decodings(modes, temperature, top_k, top_p, 0)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        tasks = [t for t in getattr(dm, "split_tasks", {}).get("test", []) if isinstance(t, InstructionTask)]
        if not tasks:
            raise ConfigError("FreeRunningEval needs an instruction task in the test split of a ConstructedDataModule; "
                              "add {name: instruction} to data.init_args.tasks or drop the callback")
        task = tasks[0]
        for dec in self.modes:
            dec.seed = int(dm.seed)
        metrics, _ = evaluate(pl_module.method, task, task.tokenizer, self.n, int(dm.seed), dm.bucket_edges,
                              self.max_distance, self.modes, self.batch_size, self.name_tokens, "test", proxy=False,
                              device=pl_module.device)
        pl_module.log_dict({k: float(v) for k, v in metrics.items()}, sync_dist=True)


# -- reports ----------------------------------------------------------------------------------------
def modes_in(keys: Any, split: str = "test") -> list[str]:
    """The free-running modes that have bucket metrics among ``keys``, in ``MODES`` order."""
    found = {p.slice.split("/", 1)[1] for k in keys if (p := results.parse_key(k)) is not None and p.split == split
             and p.slice is not None and p.slice.startswith(f"{FREE}/") and p.bucket is not None}
    return [m for m in MODES if m in found] + sorted(found - set(MODES))


def _pct(stats: results.Stats) -> str:
    """``mean ± std`` in % (the std only over two or more seeds); ``–`` without values."""
    if stats.n == 0:
        return "–"
    return f"{100 * stats.mean:.1f}" + (f" ± {100 * stats.std:.1f}" if stats.n > 1 and not math.isnan(stats.std) else "")


def _buckets(rows: list[dict], where: str) -> list[tuple[int, float]]:
    """The (lo, hi) distance buckets with data under the prefix ``where``, nearest first."""
    keys = {k for r in rows for k, v in r["metrics"].items() if not math.isnan(v)}
    return [(lo, hi) for _, lo, hi in results.bucket_keys(keys, under=where)]


def _letter_leak(rows: list[dict], group_of: Callable, group_names: Sequence[str], split: str, where: str) -> str:
    """Per group and bucket: first letter right % (mean ± std over seeds) / stories that leaked the name %."""
    buckets = _buckets(rows, results.prefix(split, where))
    head = [*group_names, *(f"d {results.bucket_label(lo, hi)}" for lo, hi in buckets)]
    lines = results.md_head(head)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(group_of(r)), []).append(r)
    for g, group in groups.items():
        cells = []
        for lo, hi in buckets:
            stat = lambda s: results.cell_stats(group, results.metric_key(split, where, results.bucket_metric(lo, hi, s)))  # noqa: E731,B023
            cells.append(f"{_pct(stat(LETTER))} / {_pct(stat(LEAK))}")
        lines.append(results.md_row([*g, *cells]))
    return "\n".join(lines)


def markdown(rows: list[dict], group_of: Callable, group_names: Sequence[str], split: str = "test") -> str:
    """Per mode: compliance (the rule's name written) by distance bucket, mean ± std over seeds, with binding
    errors, the distances each bucket held, chance and the value-set ceiling; first letter right and leaked
    stories. (The teacher-forced proxy of the same runs is the report's forgetting table.)"""
    keys = {k for r in rows for k in r["metrics"]}
    parts = []
    for mode in modes_in(keys, split):
        where = free_slice(mode)
        table = results.forgetting_table(rows, group_of, split, where)
        parts.append(f"### Free-running, {mode}: the rule's name written after d tokens of the model's own text\n\n"
                     "Compliance % (mean ± std over seeds; bind = the other rule's name written instead); d = tokens "
                     "(bytes) the model wrote before the cue.\n\n" + results.forgetting_markdown(table, group_names)
                     + f"\n\nFirst letter right % (what the teacher-forced task scores) / stories that already named the "
                     f"asked trigger's name % ({mode}):\n\n" + _letter_leak(rows, group_of, group_names, split, where))
    return "\n\n".join(parts) + ("\n" if parts else "")


def model_markdown(metrics: dict[str, float], title: str, split: str = "test") -> str:
    """One evaluated model: per mode a row per distance bucket with every statistic, the teacher-forced proxy beside."""
    parts = [f"# Free-running instruction following: {title}"]
    names = {results.ACC: "compliance", LETTER: "first letter", results.BIND_ERR: "binding error",
             results.NOT_PROMPT: "other pool name", NOT_NAME: "not a name", LEAK: "story leaked it"}
    pct = lambda v: "–" if v is None or math.isnan(v) else f"{100 * v:.1f}"  # noqa: E731
    for mode in modes_in(metrics, split):
        where = results.prefix(split, free_slice(mode))
        head = ["d", "n", "distances", *names.values(), "chance / ceiling", "teacher-forced"]
        lines = results.md_head(head)
        for lo, hi in _buckets([{"metrics": metrics}], where):
            get = lambda stat, w=where: metrics.get(f"{w}/{results.bucket_metric(lo, hi, stat)}", math.nan)  # noqa: E731,B023
            tf = metrics.get(results.metric_key(split, results.ALL, results.bucket_metric(lo, hi)), math.nan)
            lines.append(results.md_row([
                results.bucket_label(lo, hi), f"{get(results.COUNT):.0f}", f"{get(results.DMIN):.0f}–{get(results.DMAX):.0f}",
                *(pct(get(s)) for s in names), f"{pct(get(results.CHANCE))} / {pct(get(results.CEILING))}", pct(tf)]))
        overall = ", ".join(f"{names[s]} {pct(metrics.get(f'{where}/{s}', math.nan))} %" for s in names)
        parts.append(f"## {mode}\n\n%; d = tokens (bytes) the model wrote before the cue; the teacher-forced column is "
                     f"the first byte of the name after the task's own story, by the name's position.\n\n"
                     + "\n".join(lines) + f"\n\nOverall: {overall}.")
    return "\n\n".join(parts) + "\n"


def plot(rows: list[dict], group_of: Callable, out: Path, title: str, split: str = "test") -> list[Path]:
    """``compliance_<mode>.png`` per mode: compliance vs distance, one line per group (mean ± std over seeds)."""
    from prosg import plots

    files = []
    for mode in modes_in({k for r in rows for k in r["metrics"]}, split):
        groups: dict[str, list[dict[str, float]]] = {}
        for r in rows:
            groups.setdefault("-".join(group_of(r)) or "all", []).append(r["metrics"])
        path = out / f"compliance_{mode}.png"
        if plots.forgetting_curves(groups, results.prefix(split, free_slice(mode)), path,
                                   title=f"{title}: free-running compliance ({mode})",
                                   ylabel="rule's name written (compliance)"):
            files.append(path)
    return files


def sections(rows: list[dict], axis_names: list[str], out: Path, title: str,
             plots: bool = True) -> tuple[str, list[Path]]:
    """For a sweep report: the free-running tables (markdown) and plots of the runs that have them."""
    done = [r for r in rows if r["metrics"]]
    split = "test" if any(k.startswith("test/") for r in done for k in r["metrics"]) else "val"
    if not done or not modes_in({k for r in done for k in r["metrics"]}, split):
        return "", []
    group_of = lambda r: [r["labels"].get(a, "–") for a in axis_names]  # noqa: E731
    md = (f"\n## Free-running instruction following ({split})\n\nThe model writes its own story for d tokens after the "
          "prompt, the cue `The <adjective> <trigger> named ` is appended, and the name it writes is checked against "
          "the rule (prosg.lmeval); the teacher-forced proxy on the same checkpoints is the forgetting table above.\n\n"
          + markdown(done, group_of, axis_names or ["run"], split))
    return md, plot(done, group_of, out, title, split) if plots else []


# -- prosg lm-eval ------------------------------------------------------------------------------------
def _parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="prosg lm-eval", description=__doc__.splitlines()[0], exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    p.add_argument("--ckpt", type=str | None, default=None, help="checkpoint written by `prosg fit` (method included)")
    p.add_argument("--pretrained", type=str | None, default=None, help="a bare backbone (any layout from_pretrained knows)")
    p.add_argument("--tokenizer", type=str | None, default=None,
                   help="'byte', a tokenizer.json or an rwkv_vocab_*.txt (default: the checkpoint data's, else byte)")
    p.add_argument("--out", type=str, default="runs/lm_eval", help="where results.json, results.md, compliance.png go")
    p.add_argument("--n", type=int, default=128, help="examples per mode")
    p.add_argument("--modes", type=list[str], default=list(MODES), help="greedy and/or sampled")
    p.add_argument("--temperature", type=float, default=1.0, help="of the sampled mode")
    p.add_argument("--top-k", type=int | None, default=None)
    p.add_argument("--top-p", type=float | None, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="draws the examples, the distances and the samples")
    p.add_argument("--n-facts", type=int | None, default=None, help="rules per prompt (default: the checkpoint data's, else 2)")
    p.add_argument("--n-keywords", type=int | None, default=None, help="name pool size (default: the data's, else 16)")
    p.add_argument("--max-distance", type=int | None, default=None,
                   help="longest story before the cue, in tokens (default: the data's test distances, else 512)")
    p.add_argument("--bucket-edges", type=list[int] | None, default=None, help="distance buckets (default: doubling from 32)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--name-tokens", type=int, default=8, help="tokens generated after the cue (the name)")
    p.add_argument("--device", type=str, default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", type=str, default="float32", help="float32, bfloat16 or float16")
    return p


def _task(a: Any, dm: Any) -> InstructionTask:
    """The instruction task to evaluate: the checkpoint data's test task, with the options given applied."""
    base = next((t for t in getattr(dm, "split_tasks", {}).get("test", []) if isinstance(t, InstructionTask)), None)
    n_facts = a.n_facts or (base.n_facts if base else 2)
    n_keywords = a.n_keywords or (base.n_keywords if base else 16)
    hi = a.max_distance if a.max_distance is not None else (base.distance_range[1] if base else 512)
    return InstructionTask(n_facts=n_facts, n_keywords=n_keywords, query_distances=[0, hi],
                           response_len=hi + InstructionTask._longest_sentence())


def main(argv: list[str] | None = None) -> int:
    """``prosg lm-eval``: evaluate one model, write results.json / results.md / compliance_<mode>.png."""
    from jsonargparse import ArgumentError

    try:
        a = _parser().parse_args(argv)
    except ArgumentError as e:
        raise ConfigError(f"{str(e).splitlines()[0]} (see `prosg lm-eval -h`)") from None
    from prosg.data.tokenizers import load_tokenizer
    from prosg.generate_cli import load_model

    method, dm = load_model(a.ckpt, a.pretrained, a.device, a.dtype)
    tokenizer = load_tokenizer(a.tokenizer or getattr(dm, "tokenizer_spec", None) or "byte")
    task = _task(a, dm)
    edges = a.bucket_edges or default_bucket_edges(task.distance_range[1] + 1, first=32)
    modes = decodings(a.modes, a.temperature, a.top_k, a.top_p, a.seed)
    metrics, scored = evaluate(method, task, tokenizer, a.n, a.seed, edges, task.distance_range[1], modes,
                               a.batch_size, a.name_tokens, device=a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    title = str(a.ckpt or a.pretrained)
    samples = {m: [{"index": it.index, "rules": it.rules, "asked": it.asked, "distance": it.distance, "story": it.story,
                    "cue": it.cue, "generated": it.generated, "scores": it.scores} for it in items[:16]]
               for m, items in scored.items()}
    config = {k: v for k, v in vars(a).items() if k != "config"} | {"task": task.to_dict(), "edges": edges}
    (out / "results.json").write_text(json.dumps({"config": config, "metrics": results.json_scalars(metrics),
                                                  "samples": samples}, indent=2, default=str) + "\n")
    md = model_markdown(metrics, title)
    (out / "results.md").write_text(md)
    plot([{"seed": 0, "labels": {}, "metrics": metrics}], lambda r: [title], out, title)
    sys.stdout.write(md)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and the compliance plots")
    return 0
