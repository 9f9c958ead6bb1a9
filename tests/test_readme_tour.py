"""README's "Quick tour of the CLI", run as written: every line of its bash block, in order, in one
scratch directory, so a README line that stops working fails here.

The placeholders are plain relative names (M, D, O, ...), so most lines run verbatim in the
scratch directory. What the tour does not build itself is made first: a tiny PickScore ``P``,
``prompts.txt`` with two prompts, two images in ``IMGS``, ``pairs.parquet`` / ``in.parquet`` and, for
``compare``, the LoRA-free ``E_base`` (the README's own ``eval`` line without ``--lora``; ``E_dpo`` is
that line's output ``E``). Sizes are cut only where a default would take minutes on a CPU.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# subcommand -> why this test does not run it
SKIPPED = {
    "testbed-compare": "the main job (minutes of CPU even at --budget quick); run from the wheel by "
                       ".ci/wheel_check.sh and in-process by tests/test_eval_testbed.py",
    "testbed-base": "retrains the shipped testbed base (~30 min)",
}
# subcommand -> arguments appended to cut a CPU-minutes default down to seconds (argparse and the
# key=value overrides both let a later value win, so the README's own arguments stay untouched)
TINY = {
    "demo": ["--steps", "2"],
    "eval": ["--steps", "2", "--seeds", "1"],
}
# placeholders renamed for one subcommand: the tour reuses D (toy data) as demo's output folder,
# and compares E_base with E_dpo where its eval line wrote E
RENAME = {
    "demo": {"D": "DEMO"},
    "compare": {"E_dpo": "E"},
}


def tour_lines() -> list[str]:
    text = README.read_text(encoding="utf-8")
    assert "## Quick tour of the CLI" in text, "README lost its '## Quick tour of the CLI' section"
    section = text.split("## Quick tour of the CLI", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no ```bash block under '## Quick tour of the CLI'"
    lines = [line.strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _argv(line: str) -> list[str]:
    words = shlex.split(line, comments=True)
    assert words[0] == "diffalign", f"tour line does not start with 'diffalign': {line}"
    return words[1:]


def _rename(argv: list[str], names: dict[str, str]) -> list[str]:
    out = []
    for word in argv:
        key, eq, value = word.rpartition("=")
        if eq and value in names:  # model=M, pickscore=P
            out.append(f"{key}={names[value]}")
        else:
            out.append(names.get(word, word))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_b64(size: int = 32) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _serve_once(argv: list[str]) -> str:
    """Start the server on a free loopback port, score one image over HTTP, stop it."""
    argv = list(argv)
    if "--port" in argv:
        argv[argv.index("--port") + 1] = str(_free_port())
    else:
        argv += ["--port", str(_free_port())]
    proc = subprocess.Popen([sys.executable, "-m", "diffalign.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        url = None
        while url is None:
            line = proc.stdout.readline()
            if not line:
                return f"exited with {proc.wait()} before serving"
            m = re.search(r"(http://\S+?)(?=[\s(]|$)", line)
            if "serving" in line and m:
                url = m.group(1).rstrip("/")
            if time.monotonic() > deadline:
                return "did not start serving within 180 s"
        # keep reading its output so a chatty server never blocks on a full pipe
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        body = json.dumps({"images": [_png_b64()], "prompts": ["a red square"]}).encode()
        req = urllib.request.Request(url + "/score", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            reply = json.loads(resp.read())
        if resp.status != 200 or len(reply.get("scores", [])) != 1:
            return f"/score answered {resp.status}: {reply}"
        return "ok"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _build_fixtures(main) -> None:
    from PIL import Image

    from diffalign.data.toy import write_toy_pickapic

    assert main(["tiny-model", "pickscore", "P"]) == 0
    Path("prompts.txt").write_text("a red circle on a blue background\na green square\n")
    Path("IMGS").mkdir()
    for i, color in enumerate([(220, 30, 30), (30, 200, 60)]):
        Image.new("RGB", (32, 32), color).save(f"IMGS/{i}.png")
    pairs = write_toy_pickapic("pairs_src", n=8, size=32, seed=3)
    shutil.copy(pairs, "pairs.parquet")
    shutil.copy(pairs, "in.parquet")


def _run_line(main, line: str, lines: list[str]) -> str:
    argv = _argv(line)
    command = argv[0]
    if command in SKIPPED:
        return "skip: " + SKIPPED[command]
    argv = _rename(argv, RENAME.get(command, {})) + TINY.get(command, [])
    if command == "serve-reward":
        return _serve_once(argv)
    if command == "compare" and not Path("E_base").exists():
        # the baseline the tour compares against: its own eval line without the LoRA
        eval_lines = [ln for ln in lines if _argv(ln)[0] == "eval"]
        if not eval_lines:
            return "fail: the tour has no eval line to build E_base from"
        base = _argv(eval_lines[0]) + TINY["eval"]
        if "--lora" in base:
            i = base.index("--lora")
            del base[i:i + 2]
        base[base.index("--out") + 1] = "E_base"
        if main(base) != 0:
            return "fail: building E_base from the eval line failed"
    rc = main(argv)
    return "ok" if rc == 0 else f"fail: exit code {rc}"


@pytest.fixture(scope="module")
def tour_results(tmp_path_factory) -> dict[str, str]:
    """Every tour line's outcome: 'ok', 'skip: why' or 'fail: why' (lines run in README order)."""
    from diffalign.cli import main

    lines = tour_lines()
    work = tmp_path_factory.mktemp("tour")
    cwd = os.getcwd()
    os.chdir(work)
    results = {}
    try:
        _build_fixtures(main)
        for line in lines:
            try:
                results[line] = _run_line(main, line, lines)
            except SystemExit as e:  # argparse rejected the line
                results[line] = f"fail: exited {e.code} (bad arguments)"
            except Exception:
                results[line] = "fail: " + traceback.format_exc(limit=-3)
    finally:
        os.chdir(cwd)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("line", tour_lines(), ids=lambda line: " ".join(_argv(line)[:2]))
def test_tour_line_runs_as_written(line, tour_results):
    result = tour_results[line]
    if result.startswith("skip: "):
        pytest.skip(result[len("skip: "):])
    assert result == "ok", f"README tour line failed:\n  {line}\n{result}"


def test_tour_covers_the_main_verbs():
    # a README edit that drops the block or a verb is caught even without running anything
    commands = {_argv(line)[0] for line in tour_lines()}
    assert {"tiny-model", "toy-data", "train", "eval", "compare", "score"} <= commands
