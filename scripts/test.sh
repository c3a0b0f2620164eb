#!/usr/bin/env bash
# The test command: starts the servers if needed, installs into .venv, runs lint, types,
# the import layers and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
# Headless Chromium + chromedriver for tests/test_web_browser.py (Debian packages, no downloads).
command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium chromium-driver)
# libmariadb's headers, to build mysqlclient (MariaDB tests also run on that driver).
pkg-config --exists libmariadb || (apt-get update && apt-get install -y libmariadb-dev pkg-config)
# pg_auto_failover and PgBouncer for the pgcluster tests (tests/clusters.py; Debian packages).
command -v pg_autoctl >/dev/null && command -v pgbouncer >/dev/null \
    || (apt-get update && apt-get install -y postgresql-15-auto-failover pg-auto-failover-cli pgbouncer)
# A three-node Galera Cluster (tests/test_galera.py starts it with scripts/galera.sh) and
# HAProxy in front of it, for the tests that lose a node.
dpkg -s galera-4 >/dev/null 2>&1 && command -v haproxy >/dev/null && command -v rsync >/dev/null \
    || (apt-get update && apt-get install -y galera-4 haproxy rsync)
EXTRAS="dev,mysqlclient"
source scripts/venv.sh
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check celery_sqlresults
"$VENV/bin/mypy"
"$VENV/bin/lint-imports" --no-cache
exec "$VENV/bin/python" -m pytest "$@"
