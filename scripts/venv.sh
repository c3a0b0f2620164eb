# Sourced by the other scripts: create .venv and install the package with its dev extras
# (EXTRAS="dev,mysqlclient" adds the C MySQL driver, which needs libmariadb's headers).
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-dev}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$EXTRAS]"
