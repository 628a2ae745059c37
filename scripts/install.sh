#!/usr/bin/env bash
# Create the virtual environment and install mbexport with everything its demo and tests use.
# torch is pinned here (a CPU wheel this machine has locally); pyproject.toml stays honest at torch>=2.4.
set -euo pipefail
venv=${1:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q -e ".[quant,bench,test]"
