#!/usr/bin/env bash
# A headless Chromium and its WebDriver from Debian's packages, for the test that opens the HTML report in a
# real browser (tests/test_report_browser.py).
#
#   scripts/headless-browser.sh           install chromium and chromium-driver when missing (Debian/Ubuntu, as
#                                         root), then print two lines: the browser binary, the driver binary
#   scripts/headless-browser.sh --check   print them if both are installed (exit 0), else say what is missing (exit 1)
#
# Safe to run again: it installs nothing when both are there. CHROMIUM and CHROMEDRIVER name other binaries
# (a browser installed another way); they are used as given and nothing is installed.
# Ubuntu's chromium packages are snap wrappers that do not run in containers; Debian's are real binaries.
set -euo pipefail

PACKAGES=(chromium chromium-driver)

die() { echo "headless-browser: $*" >&2; exit 1; }

find_browser() {
  if [[ -n "${CHROMIUM:-}" ]]; then command -v "$CHROMIUM"; return; fi
  local name
  for name in chromium chromium-browser; do
    command -v "$name" 2>/dev/null && return 0
  done
  return 1
}

find_driver() {
  if [[ -n "${CHROMEDRIVER:-}" ]]; then command -v "$CHROMEDRIVER"; return; fi
  command -v chromedriver 2>/dev/null && return 0
  [[ -x /usr/lib/chromium/chromedriver ]] && echo /usr/lib/chromium/chromedriver && return 0
  return 1
}

installed() { find_browser >/dev/null && find_driver >/dev/null; }

install_packages() {
  [[ $EUID -eq 0 ]] || die "Chromium is not installed and this is not root: install ${PACKAGES[*]} (as root) or set CHROMIUM and CHROMEDRIVER."
  command -v apt-get >/dev/null 2>&1 || die "Chromium is not installed and there is no apt-get: install ${PACKAGES[*]} by hand or set CHROMIUM and CHROMEDRIVER."
  echo "headless-browser: installing ${PACKAGES[*]} with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Recommends pull in desktop extras (fonts, sound, GTK themes) a headless test does not need.
  apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null 2>&1
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null
  }
}

case "${1:-}" in
  "")
    if ! installed; then
      [[ -z "${CHROMIUM:-}${CHROMEDRIVER:-}" ]] || die "CHROMIUM or CHROMEDRIVER is set but the browser or the driver is not an executable; installing nothing."
      install_packages
    fi ;;
  --check) installed || { echo "headless-browser: not installed (${PACKAGES[*]})" >&2; exit 1; } ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac
installed || die "installing ${PACKAGES[*]} did not provide chromium and chromedriver."
find_browser
find_driver
