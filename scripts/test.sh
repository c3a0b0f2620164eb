#!/usr/bin/env bash
# The test command: starts the servers if needed, installs into .venv, runs lint, types and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
# Headless Chromium + chromedriver for tests/test_web_browser.py (Debian packages, no downloads).
command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium chromium-driver)
source scripts/venv.sh
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check celery_sqlresults
"$VENV/bin/mypy"
exec "$VENV/bin/python" -m pytest "$@"
