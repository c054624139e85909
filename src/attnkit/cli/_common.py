"""What every subcommand shares: the parser class, output that fits the terminal, progress,
and small argument types.

Output rules (see the README's CLI section):

- Tables fit the width (``COLUMNS``, else the terminal's, else 80). Headers wrap at spaces,
  text columns wrap, and a table still too wide is split into several that repeat its
  leading columns. A number or a listed entry is never cut.
- Progress: a rich bar on a terminal; one plain line per step otherwise (a pipe, a log file).
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TextIO, TypeAlias

Progress = Callable[[str, int, int], None]
"""``progress(description, done, total)``, as the library's long functions call it."""


class UsageError(Exception):
    """Options that do not go together: ``main`` reports it as a usage error (exit 2)."""


def positive(text: str) -> int:
    """An argparse type: an int >= 1, for options no library function checks."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1; got {value}")
    return value


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for the choices close to ``value``, else ``""``."""
    close = difflib.get_close_matches(value, [str(c) for c in choices], n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


class HelpFormatter(argparse.HelpFormatter):
    """Fills the description and epilog paragraph by paragraph (module docstrings, their
    ````literals```` shown plain); appends each option's default to its help."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = text.replace("``", "").strip().split("\n\n")
        return "\n\n".join(textwrap.fill(" ".join(p.split()), width, initial_indent=indent, subsequent_indent=indent,
                                         break_on_hyphens=False) for p in paragraphs)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or "default" in text
                or (action.nargs == 0 and isinstance(default, bool))  # a flag: its help says what it does
                or not action.option_strings):
            return text
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
        shown = repr(default) if default == "" else str(default).replace("%", "%%")
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for choices (subcommands too) and unknown options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.commands: dict[str, Parser] = {}  # the subcommands' parsers, by name, where this has any

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r} (choose from {', '.join(choices)}){did_you_mean(value, choices)}")

    def unrecognized(self, extras: Sequence[str]) -> None:
        """Exit 2 with this parser's usage, naming ``extras`` and the options they resemble."""
        options = [s for a in self._actions for s in a.option_strings]
        hints = "".join(did_you_mean(e.split("=", 1)[0], options) for e in extras if e.startswith("-"))
        self.error(f"unrecognized arguments: {' '.join(extras)}{hints}")


# What ``parser.add_subparsers()`` returns: each command module's ``add_parser(sub)`` takes it.
Subparsers: TypeAlias = "argparse._SubParsersAction[Parser]"


def csv(kind: type, choices: Sequence[str] | None = None) -> Callable[[str], list]:
    """An argparse type: a comma-separated list of ``kind``, each one of ``choices``."""

    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list; got {text!r}")
        try:
            values = [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}s separated by commas; got {text!r}") from None
        bad = [] if choices is None else [v for v in values if v not in choices]
        if bad and choices is not None:
            hints = "".join(did_you_mean(str(b), choices) for b in bad)
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(str, bad))}; choose from {', '.join(choices)}{hints}")
        return values

    return parse


def width() -> int:
    """Columns to fill: ``COLUMNS`` if set, else the terminal's, else 80."""
    return max(20, shutil.get_terminal_size((80, 24)).columns)


@dataclass(frozen=True)
class Column:
    """A table column. ``right``: right-aligned (numbers). ``wrap``: free text that may wrap.

    Cells of other columns are never broken: each of their lines (entries) stays whole.
    """

    name: str
    right: bool = False
    wrap: bool = False


def render_table(title: str, columns: Sequence[str | Column], rows: Sequence[Sequence[str]], *,
                 keep: int = 1, max_width: int | None = None) -> list[str]:
    """The lines of a plain-text table at most ``max_width`` (default :func:`width`) wide.

    Cells may hold several lines (``"\\n"``). When even the narrowest layout is too wide, the
    columns after the first ``keep`` are split into several tables, each repeating those.
    A single column wider than the width on its own is the one case that overflows.
    """
    cols = [c if isinstance(c, Column) else Column(c) for c in columns]
    limit = max_width or width()
    cells = [[str(cell).split("\n") for cell in row] for row in rows]
    if any(len(row) != len(cols) for row in cells):
        raise ValueError(f"every row must have {len(cols)} cells, one per column")

    def longest(i: int) -> int:
        return max((len(line) for row in cells for line in row[i]), default=0)

    def head_word(i: int) -> int:
        return max((len(w) for w in cols[i].name.split()), default=0)

    natural = [max(len(c.name), longest(i)) for i, c in enumerate(cols)]
    narrowest = [max(head_word(i), min(natural[i], 12) if c.wrap else longest(i)) for i, c in enumerate(cols)]

    def fits(group: list[int], gap: int) -> bool:
        return sum(narrowest[i] for i in group) + gap * (len(group) - 1) <= limit

    kept = list(range(min(keep, len(cols))))
    every = list(range(len(cols)))
    gap = 2 if fits(every, 2) else 1
    groups: list[list[int]] = []
    if fits(every, gap):
        groups = [every]
    else:
        current = list(kept)
        for i in every[len(kept):]:
            if len(current) > len(kept) and not fits([*current, i], gap):
                groups.append(current)
                current = list(kept)
            current.append(i)
        groups.append(current)

    lines: list[str] = []
    for n, group in enumerate(groups):
        label = title if len(groups) == 1 else f"{title} ({n + 1} of {len(groups)})"
        if n:
            lines.append("")
        lines.extend(textwrap.wrap(label, limit, break_on_hyphens=False) or [""])
        lines.extend(_render_group([cols[i] for i in group], [[row[i] for i in group] for row in cells],
                                   [natural[i] for i in group], [narrowest[i] for i in group], gap, limit))
    return lines


def _render_group(cols: list[Column], cells: list[list[list[str]]], natural: list[int], narrowest: list[int],
                  gap: int, limit: int) -> list[str]:
    widths = list(natural)
    while sum(widths) + gap * (len(widths) - 1) > limit:
        slack = [w - m for w, m in zip(widths, narrowest)]
        i = max(range(len(widths)), key=slack.__getitem__)
        if slack[i] <= 0:
            break  # one column alone is wider than the limit: let it overflow rather than cut it
        widths[i] -= 1

    def block(texts: list[list[str]], header: bool) -> list[str]:
        wrapped = []
        for c, w, text in zip(cols, widths, texts):
            if header:
                parts = textwrap.wrap(" ".join(text), w, break_long_words=False) or [""]
            elif c.wrap:
                parts = [p for line in text for p in (textwrap.wrap(line, w, break_on_hyphens=False) or [""])]
            else:
                parts = text
            wrapped.append(parts)
        height = max(len(p) for p in wrapped)
        out = []
        for k in range(height):
            line_texts = [(p[k] if k < len(p) else "") for p in wrapped]
            line = (" " * gap).join(t.rjust(w) if c.right else t.ljust(w)
                                    for c, w, t in zip(cols, widths, line_texts))
            out.append(line.rstrip())
        return out

    lines = block([[c.name] for c in cols], header=True)
    lines.append((" " * gap).join("-" * w for w in widths))
    tall = any(len(cell) > 1 for row in cells for cell in row)
    for n, row in enumerate(cells):
        if tall and n:
            lines.append("")
        lines.extend(block(row, header=False))
    return lines


class Console:
    """Where a command writes: stdout (or stderr), plain text, styled by rich on a terminal."""

    def __init__(self, stderr: bool = False) -> None:
        self._stderr = stderr
        self._rich = None
        if self.file.isatty():
            try:
                from rich.console import Console as RichConsole
            except ImportError:
                pass
            else:
                self._rich = RichConsole(highlight=False, stderr=stderr)

    @property
    def file(self) -> TextIO:
        return sys.stderr if self._stderr else sys.stdout

    def rule(self, title: str) -> None:
        if self._rich:
            from rich.text import Text

            self._rich.rule(Text(title, style="bold"))
        else:
            self.print("")
            self.print(f"== {title} ==")

    def print(self, text: str = "") -> None:
        """``text``, its long lines wrapped at spaces to the width (a word longer stays whole)."""
        if self._rich:
            self._rich.print(text, markup=False)
            return
        for line in text.split("\n"):
            parts = textwrap.wrap(line, width(), break_long_words=False, break_on_hyphens=False,
                                  subsequent_indent="  ") if len(line) > width() else [line]
            print("\n".join(parts), file=self.file, flush=True)

    def table(self, title: str, columns: Sequence[str | Column], rows: Sequence[Sequence[str]], *,
              keep: int = 1) -> None:
        """Print :func:`render_table`'s lines."""
        for line in render_table(title, columns, rows, keep=keep):
            if self._rich:
                self._rich.out(line, highlight=False)
            else:
                print(line, file=self.file)
        self.file.flush()

    def status(self, text: str) -> AbstractContextManager[object]:
        """A spinner with ``text`` on a terminal; the text as a line otherwise."""
        if self._rich:
            from rich.text import Text

            return self._rich.status(Text(text))
        self.print(text)
        return nullcontext()

    @contextmanager
    def progress(self) -> Iterator[Progress]:
        """Yield a ``progress(description, done, total)`` callable.

        On a terminal with rich: a bar, removed when done. Otherwise one line per step, such as
        ``[3/24] causal L=2048 (12 s)``: each new description, and every 5% of a long count.
        """
        if self._rich:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                     console=self._rich, transient=True) as bar:
                task = bar.add_task("starting", total=None)
                yield lambda description, done, total: bar.update(task, description=description, completed=done,
                                                                  total=total)
            return
        start = time.perf_counter()
        last: dict[str, object] = {"text": None, "bucket": -1}

        def line(description: str, done: int, total: int) -> None:
            bucket = 20 * done // total if total else 0
            if description == last["text"] and bucket == last["bucket"]:
                return
            last["text"], last["bucket"] = description, bucket
            self.print(f"[{done}/{total}] {description} ({time.perf_counter() - start:.0f} s)")

        yield line


def write_outputs(con: Console, json_path: str | None, data: dict, plot_path: str | None,
                  plot: Callable[[str], object]) -> None:
    """Write ``data`` to ``json_path`` and the plot to ``plot_path``, where given."""
    import json

    if json_path:
        with open(json_path, "w") as f:
            json.dump(data, f, indent=2)
        con.print(f"wrote {json_path}")
    if plot_path:
        con.print(f"wrote {plot(plot_path)}")


def quiet_transformers() -> None:
    """Hide transformers' own weight-loading bar (a fraction of a second for these models)."""
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.disable_progress_bar()
