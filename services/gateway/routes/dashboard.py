"""The SpeechAI dashboard's aggregate views: stats, overview, call history, use cases.

The counters come from one campaigns RPC (`GetDashboard`); the overview adds the account
and its balance from the accounts service when one account is in scope (a member always;
an admin who names one). Two documents describe the overview differently and both shapes
are read somewhere, so its one reply carries the keys of both."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pregonero.accounts.v1 import accounts_pb2
from pregonero.campaigns.v1 import campaigns_pb2

from services.runtime.identity import Caller

from ..auth import require_caller
from ..values import number, when
from .accounts import balance_json
from .bulk import percentage
from .jobs import AccountFilter, Limit, Skip, job_json, scoped_account

router = APIRouter(prefix="/api/v1", tags=["voice dashboard"])

CallerDep = Annotated[Caller, Depends(require_caller)]

USE_CASES: list[dict[str, Any]] = [
    {
        "id": "debt_collection",
        "name": "Cobranza de Deudas",
        "description": "Llamadas automáticas para recordar pagos pendientes",
        "processing_types": ["basic", "acquisition"],
        "countries": ["CL", "AR"],
        "endpoints": {
            "CL": "/api/v1/batches/chile/debt_collection",
            "AR": "/api/v1/batches/argentina/debt_collection",
        },
    },
    {
        "id": "marketing",
        "name": "Marketing",
        "description": "Campañas de marketing y promociones",
        "processing_types": ["basic", "acquisition"],
        "countries": ["CL", "AR"],
        "endpoints": {"CL": "/api/v1/batches/chile/marketing", "AR": "/api/v1/batches/argentina/marketing"},
    },
]


def stats_json(d: campaigns_pb2.Dashboard) -> dict[str, Any]:
    finished = d.completed_jobs + d.failed_jobs
    return {
        "account_id": d.account_id or None,
        "total_batches": d.total_batches,
        "active_batches": d.active_batches,
        "paused_batches": d.paused_batches,
        "completed_batches": d.completed_batches,
        "cancelled_batches": d.cancelled_batches,
        "total_jobs": d.total_jobs,
        "pending_jobs": d.pending_jobs,
        "scheduled_jobs": d.scheduled_jobs,
        "in_progress_jobs": d.in_progress_jobs,
        "completed_jobs": d.completed_jobs,
        "failed_jobs": d.failed_jobs,
        "cancelled_jobs": d.cancelled_jobs,
        "suspended_jobs": d.suspended_jobs,
        "calls_today": d.calls_today,
        "jobs_today": d.jobs_today,
        "success_rate_percentage": percentage(d.completed_jobs, finished),
        "total_cost": number(d.total_cost),
        "total_minutes": number(d.total_minutes),
    }


def account_summary_json(account: accounts_pb2.Account, balance: accounts_pb2.Balance) -> dict[str, Any]:
    """Both documented account shapes: `{name, status, balance, billing_type}` and
    `{credit_balance}`; `balance` is what is left to spend, in the plan's own unit. The
    balances mean what they mean on the account objects (`balance_json`)."""
    minutes = balance.plan_type == "minutes_based"
    amounts = balance_json(balance)
    del amounts["account_id"], amounts["plan_type"]
    return {
        "account_id": account.account_id,
        "_id": account.object_id,
        "name": account.account_name,
        "account_name": account.account_name,
        "status": account.status,
        "plan_type": balance.plan_type,
        "billing_type": "minutes" if minutes else "credits",
        "balance": number(balance.minutes_available if minutes else balance.credit_available),
        **amounts,
    }


def overview_json(d: campaigns_pb2.Dashboard, account: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
    s = stats_json(d)
    finished = s["completed_jobs"] + s["failed_jobs"]
    return {
        "success": True,
        "timestamp": now.isoformat().replace("+00:00", "Z"),
        "account_id": s["account_id"],
        "account": account,
        # The "missing endpoints" document's shape (the metric cards).
        "metrics": {
            "jobs_today": s["jobs_today"],
            "success_rate_percentage": s["success_rate_percentage"],
            "active_batches": s["active_batches"],
            "pending_jobs": s["pending_jobs"],
        },
        "detailed_stats": {
            "jobs": {
                "today": s["jobs_today"],
                "pending": s["pending_jobs"],
                "completed": s["completed_jobs"],
                "failed": s["failed_jobs"],
                "total_finished": finished,
            },
            "batches": {
                "active_count": s["active_batches"],
                "total_jobs": s["total_jobs"],
                "total_cost": s["total_cost"],
                "total_minutes": s["total_minutes"],
            },
        },
        # The API reference's shape.
        "batches": {
            "total": s["total_batches"],
            "active": s["active_batches"],
            "paused": s["paused_batches"],
            "completed": s["completed_batches"],
            "cancelled": s["cancelled_batches"],
        },
        "jobs": {
            "total": s["total_jobs"],
            "pending": s["pending_jobs"],
            "scheduled": s["scheduled_jobs"],
            "in_progress": s["in_progress_jobs"],
            "completed": s["completed_jobs"],
            "failed": s["failed_jobs"],
            "cancelled": s["cancelled_jobs"],
            "suspended": s["suspended_jobs"],
        },
        "costs": {
            "total_spent": s["total_cost"],
            "total_minutes": s["total_minutes"],
            "average_per_call": round(s["total_cost"] / finished, 4) if finished else 0.0,
        },
        "recent_activity": [job_json(j) for j in d.recent_jobs],
    }


def call_json(c: campaigns_pb2.CallRecord) -> dict[str, Any]:
    return {
        "call_id": c.call_id,
        "job_id": c.job_id,
        "batch_id": c.batch_id,
        "contact_name": c.contact_name,
        "phone": c.phone,
        "status": c.status,
        "duration_ms": c.duration_ms,
        "cost": number(c.cost),
        "created_at": when(c.created_at),
        "summary": c.summary or None,
        "sentiment": c.sentiment or None,
    }


async def _dashboard(request: Request, account_id: str) -> campaigns_pb2.Dashboard:
    return await request.app.state.backends.campaigns.GetDashboard(
        campaigns_pb2.DashboardRequest(account_id=account_id),
    )


async def _account(request: Request, account_id: str) -> dict[str, Any]:
    accounts = request.app.state.backends.accounts
    account, balance = await asyncio.gather(
        accounts.GetAccount(accounts_pb2.GetAccountRequest(account_id=account_id)),
        accounts.GetBalance(accounts_pb2.GetBalanceRequest(account_id=account_id)),
    )
    return account_summary_json(account, balance)


@router.get("/dashboard/stats", summary="Campaign and call counters")
async def dashboard_stats(request: Request, caller: CallerDep, account_id: AccountFilter = None) -> dict[str, Any]:
    return stats_json(await _dashboard(request, scoped_account(caller, account_id)))


@router.get("/dashboard/overview", summary="Counters, costs, the account and recent calls, in one reply")
async def dashboard_overview(request: Request, caller: CallerDep, account_id: AccountFilter = None) -> dict[str, Any]:
    requested = scoped_account(caller, account_id)
    # An admin without a filter sees every account: no one account to describe.
    in_scope = requested or ("" if caller.is_admin else caller.account_id)
    if in_scope:
        dashboard, account = await asyncio.gather(_dashboard(request, requested), _account(request, in_scope))
    else:
        dashboard, account = await _dashboard(request, requested), None
    return overview_json(dashboard, account, datetime.now(UTC))


@router.get("/calls/history", summary="Calls made, newest first")
async def calls_history(
    request: Request,
    response: Response,
    caller: CallerDep,
    account_id: AccountFilter = None,
    batch_id: Annotated[str | None, Query(max_length=64, description="`batch_id` or `_id`")] = None,
    # The call's own status as the provider reports it (`ended`, `error`...), not the job's.
    status: Annotated[str | None, Query(max_length=32)] = None,
    limit: Limit = 50,
    skip: Skip = 0,
) -> dict[str, Any]:
    reply = await request.app.state.backends.campaigns.ListCalls(
        campaigns_pb2.ListCallsRequest(
            account_id=scoped_account(caller, account_id),
            batch_id=batch_id or "",
            status=status or "",
            limit=limit,
            skip=skip,
        ),
    )
    response.headers["X-Total-Count"] = str(reply.total)
    return {"calls": [call_json(c) for c in reply.calls], "total": reply.total}


@router.get("/use-cases", summary="What voice campaigns can do: use cases, processing types, countries")
async def use_cases(caller: CallerDep) -> dict[str, Any]:
    return {"use_cases": USE_CASES}
