#!/usr/bin/env bash
# Reproduce docs/prefect-ui-run.png and docs/prefect-ui-artifacts.png:
# start a throwaway local Prefect server, run the flow on configs/tiny.yaml
# against it, and screenshot the finished run in headless Chromium.
#
# Needs: Debian's chromium (apt-get install -y chromium), node + npm.
# Usage: bash docs/screenshot.sh [port]     (run from anywhere; ~2-3 minutes)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PORT="${1:-4310}"
BASE="http://127.0.0.1:${PORT}"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
[ -x "$CHROMIUM" ] || { echo "install chromium first: apt-get install -y chromium" >&2; exit 1; }

WORK="$(mktemp -d /tmp/ui-shot.XXXXXX)"
SERVER_PID=""
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# 1. Prefect server with its own PREFECT_HOME. PREFECT_UI_API_URL must name the
#    same port, or the UI tries the default :4200 and shows "Can't connect".
mkdir -p "$WORK/home"
PREFECT_HOME="$WORK/home" PREFECT_SERVER_ANALYTICS_ENABLED=false \
PREFECT_UI_API_URL="$BASE/api" \
  "$ROOT/.venv/bin/prefect" server start --host 127.0.0.1 --port "$PORT" \
  >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 90); do curl -sf "$BASE/api/health" >/dev/null && break; sleep 2; done
curl -sf "$BASE/api/health" >/dev/null || { cat "$WORK/server.log" >&2; exit 1; }

# 2. Run the flow on the tiny config.
( cd "$ROOT" && PREFECT_API_URL="$BASE/api" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false .venv/bin/finetune run --config configs/tiny.yaml \
  --set store.uri="$WORK/store" ) >"$WORK/run.log" 2>&1 \
  || { tail -50 "$WORK/run.log" >&2; exit 1; }

RUN_ID="$(curl -sf -X POST -H 'content-type: application/json' -d '{"limit": 1, "sort": "START_TIME_DESC"}' \
  "$BASE/api/flow_runs/filter" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')"
echo "flow run: $RUN_ID"

# 3. Screenshots with playwright-core driving the system Chromium.
( cd "$WORK" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund playwright-core >/dev/null )
cat >"$WORK/shot.js" <<'EOF'
const { chromium } = require('playwright-core');
const [,, exe, base, id, outRun, outArt] = process.argv;
(async () => {
  const browser = await chromium.launch({
    executablePath: exe,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  await page.goto(`${base}/runs/flow-run/${id}`, { waitUntil: 'networkidle', timeout: 60000 });
  await page.getByText('Completed').first().waitFor({ timeout: 30000 });

  // Run graph + Task Runs list (all Completed).
  await page.getByText('Task Runs', { exact: true }).first().click();
  await page.waitForLoadState('networkidle');
  await page.mouse.move(5, 995);
  await page.waitForTimeout(3000);
  await page.screenshot({ path: outRun });

  // Artifacts tab, scrolled so the artifact cards fill the view.
  const tab = page.getByText('Artifacts', { exact: true }).first();
  await tab.click();
  await page.waitForLoadState('networkidle');
  await page.waitForTimeout(3000);
  await tab.evaluate(el => {
    const y = el.getBoundingClientRect().top;
    let n = el.parentElement;
    while (n && !(n.scrollHeight > n.clientHeight + 10 && /(auto|scroll)/.test(getComputedStyle(n).overflowY))) n = n.parentElement;
    (n || document.scrollingElement).scrollBy(0, y - 20);
  });
  await page.mouse.move(5, 995);
  await page.waitForTimeout(1500);
  await page.screenshot({ path: outArt });
  await browser.close();
})().catch(e => { console.error(e); process.exit(1); });
EOF
mkdir -p "$ROOT/docs"
( cd "$WORK" && node shot.js "$CHROMIUM" "$BASE" "$RUN_ID" \
  "$ROOT/docs/prefect-ui-run.png" "$ROOT/docs/prefect-ui-artifacts.png" )
ls -l "$ROOT/docs/prefect-ui-run.png" "$ROOT/docs/prefect-ui-artifacts.png"
