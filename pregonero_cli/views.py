"""What the commands show: Rich tables for lists, progress bars for transfers and for a job
being sent. Everything live goes to stderr, so stdout holds only the answer (a table, or the
API's JSON with `--json`) and a script can read it while a person watches the bars."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Column as TableColumn
from rich.table import Table
from rich.text import Text

from .live import Counts

out = Console()
err = Console(stderr=True)


def print_json(data: Any) -> None:
    """The API's JSON as it came, for scripts (no colours, no wrapping)."""
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[dict[str, Any]], Any]
    numeric: bool = False
    whole: bool = False  # an id, copied from the table: never folded


def field(name: str, header: str = "", *, numeric: bool = False, whole: bool = False) -> Column:
    return Column(header or name, lambda row: row.get(name), numeric, whole)


def moment(name: str, header: str) -> Column:
    """A timestamp to the minute, in UTC as the API gives it."""

    def shown(row: dict[str, Any]) -> str | None:
        value = row.get(name)
        return f"{value[:10]} {value[11:16]}" if isinstance(value, str) and len(value) >= 16 else value

    return Column(header, shown)


def cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.2f}".rstrip("0").rstrip(".") if value % 1 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], *, title: str = "", total: int = 0) -> None:
    table = Table(title=title or None, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(
            column.header,
            justify="right" if column.numeric else "left",
            overflow="fold",
            no_wrap=column.whole or column.numeric,
        )
    for row in rows:
        table.add_row(*(cell(column.value(row)) for column in columns))
    out.print(table)
    if total > len(rows):
        out.print(f"[dim]{len(rows)} of {total}; --limit shows more[/]")


def print_record(record: dict[str, Any], keys: Sequence[str], *, title: str = "") -> None:
    """One object as two columns, the given keys in order."""
    table = Table(title=title or None, title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key in keys:
        if key in record:
            table.add_row(key, cell(record[key]))
    out.print(table)


def status_text(status: str) -> Text:
    style = {"completed": "green", "failed": "red", "cancelled": "yellow", "paused": "yellow"}.get(status, "cyan")
    return Text(status, style=style)


def job_status(row: dict[str, Any]) -> Text:
    return status_text(str(row.get("status", "")))


JOB_COLUMNS = (
    field("id", "job", whole=True),
    Column("status", job_status, whole=True),
    field("file_name", "file"),
    Column("total", lambda r: r["progress"]["total"], numeric=True),
    Column("sent", lambda r: r["progress"]["sent"], numeric=True),
    Column("failed", lambda r: r["progress"]["failed"], numeric=True),
    Column("%", lambda r: r["progress"]["percentage"], numeric=True),
    moment("created_at", "created"),
)
CAMPAIGN_COLUMNS = (
    field("batch_id", "campaign", whole=True),
    field("name"),
    field("account_id", "account"),
    Column("status", job_status, whole=True),
    field("total_jobs", "calls", numeric=True),
    field("completed_jobs", "done", numeric=True),
    field("failed_jobs", "failed", numeric=True),
    field("total_cost", "cost", numeric=True),
    moment("created_at", "created"),
)
DEVICE_COLUMNS = (
    field("id", numeric=True),
    field("device_name", "name"),
    field("provider"),
    field("status"),
    field("connection"),
    field("rate_per_minute", "per minute", numeric=True),
    field("sent_today", "sent today", numeric=True),
    field("daily_limit", "daily cap", numeric=True),
)
ACCOUNT_COLUMNS = (
    field("account_id", "account", whole=True),
    field("account_name", "name"),
    field("plan_type", "plan"),
    field("status"),
    field("credit_available", "credit", numeric=True),
    field("minutes_available", "minutes", numeric=True),
)
BALANCE_KEYS = (
    "account_id",
    "plan_type",
    "credit_balance",
    "credit_reserved",
    "credit_used",
    "credit_available",
    "minutes_purchased",
    "minutes_reserved",
    "minutes_used",
    "minutes_available",
)


# --- progress -------------------------------------------------------------------------------


def transfer_bar(*, transient: bool = False) -> Progress:
    """Bytes moving (an upload or an export): size, speed, time left."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
    )


class CountsColumn(ProgressColumn):
    def __init__(self) -> None:
        super().__init__(table_column=TableColumn(no_wrap=True))

    def render(self, task: Task) -> Text:
        f = task.fields
        text = Text()
        text.append(f"{f.get('sent', 0):,} sent", style="green")
        text.append(" · ")
        text.append(f"{f.get('failed', 0):,} failed", style="red" if f.get("failed") else "")
        if task.total:
            text.append(f" of {task.total:,.0f}")
        return text


class RateColumn(ProgressColumn):
    """Recipients per second over the last few seconds (Rich's own speed estimate)."""

    def __init__(self) -> None:
        super().__init__(table_column=TableColumn(no_wrap=True))

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f}/s" if speed else "-/s", style="progress.data.speed")


class JobProgress:
    """A bulk job's live bar on stderr; the follower's `Listener`."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.progress = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(bar_width=None),
            TaskProgressColumn(),
            CountsColumn(),
            RateColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err,
            speed_estimate_period=10,
        )
        self.task = self.progress.add_task("", total=None, sent=0, failed=0)

    def __enter__(self) -> JobProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, counts: Counts) -> None:
        self.progress.update(
            self.task,
            description=counts.status,
            completed=counts.sent + counts.failed,
            total=counts.total or None,
            sent=counts.sent,
            failed=counts.failed,
        )

    def note(self, text: str) -> None:
        self.progress.console.print(f"[dim]{text}[/]")


def print_preview(preview: dict[str, Any]) -> None:
    """A voice workbook's preview (to stderr: it is the question's context, not the answer)."""
    table = Table(title=f"Preview of {preview.get('filename', 'the file')}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key in ("detectedFormat", "total_rows", "valid_rows", "invalid_rows", "duplicates", "estimated_cost"):
        table.add_row(key, cell(preview.get(key)))
    if preview.get("available_credit") is not None:
        table.add_row("available_credit", cell(preview["available_credit"]))
    err.print(table)
    for kind in ("invalid_details", "warnings"):
        problems = preview.get(kind) or []
        for problem in problems[:10]:
            err.print(Text(f"  row {problem.get('row')}: {problem.get('reason')}", style="dim"))
        if len(problems) > 10:
            err.print(Text(f"  ... and {len(problems) - 10} more {kind.replace('_', ' ')}", style="dim"))


# --- analytics -------------------------------------------------------------------------------

# Per report: the figure the bars draw first, then the other columns of the series.
SERIES_COLUMNS = {
    "messages": ("sent", ("failed", "delivered", "read")),
    "voice": ("calls", ("answered", "no_answer", "busy", "voicemail", "failed", "minutes", "promises")),
}
BAR_WIDTH = 16


def bucket_label(bucket: str, size: str) -> str:
    """A bucket's start as a person reads it: the day, or the day and hour."""
    return bucket[:10] if size != "hour" else f"{bucket[:10]} {bucket[11:16]}"


def print_series(body: dict[str, Any], report: str) -> None:
    """An analytics reply as a table with a bar per bucket, then its totals."""
    drawn, others = SERIES_COLUMNS[report]
    series = body["series"]
    top = max((p[drawn] for p in series), default=0)
    table = Table(
        title=f"{report} {body['from'][:16]} → {body['to'][:16]} ({body['timezone']}, by {body['bucket']})",
        title_justify="left",
        header_style="bold",
    )
    # Figures are never wrapped; on a narrow terminal the bars are cut first.
    table.add_column(body["bucket"], no_wrap=True)
    table.add_column(drawn, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True, overflow="crop", min_width=4)
    for name in others:
        table.add_column(name.replace("_", " "), justify="right", no_wrap=True)
    for point in series:
        bar = "█" * round(BAR_WIDTH * point[drawn] / top) if top else ""
        table.add_row(
            bucket_label(point["bucket"], body["bucket"]),
            cell(point[drawn]),
            Text(bar, style="cyan"),
            *(cell(point[name]) for name in others),
        )
    out.print(table)
    totals = body["totals"]
    rates = [
        f"{k.replace('_', ' ')} {totals[k]}%" for k in ("delivery_rate", "read_rate", "answer_rate") if k in totals
    ]
    out.print(f"total {drawn}: {cell(totals[drawn])}" + (f" · {' · '.join(rates)}" if rates else ""))
