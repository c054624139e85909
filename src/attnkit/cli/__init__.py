"""The ``attnkit`` command: a thin shell over the library.

One module per subcommand, each with ``add_parser(sub)`` and ``run(args) -> int``;
:func:`main` parses, dispatches, and is the one place that turns the library's errors
into a message and an exit status.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import attnkit
from attnkit.cli import backends, bench, demo, explain, induction, kv_cache, lab, profile, serve, translate_demo
from attnkit.cli._common import Parser, UsageError

__all__ = ["main"]

COMMANDS = (demo, backends, kv_cache, bench, explain, serve, lab, induction, translate_demo, profile)

EPILOG = """\
Layers and heads are numbered from 0 everywhere: options, tables, reports.

Exit status: 0 success (a bare `attnkit` prints this help); 1 the command failed: a value
the library rejects, a token that matches nothing, a file that cannot be written, a
missing extra; 2 the command line could not be parsed (an unknown command or option, a
malformed value, options that do not go together), shown with the usage of the command
at fault.

`attnkit COMMAND --help` describes each command and its defaults."""


def build_parser() -> Parser:
    """The ``attnkit`` parser with every subcommand's."""
    parser = Parser(prog="attnkit", description="attnkit: attention kernels, masks, inspection and benchmarks.",
                    epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"attnkit {attnkit.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    parser.commands = {p.prog.split()[-1]: p for p in (module.add_parser(sub) for module in COMMANDS)}
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``attnkit`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    A usage error exits (``SystemExit(2)``) after printing the usage of the command at
    fault; a failure prints ``attnkit COMMAND: error: ...`` on stderr and returns 1.
    With no command, prints the help and returns 0.
    """
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if args.command is None:
        if extras:
            parser.unrecognized(extras)
        parser.print_help()
        return 0
    if extras:
        parser.commands[args.command].unrecognized(extras)
    try:
        return args.run(args)
    except UsageError as err:
        parser.commands[args.command].error(str(err))
    except (ValueError, TypeError, OSError, ImportError) as err:  # bad input, a bad path, a missing extra
        print(f"attnkit {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"attnkit {args.command}: interrupted", file=sys.stderr)
        return 130
