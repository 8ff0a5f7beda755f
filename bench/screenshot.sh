#!/usr/bin/env bash
# The side-by-side page in a real browser: start app.py, open it in headless Chromium, type a title, wait for
# both models' poems, save a PNG (docs/demo.png, the picture the README shows).
#
#   bash bench/screenshot.sh                                   # data/dpo_five_char vs data/base_model, 春夜喜雨
#   bash bench/screenshot.sh --model out/dpo --reference data/base_model --output /tmp/page.png
#
# Options: --model DIR, --reference DIR, --title TITLE, --seed N, --output PNG, --port N (default 7877).
# Chromium and a CJK font come from Debian's packages (chromium, fonts-noto-cjk; installed when missing), and
# Playwright's Python driver from PyPI drives it: no browser is downloaded. The page may request nothing but
# the app itself: any request elsewhere (a web font, a CDN script) stops the script.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=data/dpo_five_char
REFERENCE=data/base_model
TITLE=春夜喜雨
SEED=0
OUTPUT=docs/demo.png
PORT=7877
PYTHON=${PYTHON:-python}
PLAYWRIGHT_VERSION=1.65.2

while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --reference) REFERENCE=$2; shift 2 ;;
    --title) TITLE=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --output) OUTPUT=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "screenshot.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# 1. Debian's Chromium and a CJK font (without one, every character would be a box).
if ! command -v chromium >/dev/null || ! fc-list 2>/dev/null | grep -qi "Noto Sans CJK"; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium fonts-noto-cjk >/dev/null
fi
CHROMIUM=$(command -v chromium)

# 2. Playwright's driver only (never `playwright install`: the browser is Debian's).
"$PYTHON" -c "import playwright" 2>/dev/null || "$PYTHON" -m pip install -q "playwright==$PLAYWRIGHT_VERSION"

# 3. The app, on 127.0.0.1, stopped when this script ends.
LOG=$(mktemp -t screenshot-app.XXXXXX.log)
"$PYTHON" app.py --model "$MODEL" --reference "$REFERENCE" --port "$PORT" >"$LOG" 2>&1 &
APP_PID=$!
PROFILE=$(mktemp -d -t screenshot-chromium.XXXXXX)
trap 'kill "$APP_PID" 2>/dev/null || true; wait "$APP_PID" 2>/dev/null || true; rm -rf "$PROFILE"' EXIT
URL="http://127.0.0.1:$PORT/"
for _ in $(seq 600); do
  if ! kill -0 "$APP_PID" 2>/dev/null; then
    echo "screenshot.sh: app.py stopped before serving; its output:" >&2; cat "$LOG" >&2; exit 1
  fi
  curl -sf -o /dev/null "$URL" && break
  sleep 0.5
done
curl -sf -o /dev/null "$URL" || { echo "screenshot.sh: no page at $URL after 300 s; app output in $LOG" >&2; exit 1; }

# 4. The browser: type the title, press Write, wait for a poem in both columns, save the picture.
mkdir -p "$(dirname "$OUTPUT")"
CHROMIUM=$CHROMIUM PROFILE=$PROFILE URL=$URL TITLE=$TITLE SEED=$SEED OUTPUT=$OUTPUT "$PYTHON" - <<'EOF'
import os
import sys

from playwright.sync_api import sync_playwright

url, title, output = os.environ["URL"], os.environ["TITLE"], os.environ["OUTPUT"]
# The flags Chromium needs here: no sandbox as root, and no background traffic to Google's hosts.
flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--lang=zh-CN"]
outside = []
with sync_playwright() as p:
    context = p.chromium.launch_persistent_context(
        os.environ["PROFILE"], executable_path=os.environ["CHROMIUM"], headless=True, args=flags,
        viewport={"width": 1280, "height": 900}, device_scale_factor=1,
    )
    page = context.new_page()
    page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else outside.append(r.url))
    page.goto(url, wait_until="networkidle")
    box = page.locator("#title textarea")
    box.fill("")
    box.press_sequentially(title, delay=50)
    seed = page.get_by_label("Seed")
    seed.fill(os.environ["SEED"])
    page.locator("#write").click()
    page.wait_for_function(
        "() => document.querySelectorAll('#aligned-poems .poem').length > 0"
        " && document.querySelectorAll('#reference-poems .poem').length > 0",
        timeout=600_000,
    )
    page.wait_for_timeout(500)  # let the progress overlay fade
    page.screenshot(path=output, full_page=True)
    context.close()
if outside:
    sys.exit(f"screenshot.sh: the page requested addresses outside the app: {sorted(set(outside))}")
print(f"saved {output}")
EOF
