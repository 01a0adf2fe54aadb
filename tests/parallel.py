"""`make test`: the suite as two pytest processes at once, the fault cases (`-m faults`) and
the rest. Most of the fault cases' time is waiting (a service frozen for two minutes, a job
draining after a kill, a replica stopping), which the rest of the suite puts to use: on two
cores the whole takes the longer of the two instead of their sum.

They cannot disturb each other: the fault cases start servers of their own (never the
session's), and each process has its own temporary folder. The rest's output streams as it
runs; the fault cases' is printed when both have ended. The exit status is the rest's if it
failed, else the fault cases'. `make test PYTEST_ARGS=…` runs plain pytest instead."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="pregonero-test-") as tmp:
        log_path = Path(tmp) / "faults.log"
        started = time.monotonic()
        with log_path.open("wb") as log:
            faults = subprocess.Popen(
                [*PYTEST, "-m", "faults", "--basetemp", f"{tmp}/faults", "tests/faults"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            print(f"fault cases running alongside (pid {faults.pid}); their output follows the rest's", flush=True)
            try:
                rest = subprocess.call([*PYTEST, "-m", "not faults", "--basetemp", f"{tmp}/rest"])
                faults_status = faults.wait()
            finally:
                if faults.poll() is None:  # interrupted: no orphan stacks
                    faults.terminate()
                    faults.wait(60)
        print(
            f"\n===== fault cases (exit {faults_status}, {time.monotonic() - started:.0f} s in all) =====", flush=True
        )
        sys.stdout.write(log_path.read_text(errors="replace"))
        return rest or faults_status


if __name__ == "__main__":
    sys.exit(main())
