#!/usr/bin/env bash
# Threshold check of a harness home for cron and monitoring agents (run --help).
# A thin wrapper around `harness check` that keeps the monitoring-plugin contract even
# when harness itself cannot run (missing CLI, timeout): exit 3 UNKNOWN then.
set -euo pipefail

_self=${BASH_SOURCE[0]}
[[ -L $_self ]] && _self=$(readlink -f -- "$_self")
_here=${_self%/*}
[[ $_here == "$_self" ]] && _here=.
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$_here/lib/common.sh"

usage() {
    cat <<'USAGE'
Usage: check-performance.sh [--home DIR] [--json] [--no-alerts] [--timeout SECONDS]

Check a harness home against the check_* thresholds of its system.json and print a
monitoring-plugin result (Nagios, Icinga, Sensu, cron): the first line is the summary,
e.g. "HARNESS WARNING - queue_depth=612 (warn 500) | queue_depth=612;500;900 ...",
then one line per check.

Options:
  --home DIR          the harness home (default: $HARNESS_HOME, else the first entry of
                      $STATE_DIRECTORY, else ${XDG_STATE_HOME:-~/.local/state}/harness)
  --json              print the result as JSON instead
  --no-alerts         evaluate only: do not update check-state.json or emit events
  --timeout SECONDS   give up after this long with UNKNOWN (default: 60)
  -h, --help          show this help and exit

Environment:
  HARNESS_BIN         the harness CLI to run (default: the project's .venv/bin/harness
                      beside this script, else `harness` on PATH)

Checks (system.json keys, each [warning, critical]): check_queue_depth, check_error_rate,
check_stalled_workers, check_p95_duration_s, check_disk_free_mb (lower is worse),
check_file_mb, check_events_file_mb.

Side effects (unless --no-alerts): coordination/check-state.json keeps the last level of
each check (published by rename under locks/metrics.lock); a newly crossed threshold
appends one performance_alert event, a cleared one a performance_recovered event.

Exit status:
  0   OK
  1   WARNING: a warning threshold is crossed
  2   CRITICAL: a critical threshold is crossed
  3   UNKNOWN: the home is unreadable, not initialised or corrupt; harness is not found;
      the check timed out; or bad options
USAGE
}

unknown() {
    printf 'HARNESS UNKNOWN - %s\n' "$*"
    exit 3
}

home_opt=""
timeout_s=60
args=()
while (($#)); do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --home)
            (($# >= 2)) || unknown "option --home needs a value (see --help)"
            home_opt=$2
            shift 2
            ;;
        --home=*)
            home_opt=${1#--home=}
            shift
            ;;
        --timeout)
            (($# >= 2)) || unknown "option --timeout needs a value (see --help)"
            timeout_s=$2
            shift 2
            ;;
        --timeout=*)
            timeout_s=${1#--timeout=}
            shift
            ;;
        --json | --no-alerts)
            args+=("$1")
            shift
            ;;
        *)
            unknown "unknown option $1 (see --help)"
            ;;
    esac
done
if [[ ! $timeout_s =~ ^[0-9]+$ ]] || ((timeout_s == 0)); then
    unknown "--timeout must be a positive number of seconds, not '$timeout_s'"
fi

home=""
harness_resolve_home home "$home_opt"

bin=${HARNESS_BIN:-}
if [[ -z $bin ]]; then
    if [[ -x $_here/../.venv/bin/harness ]]; then
        bin=$_here/../.venv/bin/harness
    else
        bin=$(command -v harness) || unknown "harness CLI not found (set HARNESS_BIN)"
    fi
fi
[[ -x $bin ]] || unknown "harness CLI $bin is not executable (set HARNESS_BIN)"

cmd=("$bin" check --home "$home" "${args[@]}")
if command -v timeout >/dev/null; then
    cmd=(timeout --kill-after=5 "$timeout_s" "${cmd[@]}")
fi
rc=0
"${cmd[@]}" || rc=$?
case $rc in
    0 | 1 | 2 | 3) exit "$rc" ;;
    124 | 137) unknown "harness check timed out after ${timeout_s}s ($home)" ;;
    *) unknown "harness check exited with status $rc ($home)" ;;
esac
