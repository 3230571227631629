"""The curl walkthrough in example_app/README.md, run as printed against a real ``python -m example_app``.

The README's ```bash blocks are parsed: every command line that calls ``curl``
is run in order with bash (``$BASE`` and ``$TOKENGATE_ADMIN_TOKEN`` exported,
``<token_id>`` / ``<quarantine_id>`` replaced by the id from the most recent
answer that printed one, as the README tells readers to do). Each answer must
be a 2xx, unless the line ends with a comment ``# → NNN``; then it must be NNN.

With ``curl`` installed, bash runs the real curl (wrapped to report each HTTP
status). Without it, bash still expands the line, but ``curl`` is a shell
function that prints its arguments, and the requests are replayed with httpx:
the walkthrough is never skipped.

This directory has no ``__init__.py`` on purpose (see ``tests/fastapi/conftest.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from example_app.app import create_app
from server_process import free_port, python_path_with, server_process

REPO = Path(__file__).resolve().parents[2]
README = REPO / "example_app" / "README.md"
ADMIN_TOKEN = "curl-walkthrough-token-0123456789"
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
WALKTHROUGH_BUDGET = 60.0  # seconds for the whole walkthrough, server start included
PLACEHOLDERS = ("token_id", "quarantine_id")
_EXPECT = re.compile(r"#\s*→\s*(\d{3})\s*$")
_STATUS_MARK = "@@status="
# Shell prelude of the "curl" mode: the real curl, plus one status line per request.
_CURL_PRELUDE = ("curl() { command curl \"$@\" --silent --show-error --max-time 30 "
                 f"--write-out '\\n{_STATUS_MARK}%{{http_code}}\\n'; }}\n")
# Shell prelude of the "httpx" mode: bash expands the line; curl only prints its arguments.
_ARGV_END = "@@end-of-curl@@"
_ARGV_PRELUDE = f"curl() {{ printf '%s\\0' \"$@\" '{_ARGV_END}'; }}\n"


@dataclass
class Command:
    """One README command line and the status its comment promises (None: any 2xx)."""

    text: str
    line: int
    expected: int | None


@dataclass
class Answer:
    """One HTTP answer a command produced."""

    status: int
    body: str


def readme_commands(text: str) -> list[Command]:
    """Every command line in the ```bash blocks that calls curl, in order (continuations joined)."""
    commands: list[Command] = []
    in_bash = False
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            in_bash = stripped == "```bash"
            pending = ""
            continue
        if not in_bash:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line, pending = pending + stripped, ""
        if not re.search(r"(^|[\s;(])curl\s", line) or line.startswith("#"):
            continue
        found = _EXPECT.search(line)
        commands.append(Command(line, start, int(found.group(1)) if found else None))
    return commands


def request_line(command: str) -> tuple[str, str]:
    """(method, path) of a README curl command, e.g. ("POST", "/tokengate/tokens/<token_id>/kill")."""
    url = re.search(r"\$BASE(/[^\"'\s?]*)", command)
    assert url is not None, f"no $BASE URL in {command!r}"
    method = re.search(r"-X\s+([A-Z]+)", command)
    if method is not None:
        return method.group(1), url.group(1)
    return ("POST" if re.search(r"\s-d\s", command) else "GET"), url.group(1)


def _route_regex(path: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{[^}]+\\\}", r"[^/]+", re.escape(path)) + "$")


# -- fast checks of the README itself ------------------------------------------------------------


def test_readme_has_a_curl_command_for_every_route() -> None:
    # Given: every route the app serves (app endpoints and the admin router), docs pages aside
    app = create_app(admin_token=ADMIN_TOKEN, quarantine_path=":memory:")
    routes = {(method.upper(), path) for path, operations in app.openapi()["paths"].items()
              for method in operations}
    # When: the README's curl commands are parsed
    commands = readme_commands(README.read_text(encoding="utf-8"))
    shown = {request_line(c.text) for c in commands}
    # Then: each route is exercised by at least one command, and every command hits a real route
    missing = sorted(f"{m} {p}" for m, p in routes
                     if not any(sm == m and _route_regex(p).match(sp) for sm, sp in shown))
    assert not missing, f"routes without a curl command in example_app/README.md: {missing}"
    unknown = sorted(f"{m} {p}" for m, p in shown
                     if not any(rm == m and _route_regex(rp).match(p) for rm, rp in routes))
    assert not unknown, f"README curl commands for routes the app does not serve: {unknown}"


def test_readme_parser_reads_expectations_and_continuations() -> None:
    text = "\n".join([
        "```bash", "make run", "curl -s \"$BASE/a\"", "curl -s \"$BASE/b\"  # → 409",
        "curl -s -X POST \\", "  \"$BASE/c\"", "# curl \"$BASE/not-a-command\"", "```",
        "```json", "curl -s \"$BASE/not-bash\"", "```",
    ])
    commands = readme_commands(text)
    assert [(request_line(c.text), c.expected, c.line) for c in commands] == [
        (("GET", "/a"), None, 3), (("GET", "/b"), 409, 4), (("POST", "/c"), None, 5)]


# -- the walkthrough against a real server ---------------------------------------------------------


@dataclass
class Walkthrough:
    """Runs README commands one by one against *base*, remembering the ids answers printed."""

    base: str
    cwd: Path
    mode: str  # "curl" or "httpx"
    deadline: float
    ids: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {**os.environ, "BASE": self.base, "TOKENGATE_ADMIN_TOKEN": ADMIN_TOKEN}

    def substitute(self, command: Command) -> str:
        text = command.text
        for name in PLACEHOLDERS:
            if f"<{name}>" in text:
                assert name in self.ids, f"README line {command.line} uses <{name}> before any answer printed one"
                text = text.replace(f"<{name}>", self.ids[name])
        return text

    def run(self, command: Command) -> list[Answer]:
        text = self.substitute(command)
        remaining = self.deadline - time.monotonic()
        assert remaining > 0, f"walkthrough exceeded {WALKTHROUGH_BUDGET} s before README line {command.line}"
        prelude = _CURL_PRELUDE if self.mode == "curl" else _ARGV_PRELUDE
        done = subprocess.run(["bash", "--noprofile", "--norc", "-c", prelude + text], cwd=self.cwd,
                              env=self.env(), capture_output=True, timeout=remaining)
        assert done.returncode == 0, (f"README line {command.line} exited {done.returncode}: {text}\n"
                                      f"{done.stderr.decode(errors='replace')}")
        answers = self._curl_answers(done.stdout) if self.mode == "curl" else self._replay(done.stdout, remaining)
        assert answers, f"README line {command.line} made no request: {text}"
        if len(answers) == 1:
            self._remember_ids(answers[0].body)
        return answers

    @staticmethod
    def _curl_answers(stdout: bytes) -> list[Answer]:
        answers: list[Answer] = []
        body: list[str] = []
        for line in stdout.decode(errors="replace").split("\n"):
            if line.startswith(_STATUS_MARK):
                answers.append(Answer(int(line[len(_STATUS_MARK):]), "\n".join(body).strip()))
                body = []
            else:
                body.append(line)
        return answers

    def _replay(self, stdout: bytes, timeout: float) -> list[Answer]:
        parts = stdout.decode(errors="replace").split("\0")
        answers: list[Answer] = []
        argv: list[str] = []
        with httpx.Client(timeout=min(timeout, 30.0)) as client:
            for part in parts:
                if part == _ARGV_END:
                    answers.append(_send(client, argv))
                    argv = []
                elif part:
                    argv.append(part)
        return answers

    def _remember_ids(self, body: str) -> None:
        try:
            data: Any = json.loads(body)
        except ValueError:
            return
        if isinstance(data, dict):
            for name in PLACEHOLDERS:
                if isinstance(data.get(name), str):
                    self.ids[name] = data[name]


_FLAGS = {"-s", "--silent", "-S", "--show-error", "-N", "--no-buffer"}
_WITH_VALUE = {"-X", "--request", "-H", "--header", "-d", "--data", "--data-raw", "-o", "--output",
               "-w", "--write-out", "-m", "--max-time"}


def _send(client: httpx.Client, argv: list[str]) -> Answer:
    """Replay one curl invocation (the options the README uses) with httpx."""
    method: str | None = None
    headers: dict[str, str] = {}
    data: str | None = None
    url: str | None = None
    args = iter(argv)
    for arg in args:
        if arg in _WITH_VALUE:
            value = next(args)
            if arg in ("-X", "--request"):
                method = value
            elif arg in ("-H", "--header"):
                name, _, header_value = value.partition(":")
                headers[name.strip()] = header_value.strip()
            elif arg in ("-d", "--data", "--data-raw"):
                data = value
        elif arg in _FLAGS or (re.fullmatch(r"-[sSN]+", arg) is not None):
            continue
        elif arg.startswith("-"):
            raise AssertionError(f"the httpx replay does not know curl option {arg!r}; teach _send() about it")
        else:
            url = arg
    assert url is not None, f"curl without a URL: {argv!r}"
    response = client.request(method or ("POST" if data is not None else "GET"), url, headers=headers,
                              content=None if data is None else data.encode())
    return Answer(response.status_code, response.text)


@pytest.fixture
def example_server(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """``python -m example_app`` on a free 127.0.0.1 port, in a temp CWD; always stopped. Yields (base, cwd, log)."""
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "TOKENGATE_ADMIN_TOKEN": ADMIN_TOKEN, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": python_path_with(REPO)}
    with server_process([sys.executable, "-m", "example_app", "--port", str(port), "--log-level", "warning"],
                        cwd=tmp_path, env=env, log=log, health_path="/tokengate/health", port=port,
                        startup_timeout=STARTUP_TIMEOUT, stop_timeout=STOP_TIMEOUT) as base:
        yield base, tmp_path, log


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["curl", "httpx"])
def test_readme_walkthrough_works_as_printed(mode: str, example_server: tuple[str, Path, Path]) -> None:
    base, cwd, log = example_server
    if mode == "curl" and shutil.which("curl") is None:
        mode = "httpx"  # never skipped: replay the same commands without curl
    # Given: a fresh server that printed its admin token and the export lines
    banner = log.read_text(errors="replace")
    assert f"admin token:   {ADMIN_TOKEN}" in banner and f"export TOKENGATE_ADMIN_TOKEN={ADMIN_TOKEN}" in banner
    walkthrough = Walkthrough(base, cwd, mode, time.monotonic() + WALKTHROUGH_BUDGET)
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert len(commands) > 40
    # When: every command runs in README order
    for command in commands:
        answers = walkthrough.run(command)
        # Then: each answers what the README says
        statuses = [a.status for a in answers]
        if command.expected is None:
            assert all(200 <= s < 300 for s in statuses), \
                f"README line {command.line} answered {statuses}: {command.text}\n{answers[-1].body[:500]}"
        else:
            assert statuses == [command.expected] * len(statuses), \
                f"README line {command.line} answered {statuses}, README says {command.expected}: {command.text}"
    # And: the quarantine database is where the README says (./example-quarantine.sqlite3 of the CWD)
    assert (cwd / "example-quarantine.sqlite3").exists()
