"""The README's shell blocks run as written (issue 15).

Every ``bash`` block of README.md starts with a comment that says what it needs (``KINDS``), and
its commands use the kit's ``.venv/bin/`` prefix (no bare ``cheers`` / ``python``). Then:

* *runs on CPU (seconds)* blocks and the Python snippet run, each command must exit 0;
* every command of a *needs the downloaded weights* block must stop (exit != 0) with one error
  line and no traceback, in a folder without weights;
* *runs on CPU (minutes)* and *after `make demo`* blocks run in a temporary copy of the
  repository, in README order (``make demo`` first), under the ``readme`` mark: ``make
  readme-check`` (about 40 minutes on 2 cores; ``make test`` itself is not rerun from inside the suite);
* the kit's own commands of the *needs GPUs* blocks must stop like the *weights* ones here; the
  rest of those (srun, torchrun) and the *about an hour* block are checked for tag and prefix only.

``.venv/bin/cheers`` commands run in this process through ``cheers_pl.cli.main`` (the script's
own entry point, without paying the torch import for each); a ``make`` line runs the recipe
``make -n`` prints, its ``cheers`` lines in this process too; the long blocks run in a shell.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cheers_pl.cli import main as cheers

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
KINDS = {
    "# runs on CPU (seconds)": "seconds",
    "# runs on CPU (minutes)": "minutes",
    "# runs on CPU after `make demo` (seconds)": "after-demo",
    "# runs on CPU after `make demo` (minutes)": "after-demo",
    "# runs on CPU (about an hour)": "hour",
    "# needs the downloaded weights": "weights",
    "# needs GPUs": "gpu",
}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
ERROR_LINE = re.compile(r"(^|\s)error:|Error:|^cheers \w+: ", re.I)


def blocks(kind: str | None = None) -> list[tuple[str, str, list[str]]]:
    """``(kind, first line, commands)`` of each README ``bash`` block (continuations joined,
    comments dropped), in order."""
    out = []
    for lang, body in FENCE.findall(README.read_text()):
        if lang != "bash":
            continue
        first = body.splitlines()[0]
        found = next((v for k, v in KINDS.items() if first.startswith(k)), None)
        joined = re.sub(r"\\\n\s*", " ", body)
        commands = [line.strip() for line in joined.splitlines()]
        commands = [c for c in commands if c and not c.startswith("#")]
        commands = [_strip_comment(c) for c in commands]
        if kind is None or found == kind:
            out.append((found, first, commands))
    return out


def _strip_comment(command: str) -> str:
    """``command`` without a trailing `` # ...`` comment (one outside quotes)."""
    quote = None
    for i, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and i > 0 and command[i - 1] == " ":
            return command[:i].rstrip()
    return command


def python_blocks() -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == "python"]


def run_cheers(command: str, cwd: Path) -> tuple[int, str]:
    """``.venv/bin/cheers ...`` in this process: ``(exit code, stdout + stderr)``."""
    argv = [os.path.expanduser(a) for a in shlex.split(command)[1:]]
    buf = io.StringIO()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                code = cheers(argv) or 0
            except SystemExit as err:
                code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
                if not isinstance(err.code, int) and err.code is not None:
                    buf.write(f"{err.code}\n")
            except Exception as err:  # a traceback a user would see
                code = 1
                buf.write(f"Traceback (most recent call last):\n{type(err).__name__}: {err}\n")
    finally:
        os.chdir(old)
    return code, buf.getvalue()


def make_recipe(command: str, cwd: Path) -> list[str]:
    """The commands ``command`` (a ``make`` line) would run (``make -n``; ``-o``: the set-up stamp
    counts as made, so nothing is re-installed from a linked folder)."""
    dry = run_shell(re.sub(r"^make ", "make -n --no-print-directory -o .venv/.installed ", command), cwd, 60)[
        1
    ]
    # under `make test` the inner make is recursive: drop its "make[1]: Entering directory" lines
    return [line.strip() for line in dry.splitlines() if line.strip() and not line.startswith("make")]


def run_command(command: str, cwd: Path) -> tuple[int, str]:
    """A README command: ``.venv/bin/cheers`` in this process; a ``make`` line as the recipe lines
    it would run, the ``cheers`` ones in this process too (stopping at the first failure)."""
    if command.startswith(".venv/bin/cheers "):
        return run_cheers(command, cwd)
    if not command.startswith("make "):
        return run_shell(command, cwd, 300)
    out = ""
    for line in make_recipe(command, cwd):
        in_process = line.startswith(".venv/bin/cheers ")  # no variables set before it
        code, text = run_cheers(line, cwd) if in_process else run_shell(line, cwd, 300)
        out += text
        if code != 0:
            return code, out
    return 0, out


def run_shell(command: str, cwd: Path, timeout: float) -> tuple[int, str]:
    drop = ("PYTEST", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")  # a fresh shell, not a sub-make of make test
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["CHEERS_NUM_THREADS"] = "1"
    proc = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, proc.stdout + proc.stderr


def workdir(tmp_path: Path) -> Path:
    """A folder that looks like the repository root (the sources linked, no runs, data or weights)."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in (
        "experiments",
        "Makefile",
        ".venv",
        "cheers_pl",
        "data_recipes",
        "benchmarks",
        "pyproject.toml",
    ):
        (root / name).symlink_to(REPO / name)
    for name in ("requirements.txt", "requirements-deepspeed.txt"):
        (root / name).symlink_to(REPO / name)
    return root


def test_every_shell_block_says_what_it_needs():
    found = blocks()
    assert len(found) >= 10
    untagged = [first for kind, first, _ in found if kind is None]
    assert not untagged, f"README bash blocks without a known first-line tag {list(KINDS)}: {untagged}"


def test_commands_use_the_kit_prefix():
    bare = [
        c
        for _, _, commands in blocks()
        for c in commands
        if re.match(r"(cheers|python|python3|pip|pytest|tensorboard)\s", c)
    ]
    assert not bare, f"README commands without .venv/bin/: {bare}"


def test_seconds_blocks_run(tmp_path):
    root = workdir(tmp_path)
    commands = [c for _, _, cs in blocks("seconds") for c in cs]
    assert any("--print_config" in c for c in commands) and any("smoke" in c for c in commands)
    for command in commands:
        assert command.startswith(".venv/bin/cheers "), command  # the rest would need a shell here
        code, out = run_cheers(command, root)
        assert code == 0, f"{command}\n{out[-3000:]}"
    assert (root / "image.png").is_file()  # cheers smoke --out image.png


def test_the_python_snippet_runs(tmp_path):
    (snippet,) = python_blocks()
    code = compile(snippet, "README.md (python block)", "exec")
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the README's own snippet
    assert isinstance(scope["answers"], list) and len(scope["answers"]) == 1
    assert tuple(scope["images"].shape) == (1, 3, 32, 32)


def test_weights_commands_stop_in_one_clear_line(tmp_path):
    """Also the kit's own commands of the GPU blocks (not srun / torchrun / ``python -c``): on this
    machine, without weights, each must stop the same way."""
    root = workdir(tmp_path)
    commands = [c for _, _, cs in blocks("weights") for c in cs]
    assert len(commands) >= 8
    kit = (".venv/bin/cheers ", ".venv/bin/python -m cheers_pl")
    gpu = [c for _, _, cs in blocks("gpu") for c in cs if c.startswith(kit)]
    assert len(gpu) >= 5
    commands += gpu
    for command in commands:
        code, out = run_command(command, root)
        lines = [line for line in out.splitlines() if not line.startswith("make: ***")]
        errors = [line for line in lines if ERROR_LINE.search(line)]
        assert code != 0, f"{command} succeeded without weights:\n{out[-2000:]}"
        assert "Traceback" not in out, f"{command} ended in a traceback:\n{out[-3000:]}"
        assert len(errors) == 1, f"{command}: expected one error line, got {errors}\n{out[-2000:]}"


@pytest.mark.readme
def test_minutes_and_after_demo_blocks_run_in_a_fresh_copy():
    """``make readme-check``: the long blocks, in README order, in a copy of the tracked files.

    The copy is not under pytest's ``tmp_path``: another pytest session started meanwhile (the
    suite, say) prunes older ``tmp_path`` folders, and did so under a running ``make bench``."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="cheers-readme-check-")) / "clone"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / ".venv").symlink_to(REPO / ".venv")
    ran = []
    for kind, first, commands in blocks():
        if kind not in ("minutes", "after-demo", "seconds"):
            continue
        for command in commands:
            if command == "make test":
                continue  # the suite that runs this test
            # the clone's copied requirements are newer than the linked .venv's set-up stamp: -o keeps
            # make from re-installing the kit from this temporary copy
            code, out = run_shell(re.sub(r"^make ", "make -o .venv/.installed ", command), root, 3600)
            assert code == 0, f"{first}: {command}\n{out[-4000:]}"
            ran.append(command)
    print("\n".join(ran), file=sys.stderr)
    assert any(c.startswith("make demo") for c in ran)
    shutil.rmtree(root.parent)  # kept when a block failed, to look at
