#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying sweeps on a laptop and for the tests.
#
#   scripts/local-slurm.sh up       install (Debian/Ubuntu, as root) and start munge, slurmctld, slurmd
#   scripts/local-slurm.sh status   print whether it is up (exit 0) or not (exit 1)
#   scripts/local-slurm.sh down     stop the daemons and remove what `up` wrote
#
# It needs root and apt (or the packages already installed). It writes /etc/slurm/slurm.conf only
# when no slurm.conf exists or the existing one was written by this script, so it never replaces a
# real cluster's configuration. There is no accounting database, so `sacct` cannot answer; submitit
# needs it to see that a job died without a result. `up` therefore puts a small `sacct` on the PATH
# (/usr/local/bin/sacct, scripts/sacct-from-scontrol) that answers submitit's query from
# `scontrol`, which keeps finished jobs for MinJobAge seconds (set to 2 hours here).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CONF=/etc/slurm/slurm.conf
MARK="# written by ptq-launcher scripts/local-slurm.sh"
STATE=/var/lib/ptq-local-slurm
LOGS=/var/log/ptq-local-slurm
SACCT_SHIM=/usr/local/bin/sacct
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "local-slurm: $*" >&2; exit 1; }

is_up() {
  command -v sinfo >/dev/null 2>&1 || return 1
  local state
  state="$(sinfo -h -o '%T' 2>/dev/null | head -n1)" || return 1
  [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]]
}

install_packages() {
  local missing=()
  for cmd in slurmctld slurmd sinfo munged; do
    command -v "$cmd" >/dev/null 2>&1 || [[ -x "/usr/sbin/$cmd" ]] || missing+=("$cmd")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  command -v apt-get >/dev/null 2>&1 || die "Slurm is not installed and there is no apt-get: install ${PACKAGES[*]} by hand."
  echo "local-slurm: installing ${PACKAGES[*]} with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${PACKAGES[@]}" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null 2>&1
    apt-get install -y -q "${PACKAGES[@]}" >/dev/null
  }
}

write_conf() {
  if [[ -f "$CONF" ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching a real cluster's configuration."
  fi
  local host cpus mem
  host="$(hostname -s)"
  cpus="$(nproc)"
  # Leave 1 GiB of memory to the system.
  mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) - 1024 ))
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$LOGS"
  cat >"$CONF" <<EOF
$MARK
ClusterName=ptq-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
# Finished jobs stay visible to scontrol (and so to the sacct stand-in) for two hours.
MinJobAge=7200
# A cancelled job is killed 5 s after its SIGTERM (submitit's job wrapper ignores SIGTERM).
KillWait=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

install_sacct_shim() {
  if [[ -e "$SACCT_SHIM" ]] && ! grep -qF "ptq-launcher" "$SACCT_SHIM"; then
    die "$SACCT_SHIM exists and is not ours; remove it or set up slurmdbd for accounting."
  fi
  install -m 0755 "$HERE/sacct-from-scontrol" "$SACCT_SHIM"
}

up() {
  [[ $EUID -eq 0 ]] || die "must run as root (it installs packages and starts system daemons)."
  if is_up; then echo "local-slurm: already up"; sinfo; return 0; fi
  install_packages
  write_conf
  install_sacct_shim
  # munge authenticates every Slurm message; --force lets it start as root without systemd.
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    [[ -s /etc/munge/munge.key ]] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    /usr/sbin/munged --force
  fi
  pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld -c
  pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
  for _ in $(seq 1 60); do
    if is_up; then sinfo; return 0; fi
    sleep 1
  done
  die "the node did not become idle within 60 s; see $LOGS/slurmctld.log and $LOGS/slurmd.log."
}

down() {
  [[ $EUID -eq 0 ]] || die "must run as root."
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  for _ in $(seq 1 30); do
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break
    sleep 1
  done
  if [[ -f "$CONF" ]] && grep -qF "$MARK" "$CONF"; then rm -f "$CONF"; fi
  if [[ -f "$SACCT_SHIM" ]] && grep -qF "ptq-launcher" "$SACCT_SHIM"; then rm -f "$SACCT_SHIM"; fi
  rm -rf "$STATE"
  echo "local-slurm: down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) if is_up; then sinfo; else echo "local-slurm: not running"; exit 1; fi ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
