"""The commands. Each one is a few calls of the public API and one way of showing the answer;
errors are not handled here but in `main`, once, where each kind gets its exit code."""

from __future__ import annotations

import re
import sys
import uuid
from datetime import datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.prompt import Prompt
from rich.text import Text

from . import views
from .api import Api
from .config import resolve
from .errors import API_ERROR, INTERRUPTED, ApiError, CliError, UsageError
from .live import TERMINAL, JobFollower
from .views import err, out, print_json

app = typer.Typer(
    name="pregonero",
    help="Operate Pregonero through its public API: bulk WhatsApp jobs, voice campaigns, devices and accounts.",
    epilog=(
        "The API's address and token: --url/--token, else PREGONERO_URL/PREGONERO_TOKEN, else "
        "~/.config/pregonero/config.toml (url = ..., token = ...). Exit codes: 0 done, 1 the API refused "
        "(or a followed job did not complete), 2 bad usage, 3 cannot connect, 130 interrupted."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
campaign_app = typer.Typer(help="Voice campaigns from contact workbooks.", no_args_is_help=True)
app.add_typer(campaign_app, name="campaign")

Json = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")]
Limit = Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")]
JobId = Annotated[str, typer.Argument(help="The bulk job's id.", show_default=False)]


class Country(StrEnum):
    cl = "cl"
    ar = "ar"


class UseCase(StrEnum):
    debt_collection = "debt_collection"
    marketing = "marketing"


class Report(StrEnum):
    messages = "messages"
    voice = "voice"


class Bucket(StrEnum):
    hour = "hour"
    day = "day"
    week = "week"


ANALYTICS_PATHS = {Report.messages: "/api/analytics/messages", Report.voice: "/api/v1/reports/analytics"}


class ExportFormat(StrEnum):
    csv = "csv"
    xlsx = "xlsx"


@app.callback()
def connection(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(help="The API's address, e.g. http://localhost:8000.")] = None,
    token: Annotated[str | None, typer.Option(help="A static token, an API key (pk_...) or a session JWT.")] = None,
) -> None:
    # Resolved when a command needs it, so `--help` works whatever the config file holds.
    ctx.obj = (url, token)


def client(ctx: typer.Context) -> Api:
    url, token = ctx.find_root().obj
    api = Api(resolve(url, token))
    ctx.call_on_close(api.close)
    return api


# --- WhatsApp bulk jobs ----------------------------------------------------------------------


@app.command()
def send(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(
            exists=True,
            dir_okay=False,
            readable=True,
            help="phone|@valor1|@valor2... per line, UTF-8.",
            show_default=False,
        ),
    ],
    message: Annotated[str, typer.Option("--message", "-m", help="The text; @valor1... take each row's values.")],
    devices: Annotated[
        int | None, typer.Option(min=1, max=1000, help="Devices to send from at once (API default 5).")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow the job to its end (--no-wait: print its id and return).")] = True,
    as_json: Json = False,
) -> None:
    """Upload a bulk file, then follow its job live until it ends (Ctrl-C: pause or detach)."""
    api = client(ctx)
    form = {"message": message}
    if devices is not None:
        form["devices_limit"] = str(devices)
    try:
        reply = upload(api, "/messages/send-bulk-file", file, form)
    except KeyboardInterrupt:
        err.print("Upload interrupted. If the server had the whole file its job exists: see `pregonero jobs`.")
        raise typer.Exit(INTERRUPTED) from None
    job = reply["job"]
    skipped = [
        f"{n:,} {what}"
        for n, what in (
            (reply.get("duplicates", 0), "repeated"),
            (reply.get("invalid_rows", 0), "without a usable phone"),
        )
        if n
    ]
    err.print(
        f"Job [bold]{job['id']}[/]: {job['total_numbers']:,} recipients"
        + (f" (not sent: {', '.join(skipped)})" if skipped else "")
    )
    for bad in reply.get("invalid", [])[:5]:
        # The file's own text: never read as markup.
        err.print(Text(f"  line {bad['line']}: {bad['reason']} ({bad['value']})", style="dim"))
    if not wait:
        if as_json:
            print_json(job)
        else:
            out.print(f"Follow it with: pregonero watch {job['id']}")
        return
    report(follow(api, job["id"]), as_json)


@app.command()
def watch(ctx: typer.Context, job_id: JobId, as_json: Json = False) -> None:
    """Follow a bulk job live until it ends (a finished job is reported at once)."""
    api = client(ctx)
    report(follow(api, job_id), as_json)


@app.command()
def jobs(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="Only these: pending, processing, paused, completed...")] = None,
    limit: Limit = 20,
    as_json: Json = False,
) -> None:
    """Bulk WhatsApp jobs, newest first."""
    rows, total = page(client(ctx), "/jobs", limit=limit, status=status)
    listing(rows, as_json, views.JOB_COLUMNS, title="Bulk jobs", total=total)


@app.command()
def pause(ctx: typer.Context, job_id: JobId, as_json: Json = False) -> None:
    """Stop sending a bulk job; `resume` goes on where it stopped."""
    steered(client(ctx).post(f"/jobs/{job_id}/pause"), as_json)


@app.command()
def resume(ctx: typer.Context, job_id: JobId, as_json: Json = False) -> None:
    """Go on sending a paused bulk job."""
    steered(client(ctx).post(f"/jobs/{job_id}/resume"), as_json)


@app.command()
def cancel(
    ctx: typer.Context,
    job_id: JobId,
    reason: Annotated[str, typer.Option(help="Kept with the job.")] = "",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    as_json: Json = False,
) -> None:
    """Stop a bulk job for good: every recipient not yet sent is cancelled."""
    confirm(yes, f"Cancel job {job_id}? Its unsent recipients will never be sent.")
    steered(client(ctx).post(f"/jobs/{job_id}/cancel", params={"reason": reason} if reason else None), as_json)


@app.command()
def export(
    ctx: typer.Context,
    job_id: JobId,
    format: Annotated[ExportFormat, typer.Option("--format", "-f", help="csv or xlsx.")] = ExportFormat.csv,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Default: the name the server gives.")] = None,
) -> None:
    """Download a bulk job's per-recipient results as CSV or XLSX."""
    api = client(ctx)
    with views.transfer_bar() as bar:
        task = bar.add_task(f"export {job_id}", total=None)

        def destination(response: httpx.Response) -> Path:
            size = response.headers.get("content-length", "")
            dest = output or Path(attachment_name(response) or f"job-{job_id}-results.{format.value}")
            bar.update(task, total=int(size) if size.isdigit() else None, description=f"export {dest.name}")
            return dest

        try:
            dest, size = api.download(
                f"/jobs/{job_id}/results/export",
                {"format": format.value},
                destination=destination,
                on_progress=lambda n: bar.update(task, completed=n),
            )
        except ApiError as exc:
            if exc.status == 404 and exc.message == "Not Found":
                # FastAPI's answer for a path it has no route for (a job it cannot find says so).
                raise ApiError(404, f"{exc.message}: this server has no results export route") from exc
            raise
        bar.update(task, total=size, completed=size)
    out.print(f"Wrote {size:,} bytes to {dest}")


def attachment_name(response: httpx.Response) -> str | None:
    """The file name of Content-Disposition, without any folder (a server does not choose where)."""
    match = re.search(r'filename="?([^";]+)"?', response.headers.get("content-disposition", ""))
    return Path(match[1]).name if match and Path(match[1]).name not in ("", ".", "..") else None


# --- voice campaigns -------------------------------------------------------------------------


@app.command()
def campaigns(
    ctx: typer.Context,
    account: Annotated[str | None, typer.Option(help="Only this account's (admins).")] = None,
    status: Annotated[str | None, typer.Option(help="active, pending, processing, paused, completed...")] = None,
    limit: Limit = 20,
    as_json: Json = False,
) -> None:
    """Voice campaigns (call batches), newest first."""
    rows, total = page(client(ctx), "/api/v1/batches", limit=limit, status=status, account_id=account)
    listing(rows, as_json, views.CAMPAIGN_COLUMNS, title="Voice campaigns", total=total)


@campaign_app.command("create")
def campaign_create(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, readable=True, help=".xlsx, .xls or .csv.", show_default=False),
    ],
    account: Annotated[str, typer.Option(help="The account that pays for the calls.")],
    country: Annotated[Country | None, typer.Option(help="Default: told by the file's headers.")] = None,
    use_case: Annotated[UseCase | None, typer.Option("--type", help="Default: debt_collection.")] = None,
    name: Annotated[str | None, typer.Option(help="The campaign's name.")] = None,
    start_at: Annotated[str | None, typer.Option(help="ISO 8601 time the calls start (default: now).")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Create without asking, after the preview.")] = False,
    as_json: Json = False,
) -> None:
    """Preview a voice workbook (counts, cost, problems), then create its campaign."""
    api = client(ctx)
    form = {"account_id": account}
    for key, value in (
        ("country", country and country.value.upper()),
        ("use_case", use_case and use_case.value),
        ("batch_name", name),
        ("scheduled_at", start_at),
    ):
        if value:
            form[key] = value
    preview = upload(api, "/api/v1/batches/excel/preview", file, form)
    views.print_preview(preview)
    if not preview.get("valid_rows"):
        raise ApiError(400, "the file has no row that can be called")
    confirm(yes, f"Create the campaign with {preview['valid_rows']:,} calls for {account}?")
    created = upload(api, "/api/v1/batches/excel/create", file, form)
    if as_json:
        print_json(created)
        return
    out.print(
        f"Campaign [bold]{created['batch_id']}[/] created: {created['jobs_created']:,} calls, "
        f"{created['duplicates_skipped']:,} duplicates skipped, estimated cost {views.cell(created['estimated_cost'])}"
    )


# --- devices and accounts --------------------------------------------------------------------


@app.command()
def analytics(
    ctx: typer.Context,
    report: Annotated[Report, typer.Argument(help="WhatsApp messages or voice calls.")] = Report.messages,
    since: Annotated[
        str | None, typer.Option("--from", help="A date (YYYY-MM-DD) or ISO 8601 time; default 30 days ago.")
    ] = None,
    until: Annotated[str | None, typer.Option("--to", help="A date (its whole day) or time; default now.")] = None,
    bucket: Annotated[Bucket, typer.Option(help="One row per hour, day or week.")] = Bucket.day,
    timezone: Annotated[str | None, typer.Option(help="The zone buckets are cut in; default yours.")] = None,
    account: Annotated[str | None, typer.Option(help="Only this account (admins).")] = None,
    as_json: Json = False,
) -> None:
    """What was sent (or called) per day, hour or week, as a bar chart, with its totals."""
    body = client(ctx).get(
        ANALYTICS_PATHS[report],
        **{"from": since, "to": until, "bucket": bucket.value, "timezone": timezone, "account_id": account},
    )
    if as_json:
        print_json(body)
    else:
        views.print_series(body, report.value)


@app.command()
def devices(ctx: typer.Context, as_json: Json = False) -> None:
    """WhatsApp devices (senders) and what their provider last said of them."""
    body = client(ctx).get("/devices")
    if as_json:
        print_json(body)
    else:
        views.print_table(body["devices"], views.DEVICE_COLUMNS, title="Devices")


@app.command()
def accounts(ctx: typer.Context, limit: Limit = 50, as_json: Json = False) -> None:
    """Accounts (an admin sees all; a member its own) with what they have left."""
    rows, total = page(client(ctx), "/api/v1/accounts", limit=min(limit, 500))
    listing(rows, as_json, views.ACCOUNT_COLUMNS, title="Accounts", total=total)


@app.command()
def balance(
    ctx: typer.Context,
    account: Annotated[str | None, typer.Argument(help="Default: the only account the token sees.")] = None,
    as_json: Json = False,
) -> None:
    """An account's credit and minutes: added, reserved, used, available."""
    api = client(ctx)
    if account is None:
        rows, total = page(api, "/api/v1/accounts", limit=2)
        if total != 1:
            raise UsageError(f"this token sees {total} accounts: name one (`pregonero accounts` lists them)")
        account = str(rows[0]["account_id"])
    body = api.get(f"/api/v1/accounts/{account}/balance")
    if as_json:
        print_json(body)
    else:
        views.print_record(body, views.BALANCE_KEYS, title=f"Balance of {account}")


@app.command()
def topup(
    ctx: typer.Context,
    account: Annotated[str, typer.Argument(help="The account.", show_default=False)],
    amount: Annotated[str, typer.Argument(help="How much, e.g. 100 or 12.5.", show_default=False)],
    minutes: Annotated[bool, typer.Option("--minutes", help="Add minutes instead of credits.")] = False,
    reason: Annotated[str | None, typer.Option(help="Kept with the ledger entry.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Repeat a top-up safely: the same key is applied once. Default: a new one.")
    ] = None,
    as_json: Json = False,
) -> None:
    """Add credits (or minutes) to an account (admins)."""
    try:
        value = Decimal(amount)
    except InvalidOperation:
        raise UsageError(f"AMOUNT must be a number, not {amount!r}") from None
    if not value.is_finite() or value <= 0:
        raise UsageError("AMOUNT must be more than 0")
    unit = "minutes" if minutes else "credits"
    body: dict[str, Any] = {unit: format(value, "f")}
    if reason:
        body["reason"] = reason
    key = idempotency_key or str(uuid.uuid4())
    reply = client(ctx).post(f"/api/v1/accounts/{account}/topup", json=body, headers={"Idempotency-Key": key})
    if as_json:
        print_json(reply)
        return
    out.print(
        f"Added {views.cell(reply['amount'])} {reply.get('unit') or unit} to {account}: "
        f"balance {views.cell(reply['new_balance'])} (transaction {reply['transaction_id']})"
    )


# --- shared steps ----------------------------------------------------------------------------


def listing(rows: list[dict[str, Any]], as_json: bool, columns: Any, *, title: str, total: int) -> None:
    if as_json:
        print_json(rows)
    else:
        views.print_table(rows, columns, title=title, total=total)


def page(api: Api, path: str, **params: Any) -> tuple[list[dict[str, Any]], int]:
    """A list route's rows and its total (X-Total-Count)."""
    response = api.request("GET", path, params={k: v for k, v in params.items() if v is not None})
    rows = response.json()
    total = response.headers.get("x-total-count", "")
    return rows, int(total) if total.isdigit() else len(rows)


def upload(api: Api, path: str, file: Path, form: dict[str, str]) -> Any:
    size = file.stat().st_size
    with views.transfer_bar() as bar:
        task = bar.add_task(f"upload {file.name}", total=size)

        def moved(done: int) -> None:
            # Sent is not yet read: the server answers once it has read every row.
            bar.update(task, completed=done, description="server reading" if done >= size else f"upload {file.name}")

        reply = api.upload(path, file, form, moved)
        bar.update(task, description=f"uploaded {file.name}")
        return reply


def confirm(yes: bool, question: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{question} Nobody to ask here: add --yes.")
    if not typer.confirm(question, err=True):
        err.print("Nothing done.")
        raise typer.Exit(INTERRUPTED)


def follow(api: Api, job_id: str) -> dict[str, Any]:
    """The job, followed live to its end. Ctrl-C asks what to do; it never cancels the job."""
    while True:
        try:
            with views.JobProgress(job_id) as view:
                return JobFollower(api, job_id, view).run()
        except KeyboardInterrupt:
            if interrupted(api, job_id):
                raise typer.Exit(INTERRUPTED) from None


def interrupted(api: Api, job_id: str) -> bool:
    """Asks whether to pause the job, detach from it or keep watching (True: stop watching).
    Without a terminal to ask, it detaches: the job goes on, as it would if the laptop closed."""
    choice = "d"
    if sys.stdin.isatty():
        try:
            choice = Prompt.ask(
                "\n\\[p]ause the job, \\[d]etach (it goes on sending) or keep \\[w]atching?",
                choices=["p", "d", "w"],
                default="d",
                console=err,
            )
        except (KeyboardInterrupt, EOFError):
            choice = "d"
    if choice == "w":
        return False
    if choice == "p":
        job = api.post(f"/jobs/{job_id}/pause")["job"]
        p = job["progress"]
        err.print(f"Job {job_id} paused after {p['sent'] + p['failed']:,} of {p['total']:,}.")
        err.print(f"Go on with: pregonero resume {job_id}   (then: pregonero watch {job_id})")
    else:
        err.print(f"Detached: job {job_id} goes on sending. Follow it again with: pregonero watch {job_id}")
    return True


def report(job: dict[str, Any], as_json: bool) -> None:
    """A followed job's end: its counts, and exit 1 unless it completed."""
    status, p = job["status"], job["progress"]
    if as_json:
        print_json(job)
    else:
        line = views.status_text(status)
        line.append(f": {p['sent']:,} sent, {p['failed']:,} failed of {p['total']:,}", style="")
        if p.get("cancelled"):
            line.append(f", {p['cancelled']:,} cancelled", style="")
        if seconds := elapsed(job):
            line.append(f" in {seconds:,.1f} s", style="")
        out.print(line)
        if job.get("error"):
            out.print(f"[red]{job['error']}[/]")
    if status != "completed" and status in TERMINAL:
        raise typer.Exit(API_ERROR)


def elapsed(job: dict[str, Any]) -> float | None:
    try:
        return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def steered(reply: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(reply)
        return
    job = reply["job"]
    p = job["progress"]
    line = views.status_text(job["status"])
    line.append(f": job {job['id']}, {p['sent']:,} sent, {p['failed']:,} failed of {p['total']:,}", style="")
    out.print(line)


def main() -> None:
    """The console script: every error the commands raise leaves here, with its exit code."""
    try:
        app(prog_name="pregonero")
    except CliError as exc:
        # The API's words as they are: never read as Rich markup.
        err.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False)
        sys.exit(exc.exit_code)
