"""The ``prosg`` command: LightningCLI (fit/validate/test/predict) plus generate, data and demo."""

from __future__ import annotations

import os
import sys

USAGE = """usage: prosg <command> [options]

training and evaluation (LightningCLI; YAML in conf/, e.g. --config conf/experiment/sg.yaml):
  fit        train (and validate) a model
  validate   forgetting metrics on the validation split
  test       forgetting metrics on the test split
  predict    run the model over a prediction dataloader

ProSG commands:
  generate   a checkpoint + a prompt -> streamed continuation
  lm-eval    free-running instruction following by distance (greedy + sampled) of a checkpoint or backbone
  data       build / show the constructed prompt-forgetting dataset
  demo       the built-in default run (small models, minutes on a CPU)
  pretrain   train + publish the backbones of the frozen-backbone setting (assets/pretrained)
  recycle    carry trained soft prompts / SG heads over to an updated backbone; recycle-rate table
  sweep      a grid of experiments x seeds (conf/sweep/*.yaml): launch, resume, collect tables + plots

Run `prosg <command> -h` for the options of a command; `prosg --version` prints the version.
"""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prosg`` console script; ProSG input errors print as one clear message."""
    from prosg.errors import ProSGError

    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except ProSGError as e:
        print(f"prosg: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` & co.: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from prosg import __version__

        print(f"prosg {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING_COMMANDS:
        from prosg.train import lightning_main

        lightning_main([command, *rest])
        return 0
    if command == "generate":
        from prosg.generate_cli import main as generate_main

        return generate_main(rest)
    if command == "lm-eval":
        from prosg.lmeval import main as lmeval_main

        return lmeval_main(rest)
    if command == "demo":
        from prosg.demo import main as demo_main

        return demo_main(rest)
    if command == "pretrain":
        from prosg.pretrain import main as pretrain_main

        return pretrain_main(rest)
    if command == "recycle":
        from prosg.recycle import main as recycle_main

        return recycle_main(rest)
    if command == "sweep":
        from prosg.sweep import main as sweep_main

        return sweep_main(rest)
    if command == "data":
        from prosg.data.cli import main as data_main

        return data_main(rest)
    print(f"prosg: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
