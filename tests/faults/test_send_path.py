"""The send path keeps its promise whatever fails mid-job: every recipient contacted at most
once or reported, every sent message charged exactly once, nothing left reserved, ledger
drift 0; judged by the simulated provider's own record and the ledger (bench/faults.py,
which `make bench faults` runs at 100,000 recipients).

`-m faults` selects these cases, `-m "not faults"` leaves them out; FAULTS_RECIPIENTS sets the
job size (20,000)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench import faults
from tests.faults.conftest import recipients

# Hard caps only (a case that hangs is ended here); the cases' own waits fail first, with the
# job's state, what holds it up and the processes' last log lines.
TIMEOUT = int(900 + recipients() / 20)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(TIMEOUT)]
Case = Callable[[str], None]


def test_dispatcher_killed_mid_job(fault_case: Case) -> None:
    fault_case("dispatcher_killed")


def test_campaigns_killed_mid_job(fault_case: Case) -> None:
    fault_case("campaigns_killed")


def test_accounts_killed_mid_job(fault_case: Case) -> None:
    fault_case("accounts_killed")


def test_nats_killed_and_restarted_on_its_store(fault_case: Case) -> None:
    fault_case("nats_killed")


def test_postgres_restarted_mid_job(fault_case: Case) -> None:
    fault_case("postgres_restarted")


@pytest.mark.timeout(TIMEOUT + int(faults.FREEZE_S))
def test_accounts_unreachable_for_two_minutes(fault_case: Case) -> None:
    fault_case("accounts_frozen")


def test_devices_edited_disabled_and_deleted_while_sending(fault_case: Case) -> None:
    fault_case("devices_edited")


def test_one_of_two_dispatchers_killed(fault_case: Case) -> None:
    fault_case("two_dispatchers")


def test_voice_dispatcher_killed_during_calls(fault_case: Case) -> None:
    fault_case("voice_dispatcher_killed")
