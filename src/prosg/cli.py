"""The ``prosg`` command: LightningCLI subcommands plus ProSG's own (data, demo)."""

from __future__ import annotations

import sys

USAGE = """usage: prosg <command> [options]

commands:
  demo      the built-in default run (small models, a few minutes on a CPU)
  data      build / show the constructed prompt-forgetting dataset (prosg data -h)

Run `prosg <command> -h` for the options of a command.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prosg`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from prosg.demo import main as demo_main

        return demo_main(rest)
    if command == "data":
        from prosg.data.cli import main as data_main

        return data_main(rest)
    print(f"prosg: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
