#!/usr/bin/env bash
# The demo: installs into .venv, then runs a real worker with SQLite results and an SQLite broker.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec "$VENV/bin/python" -m examples.demo
