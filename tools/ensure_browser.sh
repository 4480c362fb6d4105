#!/usr/bin/env bash
# The studio's browser tests (tests/studio) need a headless Chromium, and Firefox for the Firefox flow.
# On Debian/Ubuntu as root this installs what is missing from apt (`chromium`, `firefox-esr`); anywhere
# else it says what to install. It never fails the build: without a browser those tests skip and say why.
set -u

have() { for path in "$@"; do [ -x "$path" ] && return 0; done; return 1; }

missing=()
have "${WANSTREAM_CHROMIUM:-}" /usr/lib/chromium/chromium /usr/bin/chromium /usr/bin/chromium-browser /usr/bin/google-chrome \
  || missing+=(chromium)
have "${WANSTREAM_FIREFOX:-}" /usr/bin/firefox-esr /usr/bin/firefox || missing+=(firefox-esr)

if [ ${#missing[@]} -eq 0 ]; then
  echo "ensure_browser: Chromium and Firefox are installed"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_browser: ${missing[*]} not found; install it (Debian/Ubuntu: sudo apt-get install ${missing[*]})" \
    "to run the studio's browser tests, which skip without it" >&2
  exit 0
fi
echo "ensure_browser: installing ${missing[*]} from apt (for the studio's browser tests)"
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq >"$log" 2>&1 && apt-get install -y -qq "${missing[@]}" >>"$log" 2>&1; then
  echo "ensure_browser: installed ${missing[*]}"
else
  echo "ensure_browser: could not install ${missing[*]} (the studio's browser tests will skip); apt said:" >&2
  tail -n 5 "$log" >&2
fi
rm -f "$log"
exit 0
