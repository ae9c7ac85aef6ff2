#!/usr/bin/env bash
# Python 3.9 leg (3D Slicer 5.6 and 5.8 ship Python 3.9): byte-compile SCONetLib and the Slicer module, run the
# torch-free engine tests (geometry, io, phantom, metrics; the point stage needs torch since it has a torch
# implementation), the worker tests and the Slicer module's
# stand-in tests under 3.9. torch has no offline 3.9 wheel here, so the worker processes that need the real
# engine run under the default python3 (SCONET_WORKER_PYTHON); the GUI side stays 3.9.
# Skipped, with the reason printed, when no Python 3.9 is found or its packages cannot be installed; a test
# failure fails the run. The 3.9 environment is kept in .ci/.cache/py39 (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

is_python39() { [ -n "$1" ] && "$1" -c 'import sys; assert sys.version_info[:2] == (3, 9)' >/dev/null 2>&1; }
python39=""
for candidate in "${SCONET_PYTHON39:-}" "$(command -v python3.9 || true)" "$HOME"/.pyenv/versions/3.9*/bin/python; do
    if is_python39 "$candidate"; then
        python39="$candidate"
        break
    fi
done
if [ -z "$python39" ]; then
    echo "Python 3.9 leg skipped: no Python 3.9 interpreter (set SCONET_PYTHON39, or put python3.9 on PATH)"
    exit 0
fi

packages="numpy SimpleITK scipy scikit-image vtk pytest packaging"
venv=.ci/.cache/py39
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.packages" 2>/dev/null)" != "$python39 $packages" ]; then
    rm -rf "$venv"
    mkdir -p .ci/.cache
    log=.ci/.cache/py39-install.log
    if ! { "$python39" -m venv "$venv" \
           && "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $packages; } >"$log" 2>&1; then
        tail -n 20 "$log"
        echo "Python 3.9 leg skipped: could not install its packages ($packages) for $python39"
        rm -rf "$venv"
        exit 0
    fi
    echo "$python39 $packages" > "$venv/.packages"
fi

echo "Python 3.9 leg: $("$venv/bin/python" --version) from $python39"
"$venv/bin/python" -m compileall -q SCONetLib SCONetSegmentation Testing/slicer_stub
PYTHONPATH="$PWD" SCONET_WORKER_PYTHON="$(command -v python3)" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    Testing/test_geometry.py Testing/test_io.py Testing/test_phantom.py \
    Testing/test_metrics.py Testing/test_worker.py Testing/test_slicer_module.py
