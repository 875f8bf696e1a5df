"""``prosg data build`` / ``prosg data show``: write a dataset to disk, or print decoded examples.

The ``--config`` YAML is a DataModule config in LightningCLI form (``class_path`` + ``init_args``),
or a full LightningCLI config whose ``data:`` key is one. It is instantiated with jsonargparse,
exactly as ``prosg fit`` would, after resolving OmegaConf ``${...}`` interpolations.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from prosg.errors import ConfigError, ProSGError

LEGEND = "legend: [x d=N] prompt answer (kind 2) at response distance N; (x) local answer (kind 1)"
_ANSI = {2: "\x1b[1;31m", 1: "\x1b[32m"}
_RESET = "\x1b[0m"


def load_datamodule_config(path: str | Path) -> dict[str, Any]:
    """The ``{class_path, init_args}`` mapping of a DataModule YAML, or of the ``data:`` of a ``prosg fit`` config.

    A full config's ``data:`` may be inline or a path to a DataModule YAML (relative to that config, as
    ``conf/experiment/*.yaml`` write it), exactly as ``prosg fit --config`` reads it.
    """
    from prosg.paths import find_config, load_yaml

    path = find_config(path)
    if not path.is_file():
        raise ConfigError(f"config {str(path)!r} not found; pass --config conf/data/<name>.yaml")
    cfg = load_yaml(path)
    if isinstance(cfg, dict) and "data" in cfg and "class_path" not in cfg:
        data = cfg["data"]
        if isinstance(data, str):  # data: ../data/recall.yaml
            return load_datamodule_config(path.parent / data if not Path(data).is_absolute() else data)
        cfg = data
    if not isinstance(cfg, dict) or "class_path" not in cfg:
        raise ConfigError(
            f"{path}: expected a DataModule config with class_path (e.g. prosg.data.ConstructedDataModule) "
            "and init_args, or a LightningCLI config with a data: section"
        )
    return cfg


def apply_overrides(cfg: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``--data.init_args.KEY=VALUE`` (or ``--data.init_args.KEY VALUE``) arguments, as ``prosg fit`` takes them."""
    import yaml

    cfg = {**cfg, "init_args": dict(cfg.get("init_args") or {})}
    items = list(overrides)
    while items:
        arg = items.pop(0)
        key, eq, value = arg.partition("=")
        if not eq and items and not items[0].startswith("--"):
            value = items.pop(0)
        elif not eq:
            raise ConfigError(f"{arg}: give a value, e.g. {arg}=1")
        name = key.removeprefix("--data.init_args.").removeprefix("--data.")
        if not key.startswith("--data.") or not name or "." in name:
            raise ConfigError(
                f"unrecognized argument {arg!r}; besides its options, `prosg data` takes DataModule overrides "
                "like --data.init_args.seed=1"
            )
        cfg["init_args"][name] = yaml.safe_load(value)
    return cfg


def instantiate_datamodule(cfg: dict[str, Any]) -> Any:
    """Instantiate ``{class_path, init_args}`` the way LightningCLI does (jsonargparse, type-checked)."""
    import lightning as L
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    try:
        parsed = parser.parse_object({"data": cfg})
        return parser.instantiate_classes(parsed).data
    except ProSGError:
        raise
    except Exception as e:  # jsonargparse reports type / unknown-key problems as ArgumentError etc.
        cause = e
        while cause.__cause__ is not None and not isinstance(cause, ProSGError):
            cause = cause.__cause__
        if isinstance(cause, ProSGError):
            raise cause from None
        from prosg.train import argument_problem

        raise ConfigError(f"invalid DataModule config {cfg.get('class_path')}: {argument_problem(e, ['data'])}") from None


def load_datamodule(config: str | Path, overrides: Sequence[str] = ()) -> Any:
    """A DataModule instantiated from a YAML config file (and ``--data.init_args.KEY=VALUE`` overrides)."""
    return instantiate_datamodule(apply_overrides(load_datamodule_config(config), overrides))


def render_tokens(strs: list[str], kinds: list[int], dists: list[int], joiner: str, color: bool) -> str:
    """Tokens joined for display; runs of answers bracketed: ``[x d=N]`` prompt, ``(x)`` local."""
    out: list[str] = []
    i = 0
    while i < len(strs):
        k = kinds[i]
        if k == 0:
            out.append(strs[i])
            i += 1
            continue
        j = i + 1  # a run: same kind, consecutive positions (e.g. the bytes of one keyword)
        while j < len(strs) and kinds[j] == k and (k != 2 or dists[j] == dists[j - 1] + 1):
            j += 1
        text = joiner.join(strs[i:j])
        piece = f"[{text} d={dists[i]}]" if k == 2 else f"({text})"
        out.append(f"{_ANSI[k]}{piece}{_RESET}" if color else piece)
        i = j
    return joiner.join(out)


def format_example(example: dict[str, Any], strs_of: Any, split: str, color: bool = False) -> str:
    """A multi-line, human-readable view of one example."""
    kinds, dists = example["answer_kind"], example["distance"]
    p_strs, joiner = strs_of(example, example["prompt_ids"])
    r_strs, _ = strs_of(example, example["response_ids"])
    n2, n1 = sum(k == 2 for k in kinds), sum(k == 1 for k in kinds)
    idx = example.get("meta", {}).get("index")
    head = (
        f"== {split} example {idx}: task={example['task']} n_facts={example['n_facts']} "
        f"prompt={len(example['prompt_ids'])} tokens response={len(example['response_ids'])} tokens "
        f"prompt_answers={n2} local_answers={n1}"
    )
    prompt = render_tokens(p_strs, [0] * len(p_strs), [-1] * len(p_strs), joiner, color)
    response = render_tokens(r_strs, kinds, dists, joiner, color)
    return f"{head}\nprompt:   {prompt}\nresponse: {response}"


def _cmd_build(args: argparse.Namespace) -> int:
    from prosg.data.store import write_dataset

    dm = load_datamodule(args.config, args.overrides)
    manifest_path = write_dataset(dm, args.out, fmt=args.format, splits=args.splits, overwrite=args.overwrite)
    manifest = json.loads(manifest_path.read_text())
    counts = ", ".join(f"{n} {s}" for s, n in manifest["counts"].items())
    print(f"wrote {counts} examples ({args.format}) to {args.out}; manifest: {manifest_path}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.path is None):
        raise ConfigError("give exactly one of --config (a DataModule YAML) or --path (a stored dataset directory)")
    if args.path is not None:
        from prosg.data import StoredDataModule

        dm = StoredDataModule(args.path)
    else:
        dm = load_datamodule(args.config, args.overrides)
    dm.setup("validate" if args.split == "val" else "test" if args.split == "test" else "fit")
    if args.split not in dm.split_names():
        raise ConfigError(f"split {args.split!r} is empty or missing (have {dm.split_names()}); pick another --split")
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    ds = dm.dataset(args.split)
    print(
        f"{type(dm).__name__}: vocab_size={dm.vocab_size} pad_id={dm.pad_id} max_len={dm.max_len} "
        f"bucket_edges={dm.bucket_edges} tasks={dm.tasks} {args.split}_size={len(ds)}"
    )
    print(LEGEND)
    for i in range(args.start, min(args.start + args.n, len(ds))):
        print(format_example(ds[i], dm.decode_tokens, args.split, color))
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from prosg.data.audit import audit, format_audit

    dm = load_datamodule(args.config, args.overrides)
    if args.split not in dm.split_names():
        raise ConfigError(f"split {args.split!r} is empty or missing (have {dm.split_names()}); pick another --split")
    ds = dm.dataset(args.split)
    n = min(args.n, len(ds))
    flagged = 0
    every = [ds[i] for i in range(n)]
    for task_id, task in enumerate(dm.split_tasks[args.split]):
        examples = [ex for ex in every if ex["meta"]["task_id"] == task_id]
        if not task.prompt_answers:  # plain text: nothing in it answers the prompt
            print(f"== {task.name} ({args.split}, {len(examples)} examples): no prompt answers, nothing to audit")
            continue
        buckets = audit(examples, task, dm.bucket_edges)
        flagged += sum(bool(b.shortcuts()) for b in buckets)
        print(f"== {task.name} ({args.split}, {len(examples)} examples): shortcut solvers per distance bucket")
        print(format_audit(buckets))
    return 1 if flagged else 0


def build_parser() -> argparse.ArgumentParser:
    """The ``prosg data`` argument parser."""
    p = argparse.ArgumentParser(
        prog="prosg data", description="Build or inspect prompt-forgetting datasets.",
        epilog="--config takes a DataModule YAML (conf/data/*.yaml) or a `prosg fit` config (conf/experiment/*.yaml, "
        "its data: section); DataModule arguments can be overridden as for `prosg fit`: --data.init_args.seed=1",
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write a DataModule's splits + manifest.json to a directory")
    b.add_argument("--config", required=True,
                   help="DataModule YAML (class_path + init_args), e.g. conf/data/recall.yaml, or a `prosg fit` config")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--format", default="jsonl", choices=["jsonl", "parquet"], help="file format (parquet needs pyarrow)")
    b.add_argument("--splits", nargs="+", choices=["train", "val", "test"], help="splits to write (default: all non-empty)")
    b.add_argument("--overwrite", action="store_true", help="replace files already in --out (a dataset, or files it would write)")
    b.set_defaults(fn=_cmd_build)
    s = sub.add_parser("show", help="print decoded examples with the scored answers highlighted")
    s.add_argument("--config", help="DataModule YAML, e.g. conf/data/recall.yaml, or a `prosg fit` config")
    s.add_argument("--path", help="a stored dataset directory (from `prosg data build`) instead of --config")
    s.add_argument("--split", default="val", choices=["train", "val", "test"])
    s.add_argument("-n", type=int, default=3, help="number of examples")
    s.add_argument("--start", type=int, default=0, help="index of the first example")
    s.add_argument("--color", default="auto", choices=["auto", "always", "never"], help="ANSI colour for answers")
    s.set_defaults(fn=_cmd_show)
    a = sub.add_parser("audit", help="score shortcut solvers (value set, elimination, copying, ...) per distance bucket")
    a.add_argument("--config", required=True, help="a constructed-task DataModule YAML, e.g. conf/data/recall.yaml")
    a.add_argument("--split", default="test", choices=["train", "val", "test"])
    a.add_argument("-n", type=int, default=2000, help="examples to audit")
    a.set_defaults(fn=_cmd_audit)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``prosg data``; returns the exit code (2 on a user error, message on stderr in one line)."""
    args, args.overrides = build_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return args.fn(args)
    except ProSGError as e:
        print(f"prosg data: error: {e}", file=sys.stderr)
        return 2
