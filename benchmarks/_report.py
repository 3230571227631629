"""Presentation: rich tables (terminal), Markdown tables (README), matplotlib plots, a progress bar.

Numbers are computed by the benchmarks; this module only formats them.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import matplotlib

matplotlib.use("Agg")  # no display: plots go to files only

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

__all__ = ["TableData", "fmt", "render", "targets_table", "progress", "new_figure", "save_figure", "machine_label"]


@dataclass
class TableData:
    """A table as plain strings, rendered both to the terminal and to Markdown."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""

    def add(self, *cells: Any) -> None:
        self.rows.append([c if isinstance(c, str) else fmt(c) for c in cells])

    def to_rich(self) -> Table:
        table = Table(title=self.title, caption=self.caption or None, show_lines=False)
        for i, col in enumerate(self.columns):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in self.rows:
            styled = [_style(cell) for cell in row]
            table.add_row(*styled)
        return table

    def to_markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(self.columns) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.caption:
            lines += ["", self.caption]
        return "\n".join(lines) + "\n"


def _style(cell: str) -> str:
    if cell == "PASS":
        return "[bold green]PASS[/]"
    if cell == "FAIL":
        return "[bold red]FAIL[/]"
    return cell


def fmt(value: Any, digits: int = 3) -> str:
    """A compact human format: thousands separators for big numbers, 3 significant digits otherwise."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def targets_table(title: str, targets: Sequence[dict[str, Any]]) -> TableData:
    """The PASS/FAIL table of a result's targets."""
    table = TableData(title, ["target", "measured", "needed", "verdict"])
    for t in targets:
        measured = t["measured"]
        table.add(t["name"], "—" if measured is None else f"{fmt(measured)}{t['unit']}",
                  f"{t['op']} {fmt(t['threshold'])}{t['unit']}", t["verdict"])
    return table


def render(tables: Sequence[TableData], out: Path, name: str, machine: dict[str, Any], *, console: bool) -> Path:
    """Print *tables* (when *console*) and write them as ``<out>/<name>.md``; return the Markdown path."""
    label = machine_label(machine)
    if console:
        con = Console()
        if not con.is_terminal:
            con.width = max(con.width, 160)  # piped output: do not squeeze the tables to 80 columns
        con.print(f"[dim]{label}[/]")
        for table in tables:
            con.print(table.to_rich())
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    body = [f"_{label}_", ""] + [t.to_markdown() for t in tables]
    path.write_text("\n".join(body), encoding="utf-8")
    return path


def machine_label(machine: dict[str, Any]) -> str:
    """One line naming the machine, e.g. for plot titles and table headers."""
    return (f"{machine.get('usable_cpus')} usable CPUs ({machine.get('cpu_model') or 'unknown CPU'}), "
            f"{machine.get('python_implementation')} {machine.get('python_version')}, GIL "
            f"{str(machine.get('gil', '?')).split(' ')[0]}, tokengate {machine.get('tokengate_version')}, "
            f"{machine.get('date')}")


@contextlib.contextmanager
def progress(enabled: bool, total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar (transient); yields ``advance(n)``. A no-op when disabled."""
    if not enabled:

        def skip(n: int = 1) -> None:
            return None

        yield skip
        return
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), transient=True)
    with bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            bar.advance(task, n)

        yield advance


def new_figure(ncols: int, title: str, machine: dict[str, Any], *, width: float = 6.0) -> tuple[Figure, Any]:
    """A figure with *ncols* side-by-side axes and the machine in the subtitle."""
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 4.6), squeeze=False)
    fig.suptitle(f"{title}\n{machine_label(machine)}", fontsize=9)
    return fig, axes[0]


def save_figure(fig: Figure, out: Path, name: str) -> Path:
    """Write ``<out>/<name>.png`` and close the figure."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
