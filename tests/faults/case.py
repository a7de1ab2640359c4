"""One fault-injection case: a faulty input or command run against the real ``cheers`` CLI.

Each ``cases_<group>.py`` in this folder defines ``CASES: list[Case]``. ``python -m tests.faults``
(``make faults``) runs them all and prints the table the README's reliability section shows;
``pytest -m faults`` runs them as tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Outcome:
    """What a case saw: ``ok`` when the run held (refused with a clear line, or skipped and counted)."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class Case:
    """``run(tmp)`` injects the fault under the empty folder ``tmp`` and judges the outcome.

    item: the number of the fault in issue 14's list; what: the fault in a few words;
    expect: what the kit must do (one line, shown in the table).
    """

    id: str
    item: int
    what: str
    expect: str
    run: Callable[[Path], Outcome]


@dataclass(frozen=True)
class Result:
    """A finished ``cheers`` process: exit code and the two streams."""

    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def cheers(args: list[str], cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> Result:
    """Run ``python -m cheers_pl <args>`` as a user would; a run past ``timeout`` s is killed (rc -9)."""
    full_env = {**os.environ, "CHEERS_NUM_THREADS": "1", **(env or {})}
    try:
        p = subprocess.run(
            [sys.executable, "-m", "cheers_pl", *args],
            cwd=cwd or REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
        )
    except subprocess.TimeoutExpired as e:
        return Result(-9, _s(e.stdout), _s(e.stderr) + f"\n[killed after {timeout} s]")
    return Result(p.returncode, p.stdout, p.stderr)


def _s(x: bytes | str | None) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def last_line(text: str) -> str:
    """The last non-empty line of ``text`` (the one-line refusal a case shows)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""
