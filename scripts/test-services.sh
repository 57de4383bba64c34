#!/usr/bin/env bash
# The system services some tests need, as an explicit step (the tests themselves never install or start
# anything outside their temporary folders):
#
#   scripts/test-services.sh up       a one-node Slurm (scripts/local-slurm.sh up: apt-installs slurmctld, slurmd,
#                                     slurm-client and munge when missing, writes /etc/slurm/slurm.conf and
#                                     /usr/local/bin/sacct, starts munged, slurmctld and slurmd) and a headless
#                                     Chromium with its driver (scripts/headless-browser.sh: apt-installs chromium
#                                     and chromium-driver when missing; no daemon)
#   scripts/test-services.sh down     stop the Slurm daemons and remove the files `up` wrote (packages stay)
#   scripts/test-services.sh status   say which services are there (exit 1 if any is missing)
#
# Needs root and apt-get on Debian/Ubuntu for `up` (or the packages already installed). Without them `up`
# says so and exits 0: the tests that need a service then skip, naming this script (under CI=true they fail).
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"

can_install() { [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; }

case ${1:-} in
up)
  if bash "$HERE/local-slurm.sh" status >/dev/null 2>&1; then
    echo "test-services: Slurm already up"
  elif can_install || command -v slurmctld >/dev/null 2>&1; then
    bash "$HERE/local-slurm.sh" up || exit 1
  else
    echo "test-services: no Slurm (needs root and apt-get): tests/test_slurm.py will skip" >&2
  fi
  if bash "$HERE/headless-browser.sh" --check >/dev/null 2>&1; then
    echo "test-services: headless browser already installed"
  elif can_install; then
    bash "$HERE/headless-browser.sh" >/dev/null || exit 1
  else
    echo "test-services: no headless browser (needs root and apt-get): tests/test_report_browser.py will skip" >&2
  fi
  ;;
down)
  if bash "$HERE/local-slurm.sh" status >/dev/null 2>&1; then bash "$HERE/local-slurm.sh" down; fi
  ;;
status)
  missing=0
  if bash "$HERE/local-slurm.sh" status >/dev/null 2>&1; then echo "slurm: up"; else echo "slurm: not running"; missing=1; fi
  if browser=$(bash "$HERE/headless-browser.sh" --check 2>/dev/null); then echo "browser: $(echo $browser | cut -d' ' -f1)"; else echo "browser: not installed"; missing=1; fi
  exit $missing
  ;;
*)
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
  ;;
esac
