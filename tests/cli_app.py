"""The app ``celery -A tests.cli_app results …`` runs against (backend URL from the environment)."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("cli_app", set_as_current=False)
app.conf.result_backend = "sql+" + os.environ.get("SQLRESULTS_CLI_BACKEND", "sqlite:///cli.db")
app.conf.result_extended = True
