"""`afd` command line: generate, chat, serve, launch, ffn, bench, plan, console.

parser.py holds the flags, options.py what they mean (configs, the flags passed on to ranks,
early checks), commands.py and chat.py what each subcommand does."""

from __future__ import annotations

import logging
import os
import sys

from afd_compile.cli.parser import build_parser, normalize_flags
from afd_compile.errors import AfdError

__all__ = ["build_parser", "main", "normalize_flags"]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(normalize_flags(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=getattr(args, "log_level", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from afd_compile.cli.options import check_early
    from afd_compile.compile_cache import use_compile_cache

    use_compile_cache()  # before anything compiles; the ranks a command starts inherit it
    try:
        check_early(args)
        if args.command == "chat":
            from afd_compile.cli.chat import cmd_chat

            cmd_chat(args)
        else:
            from afd_compile.cli.commands import COMMANDS

            COMMANDS[args.command](args)
    except AfdError as e:
        print(f"afd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
