#!/usr/bin/env bash
# The test command: starts the servers if needed, installs into .venv, runs lint, types and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
source scripts/venv.sh
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check celery_sqlresults
"$VENV/bin/mypy"
exec "$VENV/bin/python" -m pytest "$@"
