#!/usr/bin/env bash
# Set up (scripts/setup.sh) and open napari with the KiTS widget, the sample CT and the shipped model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${DISPLAY:-}" ] && [ -z "${WAYLAND_DISPLAY:-}" ] && command -v xvfb-run >/dev/null 2>&1; then
  echo "napari-kits: no display; running headless under Xvfb" >&2
  exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/napari-kits "$@"
fi
exec .venv/bin/napari-kits "$@"
