#!/usr/bin/env bash
# Run one orphan-reclaim pass over a harness home and print what it did (run --help).
# The work is `harness supervisor reclaim`; this wrapper resolves the home like the CLI,
# finds the harness command, and frames the report for cron mail and terminals.
set -euo pipefail

_self=${BASH_SOURCE[0]}
[[ -L $_self ]] && _self=$(readlink -f -- "$_self")
_here=${_self%/*}
[[ $_here == "$_self" ]] && _here=.
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$_here/lib/common.sh"

usage() {
    cat <<'USAGE'
Usage: cleanup-zombie-workers.sh [--dry-run] [--json] [--home DIR]

Reclaim the tasks of dead ("zombie") workers once, like the supervisor does on every pass.
A worker is dead on proof: its pid is gone (or an unreaped zombie), its pid was reused by
another process, or its heartbeat is older than heartbeat_timeout_s. In that order, for
every dead worker:
  1. a frozen worker (stale heartbeat, but its pid is alive with the recorded start time,
     on this host) is sent SIGKILL, with its tasks' process groups, BEFORE its task is
     requeued, so it cannot finish the task beside the retry or keep a lock;
  2. its running task goes back to the queue with the attempt counted, or to the dead
     letters when its attempts are spent (a running task whose worker has no active spec
     is reclaimed too);
  3. task processes it left on this host (found by HARNESS_WORKER_ID) are SIGKILLed, and
     its spec moves to worker-specs/completed/ (exit_reason crashed, crash_proof).
Workers on other hosts are judged by their heartbeat only and never signalled. --dry-run
signals nothing. Safe to run beside a running supervisor (the queue lock and an owner
check make every reclaim happen once).

Options:
  --dry-run     only print what would be reclaimed; change nothing
  --json        print the report as JSON (`harness supervisor reclaim --json`)
  --home DIR    the harness home (default: $HARNESS_HOME, else the first entry of
                $STATE_DIRECTORY, else ${XDG_STATE_HOME:-~/.local/state}/harness)
  -h, --help    show this help and exit

Environment:
  HARNESS_BIN   the harness command, split on blanks (default: `harness` on PATH, else
                .venv/bin/harness beside this script's repository)

Exit status: 0 done (also when nothing was found), 1 error, 2 usage or not a harness home,
75 a lock stayed busy (retry later).
USAGE
}

dry_run=0
as_json=0
home_arg=
home_given=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) dry_run=1 ;;
        --json) as_json=1 ;;
        --home)
            [[ $# -ge 2 ]] || die 2 "--home needs a directory (see --help)"
            home_arg=$2
            home_given=1
            shift
            ;;
        --home=*)
            home_arg=${1#--home=}
            home_given=1
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die 2 "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
if ((home_given)) && [[ -z $home_arg ]]; then
    die 2 "--home: empty directory name"
fi

home=
harness_resolve_home home "$home_arg"
harness_require_home "$home"

harness=()
if [[ -n ${HARNESS_BIN:-} ]]; then
    read -r -a harness <<<"$HARNESS_BIN"
elif command -v harness >/dev/null 2>&1; then
    harness=(harness)
elif [[ -x $_here/../.venv/bin/harness ]]; then
    harness=("$_here/../.venv/bin/harness")
else
    die 1 "cannot find the harness command (install it, or set HARNESS_BIN)"
fi

args=(supervisor reclaim --home "$home")
((dry_run)) && args+=(--dry-run)
if ((as_json)); then
    exec "${harness[@]}" "${args[@]}" --json
fi

mode="reclaim pass"
((dry_run)) && mode="reclaim pass (dry run: nothing is changed)"
printf '%s over %s\n' "$mode" "$home"
status=0
"${harness[@]}" "${args[@]}" || status=$?
if ((status != 0)); then
    die "$status" "harness supervisor reclaim failed (exit $status)"
fi
