#!/usr/bin/env bash
# Create the virtual environment and install mbexport with everything its demo and tests use.
# torch is pinned here (a CPU wheel this machine has locally); pyproject.toml stays honest at torch>=2.4.
set -euo pipefail
venv=${1:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q -e ".[bench,test]"

# A real Triton server for the tests (tests/tritonserver.py assembles it from this and ../shared/triton):
# - the nvidia-pytriton wheel, which carries tritonserver 2.51.0 and its Python backend; kept as a file, not
#   installed (it pins numpy<2, which this venv must not be forced into);
# - the environment of Triton's Python models, which is what a serving image needs: numpy<2 (this stub build
#   misreads numpy 2 arrays) and tokenizers, and no __pycache__ written into the model repository.
triton="$venv/triton"
mkdir -p "$triton"
ls "$triton"/nvidia_pytriton-0.7.0-*.whl >/dev/null 2>&1 ||
  "$venv/bin/python" -m pip download -q --no-deps "nvidia-pytriton==0.7.0" -d "$triton"
[ -x "$triton/serving/bin/python" ] || python3 -m venv "$triton/serving"
"$triton/serving/bin/python" -m pip install -q "numpy<2" tokenizers
site=$("$triton/serving/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import sys; sys.dont_write_bytecode = True" > "$site/no-bytecode.pth"
