"""Review a finished smoke sweep in MLflow's UI, in a real browser, as a new user would (issue 14).

    python bench/ui_check.py                      # runs `python sweeps/temperature.py --smoke` in a temp dir
    python bench/ui_check.py --store DIR          # a finished smoke sweep's folder, holding mlflow.db
    python bench/ui_check.py --out docs/          # where the screenshots go (default: docs/)

Starts `mlflow server` on 127.0.0.1 (a free port) over that SQLite store and drives headless
Chromium (Debian's `chromium` package: `apt-get install chromium`) through the DevTools protocol
on a pipe, so it needs no Python package beyond the project's. For each page it waits until the
page shows what a reviewer must see, then saves a screenshot:

  ui_runs.png        the run list the sweep prints the URL of (machine-learning view), the sweep
                     run expanded: every trial must be listed, and the teachers sit in one row
  ui_sweep_run.png   the sweep run's page: its description must show the answer (the headline
                     "Best setting", the table with its baseline row)
  ui_trial.png       one trial's page: its name and its test metrics

Exit code 0 when every check passes; 1 when one fails (each failure is one line on stderr, and
the screenshots are still written, to show what the page held); 2 when it cannot run (no
Chromium, no such store, the sweep failed). It runs on demand, not in CI: it needs a browser.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import io
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "sall-temperature"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WIDTH, HEIGHT = 1400, 860
WAIT_S = 60  # for a page to show what it must (the first load compiles MLflow's bundle)


class CheckError(Exception):
    """The check cannot run at all (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# the browser: Chromium's DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out)
class Browser:
    """One headless Chromium with one page, driven by DevTools messages (JSON, NUL-separated)."""

    def __init__(self, exe: str, profile: str) -> None:
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()

        def child_fds() -> None:  # the protocol's fixed fds; F_DUPFD first so none is clobbered
            a, b = fcntl.fcntl(to_chrome, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [
                exe,
                "--headless",
                "--remote-debugging-pipe",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={WIDTH},{HEIGHT}",
                "about:blank",
            ],
            pass_fds=(3, 4),
            preexec_fn=child_fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self._id, self._buf, self.session = 0, b"", None
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30) -> dict:
        """Send one command (to the page once attached) and return its result, skipping events."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise CheckError(f"Chromium: {method} failed: {reply['error'].get('message')}")
                return reply.get("result", {})

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._in], [], [], max(0.0, deadline - time.time()))
            chunk = os.read(self._in, 1 << 20) if ready else b""
            if not chunk:
                raise CheckError("Chromium stopped answering (no reply within the time limit)")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def js(self, expression: str) -> Any:
        return (
            self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
            .get("result", {})
            .get("value")
        )

    def open(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def wait_for(self, expression: str, timeout: float = WAIT_S) -> bool:
        """Poll a JavaScript condition until it holds (True) or time runs out (False)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.js(expression):
                return True
            time.sleep(0.5)
        return False

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, path: Path) -> None:
        """A PNG of the viewport, reduced to 64 colours (a tenth of the bytes; text stays sharp)."""
        from PIL import Image

        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB").quantize(colors=64).save(path, optimize=True)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (CheckError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def contains_all(words: list[str]) -> str:
    """A JavaScript condition: the page's text holds every word."""
    return " && ".join(f"document.body && document.body.innerText.includes({json.dumps(w)})" for w in words)


# ---------------------------------------------------------------------------------------------
# the store and the server
def smoke_sweep(workdir: Path) -> Path:
    """Run the smoke temperature sweep into `workdir` as a user would; its folder."""
    cmd = [
        sys.executable,
        str(ROOT / "sweeps" / "temperature.py"),
        "--smoke",
        "--mlflow-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--storage-path",
        str(workdir / "ray"),
        "--cache-dir",
        str(workdir / "cache"),
    ]
    print(f"[ui] running {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if out.returncode != 0:
        raise CheckError(f"the smoke sweep failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    return workdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: Path, port: int, log: Path) -> subprocess.Popen:
    """`mlflow server` on loopback over the store, once it answers /health."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise CheckError(f"mlflow server did not start on 127.0.0.1:{port} (see {log})")


def sweep_runs(uri: str) -> tuple[str, Any, list]:
    """(experiment id, the sweep run, its trial runs) of the smoke temperature sweep."""
    from tracking import client as tr
    from tracking import schema as sc

    exp = tr.client(uri).get_experiment_by_name(EXPERIMENT)
    if exp is None:
        raise CheckError(f"no experiment '{EXPERIMENT}' in {uri}; expected a finished `sweeps/temperature.py --smoke`")
    runs = tr.find_runs(uri, exp.experiment_id, "")
    sweeps = sorted(
        (r for r in runs if r.data.tags.get(sc.TAG_STAGE) == sc.STAGE_SWEEP), key=lambda r: -r.info.start_time
    )
    if not sweeps:
        raise CheckError(f"experiment '{EXPERIMENT}' in {uri} has no sweep run")
    parent = sweeps[0]
    trials = [
        r
        for r in runs
        if r.data.tags.get(sc.TAG_PARENT) == parent.info.run_id and r.data.tags.get(sc.TAG_STAGE) == sc.STAGE_STUDENT
    ]
    return exp.experiment_id, parent, sorted(trials, key=lambda r: r.info.run_name)


# ---------------------------------------------------------------------------------------------
# the checks
def check_pages(browser: Browser, base: str, exp_id: str, parent: Any, trials: list, out: Path) -> list[str]:
    """Visit the three pages, screenshot each; the failures, one line each."""
    failures: list[str] = []
    names = [t.info.run_name for t in trials]
    browser.open(f"{base}/#/experiments/{exp_id}?workflowType=machine_learning")
    if not browser.wait_for(contains_all([parent.info.run_name])):
        failures.append(f"run list: the sweep run '{parent.info.run_name}' is not listed")
    browser.js('document.querySelector(\'button[aria-label="Close"][data-component-id*="assistant"]\')?.click()')
    browser.js("document.querySelector('button[data-component-id*=\"runnamecellrenderer\"]')?.click()")  # expand
    if not browser.wait_for(contains_all(names), timeout=20):
        missing = [n for n in names if n not in browser.text()]
        failures.append(f"run list: trial(s) {', '.join(missing)} not listed under the sweep run")
    if "teacher dr fold0" in browser.text() or "teachers" not in browser.text():
        failures.append("run list: teacher runs are listed among the trials (expected them under one 'teachers' row)")
    browser.screenshot(out / "ui_runs.png")

    browser.open(f"{base}/#/experiments/{exp_id}/runs/{parent.info.run_id}")
    answer = ["Best setting", "baseline", "Table IV"]
    if not browser.wait_for(contains_all(answer)):
        failures.append(
            f"sweep run page: the description does not show {answer} (page starts: {browser.text()[:160]!r})"
        )
    browser.js("[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Show more')?.click()")
    time.sleep(1)
    browser.screenshot(out / "ui_sweep_run.png")

    trial = next((t for t in trials if t.info.run_name.startswith("T=")), trials[0] if trials else None)
    if trial is not None:
        browser.open(f"{base}/#/experiments/{exp_id}/runs/{trial.info.run_id}")
        if not browser.wait_for(contains_all([trial.info.run_name, "test/dr/acc"])):
            failures.append(f"trial page: '{trial.info.run_name}' or its metric test/dr/acc is not shown")
        browser.screenshot(out / "ui_trial.png")
    return failures


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise CheckError(
        f"no Chromium found (looked for {', '.join(BROWSERS)}); expected Debian's package: apt-get install chromium"
    )


def run(args: argparse.Namespace) -> int:
    exe = find_browser()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ui-check-") as tmp:
        work = Path(args.store).resolve() if args.store else smoke_sweep(Path(tmp))
        db = work / "mlflow.db"
        if not db.is_file():
            raise CheckError(f"--store {work}: no mlflow.db there; expected a finished smoke sweep's folder")
        exp_id, parent, trials = sweep_runs(f"sqlite:///{db}")
        port = free_port()
        server = start_server(db, port, Path(tmp) / "server.log")
        browser = None
        try:
            browser = Browser(exe, str(Path(tmp) / "profile"))
            failures = check_pages(browser, f"http://127.0.0.1:{port}", exp_id, parent, trials, out)
        finally:
            if browser is not None:
                browser.close()
            server.terminate()
            server.wait(timeout=30)
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    shots = ", ".join(str(out / n) for n in ("ui_runs.png", "ui_sweep_run.png", "ui_trial.png"))
    print(f"[ui] {'ok' if not failures else f'{len(failures)} check(s) failed'}; screenshots: {shots}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python bench/ui_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--store",
        default=None,
        help="a finished smoke sweep's folder (holding mlflow.db); default: run one in a temporary folder",
    )
    p.add_argument("--out", default=str(ROOT / "docs"), help="folder for the screenshots")
    args = p.parse_args(argv)
    try:
        return run(args)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
