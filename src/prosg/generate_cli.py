"""``prosg generate``: a checkpoint + a prompt -> a continuation streamed to stdout.

The model is a ``prosg fit`` checkpoint (its method included: SG head, soft prompt, ...) or a
backbone in any layout ``from_pretrained`` knows. Text is encoded and decoded with ``--tokenizer``
(default: the tokenizer of the checkpoint's data, else bytes); prompts of a constructed task are
given as ids (``--prompt-ids``) and printed by token name (``k3 v5``). Options can come from a YAML
file (``--config``), like the Lightning subcommands.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from prosg.checkpoints import LOAD_ERRORS, check_ckpt_path, load_error, read_checkpoint
from prosg.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_checkpoint(ckpt: str, map_location: Any = "cpu"):
    """A ``ProSGModule`` from a ``prosg fit`` checkpoint, read with ``weights_only=True`` (no code runs)."""
    from prosg.module import ProSGModule

    path = check_ckpt_path(ckpt)
    try:
        return ProSGModule.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    except (*LOAD_ERRORS, TypeError) as e:  # TypeError: hyper-parameters that do not fit ProSGModule
        raise load_error(ckpt, e) from None


def open_checkpoint(ckpt: str) -> tuple[Any, dict[str, Any]]:
    """A ``ProSGModule`` from a ``prosg fit`` checkpoint and the checkpoint's dict (its data config), both read
    with ``weights_only=True``; the dict is memory-mapped, so the tensors are read once."""
    saved = read_checkpoint(ckpt)
    return load_checkpoint(ckpt), saved


def checkpoint_datamodule(saved: dict[str, Any]) -> Any | None:
    """The DataModule a checkpoint (the dict ``read_checkpoint`` gave) was trained on, rebuilt from its saved
    hyper-parameters, or None."""
    from prosg.data.cli import instantiate_datamodule

    hp = dict(saved.get("datamodule_hyper_parameters") or {})
    class_path = hp.pop("_class_path", None)
    hp.pop("_instantiator", None)
    if class_path is None:
        return None
    try:
        return instantiate_datamodule({"class_path": class_path, "init_args": hp})
    except Exception:  # the data may not exist here (a JSONL path on another machine): names are optional
        return None


def load_model(ckpt: str | None, pretrained: str | None, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any | None]:
    """The method to generate with (attached to its backbone), on ``device`` in ``dtype``, and the DataModule a
    checkpoint was trained on (None for a pretrained directory, or data that cannot be rebuilt here)."""
    if (ckpt is None) == (pretrained is None):
        raise ConfigError("give exactly one of --ckpt (a `prosg fit` checkpoint) or --pretrained (a backbone directory)")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible on this machine; use --device cpu")
    from prosg.generate import as_method

    if pretrained is not None:
        from prosg.backbones import from_pretrained

        method = as_method(from_pretrained(pretrained).eval())
        method.backbone.to(device=device, dtype=DTYPES[dtype])
        return method, None
    module, saved = open_checkpoint(ckpt)
    module.eval().to(device=device, dtype=DTYPES[dtype])
    return module.method, checkpoint_datamodule(saved)


class TextStream:
    """Prints decoded text as tokens arrive, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, out=None) -> None:
        # sys.stdout when printing, not at import: it may have been replaced since (captured output, a notebook)
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out or sys.stdout, [], ""

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token[0]))
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd") and len(text) > len(self.shown):
            self.out.write(text[len(self.shown) :])
            self.out.flush()
            self.shown = text


def parse_ids(text: str, option: str) -> list[int]:
    """Space-separated integer ids, with the offending item named."""
    ids = []
    for item in text.split():
        try:
            ids.append(int(item))
        except ValueError:
            raise ConfigError(f"{option} must be space-separated integer token ids; {item!r} is not one") from None
    return ids


def _parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="prosg generate", description=__doc__.splitlines()[0], exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    p.add_argument("--ckpt", type=str | None, default=None, help="checkpoint written by `prosg fit` (method included)")
    p.add_argument("--pretrained", type=str | None, default=None,
                   help="a backbone directory or .pth (any layout from_pretrained knows)")
    p.add_argument("--prompt", type=str | None, default=None, help="prompt text (encoded with the tokenizer)")
    p.add_argument("--prompt-ids", type=str | None, default=None, help="prompt as space-separated token ids")
    p.add_argument("--tokenizer", type=str | None, default=None,
                   help="'byte', a tokenizer.json or an rwkv_vocab_*.txt (default: the checkpoint data's, else byte)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int | None, default=None)
    p.add_argument("--top-p", type=float | None, default=None)
    p.add_argument("--stop-ids", type=str, default="", help="space-separated token ids that end generation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str, default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", type=str, default="float32", help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--ids", type=bool, default=False, help="print token ids instead of names/text")
    return p


def _check(a) -> None:
    if (a.prompt is None) == (a.prompt_ids is None):
        raise ConfigError("give exactly one of --prompt (text) or --prompt-ids (token ids)")
    if a.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {a.max_new_tokens} must be >= 1")
    if a.temperature < 0:
        raise ConfigError(f"--temperature {a.temperature} must be >= 0 (0 = greedy)")
    if a.top_k is not None and a.top_k < 1:
        raise ConfigError(f"--top-k {a.top_k} must be >= 1 (or unset)")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise ConfigError(f"--top-p {a.top_p} must be in (0, 1] (or unset)")


def _printer(a, dm) -> tuple[Callable | None, Callable[[torch.Tensor], None]]:
    """(encode text -> ids or None, per-token printer) for the chosen tokenizer / data."""
    from prosg.data.tokenizers import load_tokenizer

    if a.tokenizer is not None or a.prompt is not None:
        tok = load_tokenizer(a.tokenizer or getattr(dm, "tokenizer_spec", None) or "byte")
        return tok.encode, (lambda t: print(int(t[0]), end=" ", flush=True)) if a.ids else TextStream(tok)
    names = getattr(dm, "token_names", None)
    if names is None or a.ids:
        return None, lambda t: print(int(t[0]), end=" ", flush=True)
    return None, lambda t: print(names([int(t[0])])[0], end=" ", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse options, load the model, stream the continuation."""
    from jsonargparse import ArgumentError

    try:
        a = _parser().parse_args(argv)
    except ArgumentError as e:
        raise ConfigError(f"{str(e).splitlines()[0]} (see `prosg generate -h`)") from None
    _check(a)
    from prosg.generate import generate

    ids = parse_ids(a.prompt_ids, "--prompt-ids") if a.prompt_ids is not None else None
    stop_ids = parse_ids(a.stop_ids, "--stop-ids")
    method, dm = load_model(a.ckpt, a.pretrained, a.device, a.dtype)
    encode, on_token = _printer(a, dm)
    if ids is None:
        ids = encode(a.prompt)
    if not ids:
        raise ConfigError("the prompt is empty; give at least one token")
    gen = torch.Generator(device=a.device).manual_seed(a.seed)
    generate(
        method, torch.tensor([ids], device=a.device), a.max_new_tokens, temperature=a.temperature,
        top_k=a.top_k, top_p=a.top_p, stop_ids=stop_ids, on_token=on_token, generator=gen,
    )
    print()
    return 0
