"""Fault cases of the recipes and the inference commands (issue 14, items 4, 9 and 10)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.faults.case import REPO, Case, Outcome, cheers, last_line


def _chat(image: str, sample_id: str) -> dict:
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]
    return {"id": sample_id, "image": image, "conversations": turns}


def _png(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (200, 30, 30)).save(path)
    return path


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# -- item 4: recipes -----------------------------------------------------------------------------
def bad_paths(tmp: Path) -> Outcome:
    """Records whose image path is a symlink loop, holds a NUL byte or is too long, and a good one."""
    root = tmp / "images"
    _png(root / "ok.png")
    (root / "loop").symlink_to("loop")
    paths = ["loop/x.png", "a\x00b.png", "x" * 300 + ".png", "d/" * 3000 + "x.png", "ok.png"]
    src = tmp / "data.jsonl"
    src.write_text("".join(json.dumps(_chat(p, f"r{i}")) + "\n" for i, p in enumerate(paths)))
    r = cheers(["data", "llava", str(src), "--image-root", str(root), "--out", str(tmp / "out")])
    if r.rc != 0:
        return Outcome(False, f"rc {r.rc}: {last_line(r.text)}")
    m = _manifest(tmp / "out")
    return Outcome(
        m["samples"] == 1 and m["skipped"] == {"bad_path": 4}, " / ".join(r.out.strip().splitlines()[:2])
    )


def non_utf8(tmp: Path) -> Outcome:
    """A JSONL line and a CSV row with bytes that are not UTF-8."""
    _png(tmp / "ok.png")
    good = json.dumps(_chat("ok.png", "ok")).encode()
    (tmp / "data.jsonl").write_bytes(good.replace(b"Noise.", b"No\xffise.") + b"\n" + good + b"\n")
    (tmp / "pairs.csv").write_bytes(b"image,caption\nok.png,caf\xe9\nok.png,a red square\n")
    r1 = cheers(["data", "llava", str(tmp / "data.jsonl"), "--out", str(tmp / "a")])
    r2 = cheers(["data", "captions", str(tmp / "pairs.csv"), "--mode", "t2i", "--out", str(tmp / "b")])
    if r1.rc or r2.rc:
        return Outcome(False, f"rc {r1.rc}/{r2.rc}: {last_line(r1.text if r1.rc else r2.text)}")
    named = [e["id"] for out in ("a", "b") for e in _manifest(tmp / out)["skipped_examples"]]
    ok = named == ["data.jsonl:1", "pairs.csv:2"] and all(_manifest(tmp / o)["samples"] == 1 for o in "ab")
    return Outcome(ok, f"1 written, 1 skipped each: bad_encoding at {', '.join(named)}")


def killed_then_rerun(tmp: Path) -> Outcome:
    """SIGKILL a recipe once it has written a shard; the rerun without --overwrite must succeed."""
    src = tmp / "chats.jsonl"
    turn = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]
    with open(src, "w") as f:
        for i in range(200_000):
            f.write(json.dumps({"id": f"t{i}", "messages": turn}) + "\n")
    out = tmp / "out"
    env = {**os.environ, "CHEERS_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "cheers_pl",
        "data",
        "text",
        str(src),
        "--out",
        str(out),
        "--maxcount",
        "100",
    ]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "shard-000002.tar").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    left = sorted(x.name for x in out.iterdir()) if out.is_dir() else []
    if "manifest.json" in left or not any(n.endswith(".tar") for n in left):
        return Outcome(False, f"the kill did not land mid-run (left {left[:4]})")
    src.write_text("".join(json.dumps({"id": f"s{i}", "messages": turn}) + "\n" for i in range(3)))
    r = cheers(["data", "text", str(src), "--out", str(out)])
    if r.rc != 0:
        return Outcome(False, f"rerun rc {r.rc}: {last_line(r.text)}")
    rest = sorted(x.name for x in out.iterdir())
    detail = f"killed with {len(left) - 1} shards; rerun: {r.out.strip().splitlines()[0]}; folder now {rest}"
    return Outcome(rest == ["manifest.json", "shard-000000.tar"], detail)


def prefix_escape(tmp: Path) -> Outcome:
    """``--prefix ../x`` would write shards outside --out."""
    src = tmp / "in.jsonl"
    src.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    )
    r = cheers(["data", "text", str(src), "--out", str(tmp / "out" / "o"), "--prefix", "../x"])
    escaped = list((tmp / "out").glob("x-*.tar"))
    return Outcome(r.rc == 2 and "--prefix" in last_line(r.err) and not escaped, last_line(r.err))


def recipe_out_is_file(tmp: Path) -> Outcome:
    (tmp / "file").write_text("")
    r = cheers(["data", "text", str(tmp / "in.jsonl"), "--out", str(tmp / "file")])
    return Outcome(r.rc == 2 and "Traceback" not in r.text and "--out" in last_line(r.err), last_line(r.err))


# -- item 9: sampler numbers -----------------------------------------------------------------------
def bad_number(command: str, option: str, value: str, extra: list[str]):
    def run(tmp: Path) -> Outcome:
        args = [
            command,
            "--model",
            str(tmp / "model.ckpt"),
            "--out",
            str(tmp / "o"),
            *extra,
            f"{option}={value}",
        ]
        r = cheers(args)
        line = last_line(r.err)
        return Outcome(r.rc == 2 and f"argument {option}" in line and ("[" in line or "(" in line), line)

    return run


# -- item 10: --out folders, overwriting, the demo VAE path ---------------------------------------
def out_is_file(tmp: Path) -> Outcome:
    """--out naming a file, for generate, answer, edit and export."""
    (tmp / "file").write_text("")
    _png(tmp / "a.png")
    runs = {
        "generate": ["generate", "--prompt", "a cat"],
        "answer": ["answer", "--image", str(tmp / "a.png"), "--question", "?"],
        "edit": ["edit", "--image", str(tmp / "a.png"), "--instruction", "x"],
    }
    lines, ok = [], True
    for args in runs.values():
        r = cheers([*args, "--model", str(tmp / "m.ckpt"), "--out", str(tmp / "file")])
        ok &= r.rc == 2 and "Traceback" not in r.text and "is a file" in last_line(r.err)
        lines.append(last_line(r.err))
    r = cheers(["export", str(tmp / "m.ckpt"), "--out", str(tmp / "file")])
    ok &= r.rc == 2 and "Traceback" not in r.text and "is a file" in last_line(r.err)
    return Outcome(ok, lines[0] if ok else " / ".join([*lines, last_line(r.err)]))


def _tiny_export(tmp: Path) -> Path:
    from cheers_pl.io.export import export_model
    from tests.helpers import tiny_random_model

    return export_model(tiny_random_model(), tmp / "model")


def answer_twice(tmp: Path) -> Outcome:
    """A second ``cheers answer`` into the same --out."""
    model, image = _tiny_export(tmp), _png(tmp / "a.png")
    args = ["answer", "--model", str(model), "--image", str(image), "--question", "What?"]
    args += ["--max-new-tokens", "2", "--device", "cpu", "--out", str(tmp / "o")]
    first = cheers(args)
    if first.rc != 0:
        return Outcome(False, f"first run rc {first.rc}: {last_line(first.text)}")
    before = (tmp / "o" / "answers.jsonl").read_text()
    second = cheers(args)
    line = last_line(second.err)
    kept = (tmp / "o" / "answers.jsonl").read_text() == before
    return Outcome(second.rc == 2 and "answers.jsonl" in line and "--overwrite" in line and kept, line)


def demo_vae_relative(tmp: Path) -> Outcome:
    """Fit the demo VAE with a relative --out as ``cheers demo`` does, then load its path from elsewhere."""
    small = ["--digits", "20", "--texts", "2", "--reading", "0", "--heldout-reading", "0", "--no-judge"]
    r = cheers(["data", "demo", "--out", str(tmp / "data"), *small])
    if r.rc != 0:
        return Outcome(False, f"demo data rc {r.rc}: {last_line(r.text)}")
    (tmp / "run").mkdir()
    code = (
        "import json, sys; from pathlib import Path; from cheers_pl.demo import _overlay; "
        "from cheers_pl.demo_vae import fit_and_save; "
        f"vae = Path(fit_and_save([{str(tmp / 'data' / 'understanding')!r}], 'runs/demo/vae', "
        "steps=2, limit=4, batch_size=4, progress=False)); "
        "o = json.loads(_overlay(Path('runs/demo'), vae, 10, 'o').read_text()); "
        "print(o['model']['init_args']['spec']['vae']['path'])"
    )
    env = {**os.environ, "CHEERS_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp / "run", capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return Outcome(False, f"fit rc {p.returncode}: {last_line(p.stderr)}")
    stored = p.stdout.strip().splitlines()[-1]
    load = "import sys; from cheers_pl import registry; registry.build('vae', 'pretrained', path=sys.argv[1])"
    q = subprocess.run([sys.executable, "-c", load, stored], cwd=tmp, capture_output=True, text=True, env=env)
    loads = "yes" if q.returncode == 0 else last_line(q.stderr)
    return Outcome(
        os.path.isabs(stored) and q.returncode == 0, f"vae.path stored as {stored}; loads elsewhere: {loads}"
    )


IMG = ["--image", "a.png"]
CASES: list[Case] = [
    Case("recipe-bad-paths", 4, "image paths: symlink loop, NUL byte, over-long name and path",
         "skip and count each as bad_path, write the rest", bad_paths),
    Case("recipe-non-utf8", 4, "non-UTF-8 bytes in a JSONL line and a CSV row",
         "skip and count as bad_encoding, named file:line", non_utf8),
    Case("recipe-killed-rerun", 4, "SIGKILL a recipe after 2 shards, rerun without --overwrite",
         "the rerun replaces the interrupted output", killed_then_rerun),
    Case("recipe-prefix-escape", 4, "`--prefix ../x`", "refused at parse time, nothing written",
         prefix_escape),
    Case("recipe-out-file", 10, "recipe `--out` is a file", "one line, rc 2", recipe_out_is_file),
    Case("generate-cfg-nan", 9, "`cheers generate --cfg nan`", "refused at parse time naming the range",
         bad_number("generate", "--cfg", "nan", ["--prompt", "a cat"])),
    Case("generate-shift-inf", 9, "`cheers generate --shift inf`", "refused at parse time naming the range",
         bad_number("generate", "--shift", "inf", ["--prompt", "a cat"])),
    Case("edit-t0-nan", 9, "`cheers edit --t0 nan`", "refused at parse time naming the range",
         bad_number("edit", "--t0", "nan", [*IMG, "--instruction", "x"])),
    Case("answer-top-p-nan", 9, "`cheers answer --top-p nan`", "refused at parse time naming the range",
         bad_number("answer", "--top-p", "nan", [*IMG, "--question", "?"])),
    Case("out-is-file", 10, "`--out` a file: generate, answer, edit, export", "one line, rc 2, no traceback",
         out_is_file),
    Case("answer-twice", 10, "a second `cheers answer` into the same --out",
         "refused naming answers.jsonl and --overwrite; the first answers kept", answer_twice),
    Case("demo-vae-path", 10, "demo VAE fitted under a relative --out", "stored absolute, loads from any cwd",
         demo_vae_relative),
]  # fmt: skip
