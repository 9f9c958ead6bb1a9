"""Render a testbed report in headless Chromium (Debian's ``chromium``): a screenshot for people, and
a structural check of the DOM the browser built (not of our HTML text).

Usage: python .ci/render_report.py REPORT_DIR ARTIFACT_DIR

Checks, on the browser's DOM: the first table is the headline table, with a header row starting
``method`` and one row per method of ``headline.json``; no cell shows Markdown syntax (backticks,
``---`` separator cells, ``|``); no ``nan``. Writes ARTIFACT_DIR/testbed_report.png and
ARTIFACT_DIR/testbed_report.dom.html. Exit 1 with one line on a failed check.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

# the flags this machine kind needs: no sandbox as root, and no background connections (the
# network is closed; Chromium otherwise retries Google's hosts at every start)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


class Tables(HTMLParser):
    """Every table's rows as lists of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append(self.cell.strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def chromium(*args: str, profile: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        sys.exit("render_report: no chromium on PATH (apt-get install chromium)")
    return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)


def main(report_dir: str, artifact_dir: str) -> int:
    report, out = Path(report_dir).resolve(), Path(artifact_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = (report / "report.html").as_uri()
    methods = [r["method"] for r in json.loads((report / "headline.json").read_text())["headline"]]
    with tempfile.TemporaryDirectory() as profile:
        dom = chromium("--dump-dom", page, profile=profile)
        if dom.returncode != 0 or "<table" not in dom.stdout:
            print(f"render_report: chromium --dump-dom failed ({dom.returncode}): {dom.stderr.strip()[-300:]}")
            return 1
        (out / "testbed_report.dom.html").write_text(dom.stdout, encoding="utf-8")
        shot = chromium("--window-size=1600,2400", f"--screenshot={(out / 'testbed_report.png').resolve()}", page,
                        profile=profile)
    if shot.returncode != 0 or not (out / "testbed_report.png").is_file():
        print(f"render_report: chromium --screenshot failed ({shot.returncode}): {shot.stderr.strip()[-300:]}")
        return 1
    tables = Tables()
    tables.feed(dom.stdout)
    if not tables.tables:
        print("render_report: the browser's DOM has no table")
        return 1
    rows = tables.tables[0]
    got = [r[0] for r in rows[1:]]
    problems = []
    if not rows or rows[0][:1] != ["method"]:
        problems.append(f"the first table's header is {rows[0][:3] if rows else []}, not the headline table's")
    if got != methods:
        problems.append(f"headline rows {got} != the methods {methods}")
    bad = [c for t in tables.tables for r in t for c in r if "`" in c or c.startswith("---") or "|" in c or "nan" in c.split()]
    if bad:
        problems.append(f"cells showing Markdown syntax or nan: {bad[:3]}")
    if problems:
        print("render_report: " + "; ".join(problems))
        return 1
    print(f"render_report: {len(methods)} headline rows render in Chromium; screenshot {out / 'testbed_report.png'} "
          f"({(out / 'testbed_report.png').stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
