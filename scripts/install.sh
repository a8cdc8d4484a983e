#!/usr/bin/env bash
# Install mtrun's core and every plugin distribution in plugins/ into ./.venv, editable.
#
# Usage: ./scripts/install.sh
#
# Safe to run again: an existing .venv is reused and pip only changes what changed, so this is
# also how a new plugin folder gets installed. A shell script rather than a Makefile because it
# needs nothing beyond bash and python3 on a fresh machine, and "every plugins/*/ folder" is a
# plain loop here.
#
# Environment:
#   PYTHON        interpreter that creates the venv (default: python3 on PATH; needs >= 3.10)
#   MTRUN_VENV    where the venv lives (default: .venv in the repository root)
#   MTRUN_EXTRAS  core extras to install (default: dev; e.g. "dev,xformers" on CUDA machines)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV="${MTRUN_VENV:-.venv}"
EXTRAS="${MTRUN_EXTRAS:-dev}"

if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "install.sh: $PYTHON is missing or older than Python 3.10; set PYTHON=/path/to/python3.10+" >&2
        exit 1
    fi
    echo "install.sh: creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi

VPY="$VENV/bin/python"
"$VPY" -m pip install --upgrade pip

# Core and all plugins in one pip call: one dependency resolution, and each plugin's
# `mtrun` requirement is satisfied by the editable core next to it rather than fetched.
targets=(-e ".[${EXTRAS}]")
for dir in plugins/*/; do
    [ -f "${dir}pyproject.toml" ] || continue
    targets+=(-e "${dir%/}")
done
echo "install.sh: installing ${targets[*]}"
"$VPY" -m pip install "${targets[@]}"
# The demo corpus' renderer (SF2 synthesis) for the mtrun-demo plugin, which cannot declare it:
# --no-deps because its declared pyaudio dependency (live playback only, no wheel, needs
# PortAudio headers) is not used; without it, the corpus falls back to a NumPy synthesizer and
# says so in its manifest.
"$VPY" -m pip install --no-deps "tinysoundfont>=0.3.7,<0.4"
# musicnn's published weights (TensorFlow checkpoints inside the wheel) for the mtrun-musicnn
# plugin, which reads them without TensorFlow. --no-deps: its declared tensorflow, librosa and
# numpy<1.17 requirements are not needed to read the files and would clash with this venv.
"$VPY" -m pip install --no-deps "musicnn==0.1.0"

"$VPY" -m mtrun.cli plugins >/dev/null || {
    echo "install.sh: installed, but 'mtrun plugins' fails; see the error above" >&2
    exit 1
}
echo "install.sh: done. Try: $VENV/bin/mtrun plugins"
