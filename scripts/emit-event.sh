#!/usr/bin/env bash
# Append one dashboard event to HOME/coordination/dashboard-events.jsonl (run --help).
# Pure bash on the common path: no Python, jq only to check --data.
set -euo pipefail

_self=${BASH_SOURCE[0]}
[[ -L $_self ]] && _self=$(readlink -f -- "$_self")
_here=${_self%/*}
[[ $_here == "$_self" ]] && _here=.
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$_here/lib/common.sh"

usage() {
    cat <<'EOF'
Usage: emit-event.sh --type TYPE [--severity S] [--message M] [--source S] [--task ID]
                     [--worker ID] [--correlation ID] [--data JSON] [--home DIR]
       emit-event.sh TYPE [DATA_JSON] [SOURCE]          (older positional form)

Append one event to the harness dashboard event log, with the same envelope as the
Python writer (coordination/events.py), and print its event_id on stdout.

Options:
  --type TYPE         event type, matching ^[a-z][a-z0-9_.-]{0,63}$ (required)
  --severity S        debug | info | warning | error | critical (default: info)
  --message M         human-readable text, at most 16384 bytes of UTF-8 (default: "");
                      secrets are masked (see Redaction)
  --source S          who emits the event (default: emit-event.sh)
  --task ID           task_id of the event (default: null); the id grammar
                      ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$
  --worker ID         worker_id of the event (default: null); the same grammar
  --correlation ID    correlation_id of the event (default: null)
  --data JSON         a JSON object, at most 65536 bytes compacted (default: {});
                      checked, redacted and compacted with jq, the only time jq runs
  --home DIR          the harness home (default: $HARNESS_HOME, else the first entry of
                      $STATE_DIRECTORY, else ${XDG_STATE_HOME:-~/.local/state}/harness)
  -h, --help          show this help and exit
Every option also accepts the --option=VALUE form; "--" ends the options.

Event line (one compact JSON object; keys always present, in this order):
  event_id ("ev-YYYYmmddTHHMMSSmmm-<12 hex>"), timestamp (UTC YYYY-MM-DDTHH:MM:SS.mmmZ),
  type, severity, source, message, task_id, worker_id, correlation_id (null when not
  given), data (an object).

Files:
  HOME/coordination/config/system.json      read: must exist (`harness init --home DIR`);
                                            lock_timeout_s and durability are honoured
  HOME/coordination/locks/events.lock       flock(1)ed (exclusive) around the append;
                                            never truncated or removed
  HOME/coordination/dashboard-events.jsonl  one whole line appended with one write(2)
                                            (created 0600 if absent); fdatasync'ed when
                                            durability is "fsync"; a failed write is cut
                                            off again (no torn line); never through a
                                            symbolic link

Redaction (as coordination/redact.py): token shapes (sk-..., ghp_..., github_pat_...,
AKIA..., Bearer/Basic credentials, xox?-...), KEY=value / KEY: value with a secret-looking
KEY, the values of secret-looking keys of --data, and the redact_patterns of system.json
(read with jq when set) become [redacted]. Error messages are masked too.

Exit status:
  0   the event was appended; its event_id is on stdout
  1   the append failed (e.g. disk full); the file is as it was
  2   bad input (missing or invalid type, unknown severity, invalid task or worker id,
      invalid or non-object data,
      oversize message or data, text that is not UTF-8, unknown option), or the home is
      not initialised or not writable, or the events file or its folder is a symbolic
      link; nothing was written
  75  events.lock stayed held longer than lock_timeout_s; nothing was written
EOF
}

LC_ALL=C

type_=""
severity="info"
message=""
source_=""
task=""
worker=""
correlation=""
data=""
have_data=0
home_opt=""
positional=()
# Set by the helpers of lib/common.sh (printf -v).
home="" lock_timeout="" durability="" event_id="" redact_json=""
j_type="" j_message="" j_source="" j_task="" j_worker="" j_correlation=""
j_event_id="" j_timestamp=""

# cut_partial_line FILE LINE: after a failed append of LINE, truncate FILE before the part
# of LINE that reached it (a prefix of LINE, found by the line's unique event_id); status
# 1 when that cannot be done. Forks (stat, tail, truncate) only on this failure path.
cut_partial_line() {
    local file=$1 line=$2 size chunk head k
    size=$(stat -c %s -- "$file") || return 1
    chunk=$(tail -c $((${#line} + 1)) -- "$file") || return 1
    head=${line:0:64}  # holds the event_id: unique, so found only where our line began
    if [[ $chunk == *"$head"* ]]; then
        k=$((${#chunk} - ${#chunk%"$head"*}))
        [[ ${line:0:k} == "${chunk: -k}" ]] || return 1
    else
        for ((k = ${#head} - 1; k > 0; k--)); do
            [[ $chunk == *"${line:0:k}" ]] && break
        done
    fi
    ((k == 0)) || truncate -s $((size - k)) -- "$file"
}

need_value() {
    (($2 >= 2)) || die 2 "option $1 needs a value (see --help)"
}

while (($# > 0)); do
    opt=$1
    case $opt in
        --*=*)
            # --option=VALUE: split once and re-dispatch as "--option VALUE".
            shift
            set -- "${opt%%=*}" "${opt#*=}" "$@"
            continue
            ;;
    esac
    case $opt in
        -h | --help) usage; exit 0 ;;
        --type) need_value "$opt" $#; type_=$2; shift 2 ;;
        --severity) need_value "$opt" $#; severity=$2; shift 2 ;;
        --message) need_value "$opt" $#; message=$2; shift 2 ;;
        --source) need_value "$opt" $#; source_=$2; shift 2 ;;
        --task) need_value "$opt" $#; task=$2; shift 2 ;;
        --worker) need_value "$opt" $#; worker=$2; shift 2 ;;
        --correlation) need_value "$opt" $#; correlation=$2; shift 2 ;;
        --data) need_value "$opt" $#; data=$2; have_data=1; shift 2 ;;
        --home) need_value "$opt" $#; home_opt=$2; shift 2 ;;
        --) shift; positional+=("$@"); break ;;
        -?*) die 2 "unknown option $opt (see --help)" ;;
        *) positional+=("$opt"); shift ;;
    esac
done

# Older form: TYPE [DATA_JSON] [SOURCE].
if ((${#positional[@]} > 0)); then
    ((${#positional[@]} <= 3)) || die 2 "too many arguments: expected TYPE [DATA_JSON] [SOURCE] (see --help)"
    [[ -z $type_ ]] || die 2 "the event type is given both by --type and as an argument"
    type_=${positional[0]}
    if ((${#positional[@]} >= 2)) && [[ -n ${positional[1]} ]]; then
        ((have_data == 0)) || die 2 "data is given both by --data and as an argument"
        data=${positional[1]}
        have_data=1
    fi
    if ((${#positional[@]} >= 3)); then
        [[ -z $source_ ]] || die 2 "the source is given both by --source and as an argument"
        source_=${positional[2]}
    fi
fi

# -- validate (nothing is written on any failure) -------------------------------------------
[[ -n $type_ ]] || die 2 "missing event type: pass --type TYPE (see --help)"
[[ $type_ =~ ^[a-z][a-z0-9_.-]{0,63}$ ]] \
    || die 2 "event type '$type_' must match ^[a-z][a-z0-9_.-]{0,63}\$"
case $severity in
    debug | info | warning | error | critical) ;;
    *) die 2 "unknown severity '$severity'; use one of debug, info, warning, error, critical" ;;
esac
((${#message} <= 16384)) || die 2 "event message is over 16384 bytes"
[[ -n $source_ ]] || source_="emit-event.sh"
# Task and worker ids name files (logs/tasks/<task_id>.log, worker-specs/.../<id>.json):
# the id grammar of coordination/ids.py, so no id can name a path outside its folder.
id_re='^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'
[[ -z $task || $task =~ $id_re ]] || die 2 "--task '$task' is not a valid task id (letters, digits, '.', '_', '-', at most 128, starting with a letter or digit)"
[[ -z $worker || $worker =~ $id_re ]] || die 2 "--worker '$worker' is not a valid worker id (letters, digits, '.', '_', '-', at most 128, starting with a letter or digit)"

json_quote j_type "$type_"
json_quote j_message "$message" || die 2 "--message is not valid UTF-8"
json_quote j_source "$source_" || die 2 "--source is not valid UTF-8"
json_quote_or_null j_task "$task" || die 2 "--task is not valid UTF-8"
json_quote_or_null j_worker "$worker" || die 2 "--worker is not valid UTF-8"
json_quote_or_null j_correlation "$correlation" || die 2 "--correlation is not valid UTF-8"

# -- the home ------------------------------------------------------------------------------
harness_resolve_home home "$home_opt"
harness_require_home "$home"
events=$HARNESS_COORD/dashboard-events.jsonl
lockfile=$HARNESS_COORD/locks/events.lock
[[ -d $HARNESS_COORD/locks ]] || die 2 "$HARNESS_COORD/locks is missing; run \`harness init --home $home\`"
if [[ -e $events ]]; then
    [[ -f $events && -w $events ]] || die 2 "$events is not a writable file"
else
    [[ -w $HARNESS_COORD ]] || die 2 "$HARNESS_COORD is not writable"
fi
command -v flock >/dev/null 2>&1 || die 2 "flock(1) is not installed (package util-linux)"
harness_config_number lock_timeout lock_timeout_s 30
harness_config_string durability durability fsync

# -- redact (coordination/redact.py: the same patterns, plus system.json redact_patterns) ----
harness_redact message "$message"
((${#message} <= 16384)) || die 2 "event message is over 16384 bytes"
json_quote j_message "$message" || die 2 "--message is not valid UTF-8"
j_data="{}"
if ((have_data)); then
    command -v jq >/dev/null 2>&1 || die 2 "--data needs jq, which is not installed"
    harness_redact_patterns_json redact_json
    # Exactly one JSON value, an object; redacted and compacted. (jq reads it from stdin.)
    if ! j_data=$(jq -cn --argjson pats "$redact_json" "$_HR_JQ"'
                   [inputs] | if length != 1 then error("data must be one JSON value")
                   elif (.[0] | type) != "object" then error("data must be a JSON object")
                   else .[0] | red($pats) end' 2>&1 <<<"$data"); then
        j_data=${j_data//$'\n'/ }
        die 2 "invalid event data: ${j_data#jq: error (at *): }"
    fi
    ((${#j_data} <= 65536)) || die 2 "event data is over 65536 bytes of JSON"
fi

# -- append under locks/events.lock --------------------------------------------------------
# Opened for append (O_CREAT, never O_TRUNC), like coordination.locks; never a link.
if [[ -L $lockfile || -L $HARNESS_COORD/locks ]]; then
    die 2 "$lockfile (or its folder) is a symbolic link; harness does not follow links inside the home (see \`harness doctor\`)"
fi
if ! { exec {lock_fd}>>"$lockfile"; } 2>/dev/null; then
    die 2 "cannot open $lockfile for locking"
fi
if ! flock -x -w "$lock_timeout" "$lock_fd"; then
    die 75 "timed out after ${lock_timeout}s waiting for $lockfile (see \`fuser $lockfile\`)"
fi
# Opened only under the lock: a rotation (also under the lock) never strands this line.
# Never through a link out of the home (bash has no O_NOFOLLOW: checked just before).
if [[ -L $events || -L $HARNESS_COORD ]]; then
    die 2 "$events (or its folder) is a symbolic link; harness does not follow links inside the home (see \`harness doctor\`)"
fi
if ! { exec {events_fd}>>"$events"; } 2>/dev/null; then
    die 2 "cannot open $events for appending"
fi

# From here to the end, TERM/INT/HUP are deferred (bash runs traps between commands), so a
# signal never cuts the line in half; it is re-raised once the line is out.
pending_signal=""
trap 'pending_signal=TERM' TERM
trap 'pending_signal=INT' INT
trap 'pending_signal=HUP' HUP

# The clock is read under the lock, so the file stays in timestamp order.
harness_clock
harness_new_event_id event_id
json_quote j_event_id "$event_id"
json_quote j_timestamp "$HARNESS_NOW_ISO"
printf -v line '{"event_id":%s,"timestamp":%s,"type":%s,"severity":"%s","source":%s,"message":%s,"task_id":%s,"worker_id":%s,"correlation_id":%s,"data":%s}' \
    "$j_event_id" "$j_timestamp" "$j_type" "$severity" "$j_source" "$j_message" \
    "$j_task" "$j_worker" "$j_correlation" "$j_data"

# One write(2) of the whole line to the O_APPEND descriptor. bash's printf goes through a
# stdio buffer (1-4 KiB), so a longer line would leave in several writes: dd writes it
# in one block instead (the here-string adds the newline: ${#line} + 1 bytes).
# A failed write (disk full) may leave the start of the line at the end of the file: it is
# cut off again, under the lock (cut_partial_line), so no torn fragment is ever glued to
# the next line.
written=0
if ((${#line} < 1000)); then
    { printf '%s\n' "$line" >&"$events_fd"; } 2>/dev/null && written=1
else
    { dd bs=$((${#line} + 1)) count=1 iflag=fullblock status=none <<<"$line" \
        >&"$events_fd"; } 2>/dev/null && written=1
fi
if ((!written)); then
    cut_partial_line "$events" "$line" \
        || die 1 "could not append to $events (disk full?) nor cut off the part written: run \`harness doctor --repair\`"
    die 1 "could not append to $events (disk full?); the file is as it was"
fi
if [[ $durability == fsync ]]; then
    sync -d -- "$events" || die 1 "fdatasync of $events failed"
fi
exec {events_fd}>&- {lock_fd}>&-

printf '%s\n' "$event_id"
trap - TERM INT HUP
if [[ -n $pending_signal ]]; then
    kill -s "$pending_signal" "$$"
fi
