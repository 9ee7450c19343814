#!/usr/bin/env bash
# Open the live harness dashboard for a home (run --help).
set -euo pipefail

_self=${BASH_SOURCE[0]}
[[ -L $_self ]] && _self=$(readlink -f -- "$_self")
_here=${_self%/*}
[[ $_here == "$_self" ]] && _here=.
# shellcheck source-path=SCRIPTDIR source=../lib/common.sh
source "$_here/../lib/common.sh"

usage() {
    cat <<'USAGE'
Usage: metrics-dashboard.sh [--home DIR] [--once] [--interval SECONDS] [--width N]
                            [--no-color]

Open `harness dashboard` on a harness home: health and backpressure, queue depth by
priority, the workers with their task and heartbeat age, a throughput sparkline from
coordination/metrics-snapshots.jsonl, and the newest events (secrets redacted).

It redraws when coordination/ changes (inotify) and every --interval seconds. It needs
only a plain terminal (no mouse), so it works over SSH. Keys: q quits, r redraws; Ctrl-C
quits too. The terminal is restored on exit.

Options:
  --home DIR          the harness home (default: $HARNESS_HOME, else the first entry of
                      $STATE_DIRECTORY, else ${XDG_STATE_HOME:-~/.local/state}/harness)
  --once              print one frame and exit (e.g. `watch -n 5 metrics-dashboard.sh --once`)
  --interval SECONDS  redraw at least this often (default: 5)
  --width N           frame width with --once (default: the terminal's)
  --no-color          no colours (also when $NO_COLOR is set)
  -h, --help          show this help and exit

Environment:
  HARNESS_BIN         the harness CLI to run (default: the project's .venv/bin/harness,
                      else `harness` on PATH)

Exit status: 0 on q or Ctrl-C (or after --once); 2 on bad options or an uninitialised
home; 1 when harness is not found.
USAGE
}

home_opt=""
args=()
while (($#)); do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --home)
            (($# >= 2)) || die 2 "option --home needs a value (see --help)"
            home_opt=$2
            shift 2
            ;;
        --home=*)
            home_opt=${1#--home=}
            shift
            ;;
        --interval | --width)
            (($# >= 2)) || die 2 "option $1 needs a value (see --help)"
            args+=("$1" "$2")
            shift 2
            ;;
        --interval=* | --width=* | --once | --no-color)
            args+=("$1")
            shift
            ;;
        *)
            die 2 "unknown option $1 (see --help)"
            ;;
    esac
done

home=""
harness_resolve_home home "$home_opt"

bin=${HARNESS_BIN:-}
if [[ -z $bin ]]; then
    if [[ -x $_here/../../.venv/bin/harness ]]; then
        bin=$_here/../../.venv/bin/harness
    else
        bin=$(command -v harness) || die 1 "harness CLI not found (set HARNESS_BIN)"
    fi
fi

exec "$bin" dashboard --home "$home" "${args[@]}"
