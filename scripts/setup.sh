#!/usr/bin/env bash
# Set up a development environment in .venv (idempotent): CPU torch pinned, the package with its
# napari and test extras, and (as root, on Debian/Ubuntu) the X server napari's tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Pin torch first: an unpinned install would pull a multi-GB CUDA build. The pin alone gives the
# CPU wheel only where pip's own configuration supplies one (as on the project's CI machines); on
# plain PyPI under Linux set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get it.
.venv/bin/python -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[napari,dev]"
if ! command -v xvfb-run >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xvfb xauth libxcb-icccm4 libxcb-keysyms1 \
      libxcb-xinerama0 libxcb-image0 libxcb-render-util0 libxcb-shape0 libxcb-randr0 libxcb-xfixes0 \
      libxkbcommon-x11-0 libgl1 libegl1 libfontconfig1 libdbus-1-3 >/dev/null
  else
    echo "setup: xvfb-run not found; install Xvfb to run the GUI tests headless" >&2
  fi
fi
