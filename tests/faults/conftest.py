"""The fault suite's stack: its own PostgreSQL, NATS, simulator, services and Envoy (cases
stop and restart them, so never the session's), shared by the cases of the module and
started afresh after a case that failed. Each case prints its row; the table of all of them
closes the run.

FAULTS_RECIPIENTS sets the job size (20,000); FAULTS_LOG_LEVEL the services' log level
(WARNING; INFO puts more in the log tails a failure shows)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench import faults

ROWS = pytest.StashKey[list[faults.Row]]()
FAILED = pytest.StashKey[bool]()


def recipients() -> int:
    return int(os.environ.get("FAULTS_RECIPIENTS", "20000"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: the send path under faults (real servers killed and restarted)")
    config.stash[ROWS] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = config.stash.get(ROWS, [])
    if rows:
        terminalreporter.section(f"send path under faults ({recipients():,} recipients)")
        terminalreporter.write_line(faults.table(rows))
        for row in rows:
            for note in row.notes:
                terminalreporter.write_line(f"{row.case}: {note}")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[faults.SharedStack]:
    stacks = faults.SharedStack(lambda: tmp_path_factory.mktemp("faults"))
    try:
        yield stacks
    finally:
        stacks.close()


@pytest.fixture
def record_row(request: pytest.FixtureRequest) -> Callable[[faults.Row], None]:
    """Adds a case's row to the closing table."""
    return request.config.stash[ROWS].append


@pytest.fixture
def fault_case(shared: faults.SharedStack, request: pytest.FixtureRequest) -> Iterator[Callable[[str], None]]:
    """Runs a case on the shared stack, records its row for the closing table, and fails the
    test with the row, its problems and the evidence when the promise was broken."""

    def check(case: str) -> None:
        row = faults.verdict(shared.get(), case, recipients())
        request.config.stash[ROWS].append(row)
        print(row.report())
        assert row.ok, row.report()

    yield check
    if request.node.stash.get(FAILED, True):
        shared.discard()  # the next case must not inherit this one's stuck work or dead process
