#!/usr/bin/env bash
# The whole test suite, as the README's test command and .ci/run run it: bring up the system services some
# tests need (scripts/test-services.sh up), run pytest with the given arguments, then take the services down
# again, whatever pytest's result. Exits with pytest's status.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-services.sh up || { echo "test: the test services did not start (see above)" >&2; exit 1; }
python -m pytest -q "$@"
status=$?
bash scripts/test-services.sh down
exit $status
