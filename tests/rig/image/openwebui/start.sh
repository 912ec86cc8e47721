#!/usr/bin/env bash
# The rig image's /app/backend/start.sh (not a stand-in for OpenWebUI, which is the real PyPI package): what the
# official image's CMD ["bash", "start.sh"] does for a plain start (upstream backend/start.sh: cd to its folder,
# HOST/PORT defaults, WEBUI_SECRET_KEY from .webui_secret_key when unset, uvicorn open_webui.main:app). Upstream's
# optional Playwright, bundled-Ollama, CUDA and HF-Space branches are left out: the rig uses none of them.
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" &> /dev/null && pwd)
cd "$SCRIPT_DIR" || exit 1

KEY_FILE=.webui_secret_key
PORT="${PORT:-8080}"
HOST="${HOST:-0.0.0.0}"
if test "$WEBUI_SECRET_KEY $WEBUI_JWT_SECRET_KEY" = " "; then
  echo "Loading WEBUI_SECRET_KEY from file, not provided as an environment variable."
  if ! [ -e "$KEY_FILE" ]; then
    echo "Generating WEBUI_SECRET_KEY"
    head -c 12 /dev/urandom | base64 > "$KEY_FILE"
  fi
  echo "Loading WEBUI_SECRET_KEY from $KEY_FILE"
  WEBUI_SECRET_KEY=$(cat "$KEY_FILE")
fi

echo "Starting server with logs enabled..."
WEBUI_SECRET_KEY="$WEBUI_SECRET_KEY" exec python3 -m uvicorn open_webui.main:app --host "$HOST" --port "$PORT" \
  --forwarded-allow-ips '*' --workers "${UVICORN_WORKERS:-1}"
