"""``diffalign`` command line: one subcommand per verb, each in its own module.

Each command module exposes ``register(subparsers)``; add new ones to ``COMMAND_MODULES``.
Imports are lazy so ``diffalign --help`` is instant and a command only loads what it needs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# module path -> the subcommands it registers (for lazy import)
COMMAND_MODULES = [
    "diffalign.commands.core",  # train, tiny-model, toy-data
    "diffalign.commands.demo",  # demo (offline end-to-end)
    "diffalign.commands.reward",  # score, relabel, filter-pairs, train-reward, serve-reward
    "diffalign.commands.evaluate",  # eval, compare
    "diffalign.commands.benchmark",  # benchmark (GenEval, OCR, HPS v2, PartiPrompts, DrawBench)
    "diffalign.commands.testbed",  # testbed-base, testbed-compare
    "diffalign.commands.plan",  # plan (memory plans as numbers)
]


def package_version() -> str:
    """The installed distribution's version (a source checkout that was never installed says so)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffalign")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign", description="Align diffusion and flow models with human preferences.")
    parser.add_argument("--version", action="version", version=f"diffalign {package_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line (also: DIFFALIGN_DEBUG=1)")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bars or status lines, only results and errors (also: DIFFALIGN_QUIET=1)")
    noise.add_argument("-v", "--verbose", action="store_true",
                       help="also show the library warnings and loading bars diffalign hides (also: DIFFALIGN_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


# Commands whose --out is a directory they create: an existing file there is one clear line,
# not a FileExistsError / NotADirectoryError traceback from deep inside the command.
OUT_DIR_COMMANDS = {"eval", "benchmark", "compare", "demo", "testbed-compare", "testbed-base"}


def main(argv: list[str] | None = None) -> int:
    from .errors import Interrupted, UserError, require_dir_path

    parser = build_parser()
    args = parser.parse_args(argv)
    from .logging import configure

    configure(quiet=args.quiet, verbose=args.verbose)  # before any command imports a library
    debug = args.debug or os.environ.get("DIFFALIGN_DEBUG", "").strip() not in ("", "0")
    try:
        if args.command in OUT_DIR_COMMANDS and getattr(args, "out", None):
            require_dir_path(args.out, "--out")
        return int(args.func(args) or 0)
    except UserError as e:
        if debug:
            raise
        print(f"diffalign {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`diffalign recipes | head`): stop quietly, as Unix tools do
        # point stdout at /dev/null so the interpreter's final flush does not raise again (Python's
        # documented recipe); 141 = 128 + SIGPIPE, what a shell reports for a tool killed by it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt as e:  # Interrupted says where training stopped and how to go on
        if debug:
            raise
        print(f"diffalign {args.command}: {e if isinstance(e, Interrupted) else 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
