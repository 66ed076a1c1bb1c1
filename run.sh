#!/usr/bin/env bash
# One entry point: `./run.sh train [train.py args]` trains the demo, `./run.sh test [pytest args]` runs the tests,
# `./run.sh comfyui-deps` installs what the `comfyui` test tier needs (ComfyUI's requirements).
# On first use it creates .venv and installs the project into it; afterwards it reuses it
# (and reinstalls only when pyproject.toml changed).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    echo "[run.sh] installing into $VENV (first use: a few minutes) ..." >&2
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q -e ".[dev]" >&2
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    train) exec "$VENV/bin/python" train.py "$@" ;;
    test) exec "$VENV/bin/python" -m pytest -q "$@" ;;
    python) exec "$VENV/bin/python" "$@" ;;
    comfyui-deps)  # the `comfyui` test tier's ComfyUI requirements (docs/comfyui.md), with this venv's torch:
        # its torch, torchvision, torchaudio lines dropped (none is built for torch 2.14), the installed ones pinned
        req=${COMFYUI_ROOT:-../shared/comfyui}/requirements.txt
        pins=$("$VENV/bin/python" -m pip freeze | grep -iE '^(torch|torchvision)==')
        exec "$VENV/bin/python" -m pip install -q -r <(grep -vE '^(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;[].*)?$' "$req") \
            requests -c <(echo "$pins") ;;
    *) echo "usage: ./run.sh train|test|python|comfyui-deps [args...]" >&2; exit 2 ;;
esac
