"""``python -m tests.faults [--only ID ...]``: run every fault case against the real CLI, print a table."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import tempfile
import time
from pathlib import Path

from tests.faults.case import Case


def all_cases() -> list[Case]:
    """Every ``CASES`` of the ``cases_*`` modules of this package, ordered by item then id."""
    import tests.faults as pkg

    cases: list[Case] = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("cases_"):
            cases += importlib.import_module(f"tests.faults.{info.name}").CASES
    return sorted(cases, key=lambda c: (c.item, c.id))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make faults", description=__doc__)
    parser.add_argument("--only", nargs="*", default=None, help="case ids to run (default: all)")
    args = parser.parse_args(argv)
    cases = [c for c in all_cases() if not args.only or c.id in args.only]
    rows = []
    for k, case in enumerate(cases, 1):
        print(f"[{k}/{len(cases)}] {case.id}: {case.what}", file=sys.stderr, flush=True)
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"fault-{case.id}-") as tmp:
            try:
                outcome = case.run(Path(tmp))
                ok, detail = outcome.ok, outcome.detail
            except Exception as err:  # a case that crashes is a failed case, not a crashed table
                ok, detail = False, f"case raised {type(err).__name__}: {err}"
        rows.append((case, ok, detail.replace("|", "/").replace("\n", " ")[:160], time.monotonic() - start))
    print("| # | case | fault | the kit must | held | what it did | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for case, ok, detail, secs in rows:
        print(
            f"| {case.item} | `{case.id}` | {case.what} | {case.expect} | {'yes' if ok else '**no**'} "
            f"| {detail} | {secs:.0f} |"
        )
    failed = sum(not ok for _, ok, _, _ in rows)
    print(f"\n{len(rows) - failed}/{len(rows)} held")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
