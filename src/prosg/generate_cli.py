"""``prosg generate``: a checkpoint + a prompt -> a continuation streamed to stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from prosg.errors import CheckpointError, ConfigError


def load_model(ckpt: str | None, pretrained: str | None):
    """The method to generate with (attached to its backbone), from a ``prosg fit`` checkpoint or a backbone path."""
    if (ckpt is None) == (pretrained is None):
        raise ConfigError("give exactly one of --ckpt (a `prosg fit` checkpoint) or --pretrained (a backbone directory)")
    if pretrained is not None:
        from prosg.backbones import from_pretrained

        from prosg.generate import as_method

        return as_method(from_pretrained(pretrained).eval())
    from prosg.module import ProSGModule

    if not Path(ckpt).is_file():
        raise CheckpointError(f"checkpoint {ckpt!r} does not exist")
    try:
        module = ProSGModule.load_from_checkpoint(ckpt, map_location="cpu")
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(
            f"could not rebuild a ProSG model from {ckpt!r} ({type(e).__name__}: {e}); it must be a checkpoint "
            "written by `prosg fit` (its hyper-parameters hold the model config)"
        ) from None
    module.eval()
    return module.method


class TextStream:
    """Prints decoded text as tokens arrive, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, out=sys.stdout) -> None:
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out, [], ""

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token[0]))
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd") and len(text) > len(self.shown):
            self.out.write(text[len(self.shown) :])
            self.out.flush()
            self.shown = text


def main(argv: list[str] | None = None) -> int:
    """Parse options, load the model, stream the continuation."""
    p = argparse.ArgumentParser(prog="prosg generate", description=__doc__.splitlines()[0])
    src = p.add_argument_group("model")
    src.add_argument("--ckpt", help="checkpoint written by `prosg fit` (SG head / soft prompt included)")
    src.add_argument("--pretrained", help="a backbone checkpoint directory or .pth (any format from_pretrained knows)")
    prm = p.add_mutually_exclusive_group(required=True)
    prm.add_argument("--prompt", help="prompt text (encoded with --tokenizer)")
    prm.add_argument("--prompt-ids", help="prompt as space-separated token ids (constructed tasks)")
    p.add_argument("--tokenizer", default="byte", help="'byte', a tokenizer.json or an rwkv_vocab_*.txt file")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop-ids", default="", help="space-separated token ids that end generation")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from prosg.data.tokenizers import load_tokenizer
    from prosg.generate import generate

    method = load_model(args.ckpt, args.pretrained)
    tokenizer = load_tokenizer(args.tokenizer) if args.prompt is not None else None
    ids = tokenizer.encode(args.prompt) if tokenizer else [int(t) for t in args.prompt_ids.split()]
    if not ids:
        raise ConfigError("the prompt is empty; give at least one token")
    stream = TextStream(tokenizer) if tokenizer else (lambda tok: print(int(tok[0]), end=" ", flush=True))
    gen = torch.Generator().manual_seed(args.seed)
    generate(
        method, torch.tensor([ids]), args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        stop_ids=[int(t) for t in args.stop_ids.split()], on_token=stream, generator=gen,
    )
    print()
    return 0
