"""Two processes of every kind, three campaigns at once (a bulk job, a scheduled voice batch, a
scheduled group message), one replica of each kind stopped mid-job: nothing lost, nothing
doubled, every dispatcher sent a share, either gateway served the job's socket, the schedulers
acted once (bench/scale_out.py, which `make bench scale_out` runs at 100,000 recipients).

SCALE_RECIPIENTS sets the job size (50,000)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from bench import faults, scale_out
from services.runtime.devstack import parse_scale

RECIPIENTS = int(os.environ.get("SCALE_RECIPIENTS", "50000"))

pytestmark = [pytest.mark.faults, pytest.mark.timeout(int(600 + RECIPIENTS / 20))]


@pytest.fixture
def scaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[faults.FaultStack]:
    fs = scale_out.start(tmp_path_factory.mktemp("scaled"))
    try:
        yield fs
    finally:
        fs.stop()


def test_replicas_stopped_mid_job_lose_and_double_nothing(
    scaled: faults.FaultStack, record_row: Callable[[faults.Row], None]
) -> None:
    try:
        row = scale_out.run(scaled, RECIPIENTS)
    except faults.CaseFailed as exc:
        what, _, evidence = str(exc).partition("\n")
        row = faults.Row(scale_out.CASE, RECIPIENTS, problems=[what], evidence=evidence)
    record_row(row)
    print(row.report())
    assert row.ok, row.report()


def test_scale_names_known_kinds_and_bounded_counts() -> None:
    assert parse_scale("gateway=2, dispatcher=3") == {"gateway": 2, "dispatcher": 3}
    assert parse_scale("") == {}
    for bad in ("postgres=2", "dispatcher=0", "dispatcher=9", "dispatcher=two", "gateway"):
        with pytest.raises(ValueError, match="PREGONERO_SCALE"):
            parse_scale(bad)
