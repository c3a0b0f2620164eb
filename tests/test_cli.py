"""``celery results show/list/stats/cleanup/forget``: via click, and a real ``celery`` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery import Celery
from click.testing import CliRunner, Result

from celery_sqlresults.cli import results

from .conftest import ROOT, table_names, task_request
from .test_query import seed

UNREACHABLE = [
    "postgresql+psycopg://u:secret@127.0.0.1:9/x",
    "mysql+pymysql://u:secret@127.0.0.1:9/x",
]


def run(*args: str) -> Result:
    """``celery results …`` as Celery's CLI would call it, with an app that has no backend set."""
    app = Celery("cli-test", set_as_current=False)
    return CliRunner().invoke(results, list(args), obj=SimpleNamespace(app=app))


def listed(db_url: str, *args: str) -> list[str]:
    result = run("list", "--url", db_url, "--json", *args)
    assert result.exit_code == 0, result.output
    return [r["task_id"] for r in json.loads(result.stdout)]


def one_error_line(result: Result) -> str:
    """The error must be exactly one line on stderr, nothing on stdout, exit status 1."""
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def seeded(make_app: Callable[..., Celery], db_url: str) -> str:
    seed(make_app(result_extended=True), db_url)
    return db_url


def test_list_table(seeded: str) -> None:
    result = run("list", "--url", seeded)
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["TASK", "ID", "STATE", "NAME", "WORKER", "DONE", "(UTC)"]
    assert {row.split()[0] for row in rows} == {"add-new", "fail-mid", "add-old", "running"}
    failed = next(row for row in rows if row.startswith("fail-mid"))
    assert failed.split()[1:4] == ["FAILURE", "proj.fail", "w2@other"]
    assert run("list", "--url", seeded, "--name", "nothing").stdout == "no stored results match\n"


def test_list_filters_and_json(seeded: str) -> None:
    assert listed(seeded, "--state", "success,failure") == ["add-new", "fail-mid", "add-old"]
    assert listed(seeded, "--state", "failure", "--state", "STARTED") in (
        ["fail-mid", "running"],
        ["running", "fail-mid"],
    )
    assert listed(seeded, "--name", "proj.add", "--since", "1h") == ["add-new"]
    assert listed(seeded, "--name", "proj.add*", "--state", "STARTED") == ["running"]
    assert listed(seeded, "--worker", "w2@*") == ["fail-mid"]
    assert listed(seeded, "--until", "1d") == ["add-old"]
    assert listed(seeded, "--since", "1w", "--until", "30m") == ["fail-mid", "add-old"]
    assert listed(seeded, "--state", "SUCCESS", "--limit", "1") == ["add-new"]
    [record] = json.loads(run("list", "--url", seeded, "--json", "--state", "FAILURE").stdout)
    assert record["result"] == "ValueError('boom')" and record["kwargs"] == {"k": "v"}
    assert record["traceback"].endswith("ValueError: boom") and record["retries"] == 1
    assert datetime.fromisoformat(record["date_done"]).utcoffset() is not None


def test_show(seeded: str) -> None:
    result = run("show", "--url", seeded, "fail-mid")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for line in ("state:        FAILURE", "name:         proj.fail", "worker:       w2@other"):
        assert line in out.splitlines()
    assert "result:       ValueError('boom')" in out and "queue:        q1" in out
    assert "date_done: " in out and " UTC" in out
    assert out.rstrip().endswith("traceback:\nTraceback (most recent call last):\nValueError: boom")
    record = json.loads(run("show", "--url", seeded, "--json", "add-new").stdout)
    assert (record["status"], record["result"], record["args"]) == ("SUCCESS", 3, [1, 2])


#: Screen clear, an OSC title change ended by BEL, a C1 CSI and a right-to-left override.
HOSTILE = "\x1b[2J\x1b]0;pwned\x07\x9b31m\u202e\r\t"


def test_control_characters_from_the_database_are_escaped(
    make_app: Callable[..., Celery], db_url: str
) -> None:
    """Whatever list, show and stats print from the database reaches the terminal as escapes;
    a traceback keeps its lines."""
    app = make_app(result_extended=True)
    task_id = "evil" + HOSTILE
    traceback = f"Traceback (most recent call last):\n  File 'x.py'\nValueError: {HOSTILE}!\n"
    app.backend.store_result(
        task_id,
        {"v": HOSTILE},
        "PROGRESS" + HOSTILE,
        traceback=traceback,
        request=task_request("proj.evil" + HOSTILE, (HOSTILE,), worker="w" + HOSTILE),
    )
    outputs = [
        run("list", "--url", db_url),
        run("show", "--url", db_url, "--", task_id),
        run("stats", "--url", db_url, "--by-name"),
        run("stats", "--url", db_url),
        run("show", "--url", db_url, "--", "nope" + HOSTILE),
    ]
    for result in outputs:
        for char in "\x1b\x07\x9b\u202e\r\t":
            assert char not in result.output, (char, result.output)
    listing, shown, by_name, _, missing = (r.output for r in outputs)
    assert "evil\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\u202e\\r\\t" in listing
    assert "proj.evil\\x1b[2J" in listing and "w\\x1b[2J" in listing
    assert len(listing.splitlines()) == 2  # header and one row: nothing broke the table
    assert "state:        PROGRESS\\x1b[2J" in shown and "proj.evil\\x1b[2J" in by_name
    assert shown.rstrip().endswith(
        "traceback:\nTraceback (most recent call last):\n  File 'x.py'\n"
        "ValueError: \\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\u202e\\r\\t!"
    )
    assert "no result stored for task nope\\x1b[2J" in missing


def test_show_unknown_task_exits_1(seeded: str) -> None:
    line = one_error_line(run("show", "--url", seeded, "nope"))
    assert line == "Error: no result stored for task nope"


def test_stats(seeded: str) -> None:
    def stats(*args: str) -> dict:
        result = run("stats", "--url", seeded, "--json", *args)
        assert result.exit_code == 0, result.output
        return dict(json.loads(result.stdout))

    assert stats() == {"FAILURE": 1, "STARTED": 1, "SUCCESS": 2}
    assert stats("--since", "1d") == {"FAILURE": 1, "SUCCESS": 1}
    assert stats("--by-name") == {
        "proj.add": {"SUCCESS": 2},
        "proj.add_slow": {"STARTED": 1},
        "proj.fail": {"FAILURE": 1},
    }
    text = run("stats", "--url", seeded).stdout.splitlines()
    assert text[0].split() == ["STATE", "COUNT"] and "SUCCESS  2" in text and text[-1] == "total: 4"
    text = run("stats", "--url", seeded, "--by-name").stdout.splitlines()
    assert text[0].split() == ["NAME", "STATE", "COUNT"] and text[-1] == "total: 4"
    assert any(line.split() == ["proj.add", "SUCCESS", "2"] for line in text)


def test_cleanup_dry_run_then_real(seeded: str) -> None:
    dry = run("cleanup", "--url", seeded, "--older-than", "1h", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.startswith(
        "would delete 2 task result(s), 0 group result(s) and 0 chord counter(s) from before "
    )
    assert sorted(listed(seeded)) == ["add-new", "add-old", "fail-mid", "running"]
    real = run("cleanup", "--url", seeded, "--older-than", "1h")
    assert real.exit_code == 0 and real.stdout.startswith("deleted 2 task result(s)")
    assert sorted(listed(seeded)) == ["add-new", "running"]
    default = run("cleanup", "--url", seeded)  # 7 days: nothing that old is left
    assert default.stdout.startswith("deleted 0 task result(s)")


def test_forget(seeded: str) -> None:
    result = run("forget", "--url", seeded, "add-new", "nope")
    assert result.exit_code == 0 and result.stdout == "forgot 1 of 2 task result(s)\n"
    one_error_line(run("show", "--url", seeded, "add-new"))
    assert run("forget", "--url", seeded).exit_code == 2  # at least one id is required


def test_reads_never_create_tables(db_url: str) -> None:
    """Reading is no deploy step: an empty database stays empty and reads as 'nothing'."""
    assert run("list", "--url", db_url).stdout == "no stored results match\n"
    assert run("stats", "--url", db_url).stdout == "STATE  COUNT\ntotal: 0\n"
    one_error_line(run("show", "--url", db_url, "x"))
    assert run("cleanup", "--url", db_url, "--dry-run").exit_code == 0
    assert run("forget", "--url", db_url, "x").stdout == "forgot 0 of 1 task result(s)\n"
    assert not table_names(db_url)


@pytest.mark.parametrize(
    ("args", "option", "value"),
    [
        (["list", "--since", "3x"], "--since", "3x"),
        (["list", "--until", "soon"], "--until", "soon"),
        (["stats", "--since", "2024-13-45"], "--since", "2024-13-45"),
        (["cleanup", "--older-than", "7 days"], "--older-than", "7 days"),
    ],
)
def test_bad_time_value_is_one_line(
    args: list[str], option: str, value: str, tmp_path: Path
) -> None:
    line = one_error_line(run(*args, "--url", f"sqlite:///{tmp_path / 'r.db'}"))
    assert line.startswith(f"Error: {option}: invalid time {value!r}: use a relative time")


@pytest.mark.parametrize("url", UNREACHABLE)
@pytest.mark.parametrize(
    "args", [["list"], ["show", "t"], ["stats"], ["cleanup", "--dry-run"], ["forget", "t"]]
)
def test_unreachable_database_is_one_masked_line(url: str, args: list[str]) -> None:
    result = run(*args, "--url", url)
    line = one_error_line(result)
    assert line.startswith(f"Error: result database {url.replace('secret', '***')}: ")
    assert "secret" not in result.output and "Traceback" not in result.output


def test_no_database_url_is_one_line() -> None:
    assert "No database URL" in one_error_line(run("list"))


# ---- a real `celery -A app results …` process -------------------------------------------
def celery(backend_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SQLRESULTS_CLI_BACKEND": backend_url, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.cli_app", "results", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_celery_command_end_to_end(seeded: str) -> None:
    listing = celery(seeded, "list", "--json", "--state", "SUCCESS")
    assert listing.returncode == 0, listing.stderr
    assert [r["task_id"] for r in json.loads(listing.stdout)] == ["add-new", "add-old"]
    shown = celery(seeded, "show", "fail-mid")
    assert shown.returncode == 0 and "state:        FAILURE" in shown.stdout.splitlines()
    missing = celery(seeded, "show", "nope")
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == "Error: no result stored for task nope\n"


def test_every_command_through_celery(make_app: Callable[..., Celery], db_url: str) -> None:
    """Each ``results`` command as a user runs it: ``celery -A app results …``, app settings.

    (``serve`` runs the same way in tests/test_web.py.)
    """

    def ok(*args: str) -> str:
        done = celery(db_url, *args)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    assert "not versioned" in ok("current")
    assert celery(db_url, "check").returncode == 1
    assert "result tables ready" in ok("init")
    assert ok("check").startswith("result schema complete")
    assert "downgraded" in ok("downgrade", "0002")
    assert "ALTER TABLE" in ok("upgrade", "--sql").upper()
    assert "upgraded" in ok("upgrade")
    assert ok("current").endswith("(head)\n")
    seed(make_app(result_extended=True), db_url)
    assert "FAILURE" in ok("stats")
    assert "fail-mid" in ok("list", "--state", "FAILURE")
    assert "proj.fail" in ok("show", "fail-mid")
    assert "forgot 1" in ok("forget", "fail-mid")
    assert celery(db_url, "show", "fail-mid").returncode == 1
    assert "would delete" in ok("cleanup", "--older-than", "1d", "--dry-run")
    assert "deleted" in ok("cleanup", "--older-than", "1d")
    assert json.loads(ok("list", "--json", "--until", "1d")) == []


def test_celery_command_unreachable_database(tmp_path: Path) -> None:
    done = celery(f"sqlite:///{tmp_path / 'unused.db'}", "stats", "--url", UNREACHABLE[0])
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("Error: result database postgresql+psycopg://u:***@127.0.0.1:9/x")
    assert len(done.stderr.splitlines()) == 1 and "secret" not in done.stderr
