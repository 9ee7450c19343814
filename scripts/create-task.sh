#!/usr/bin/env bash
# Publish one task request in HOME/coordination/inbox/ (run --help). No Python: jq builds
# the JSON; the queue validates and ingests it at its next operation.
set -euo pipefail
set -o noclobber # the temp file is created with O_EXCL

_self=${BASH_SOURCE[0]}
[[ -L $_self ]] && _self=$(readlink -f -- "$_self")
_here=${_self%/*}
[[ $_here == "$_self" ]] && _here=.
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$_here/lib/common.sh"

usage() {
    cat <<'EOF'
Usage: create-task.sh --description D [--priority P] [--type T] [--dedup-key K]
                      [--max-attempts N] [--timeout S] [--depends-on ID]...
                      [--correlation ID] [--not-before TS] [--budget N] [--home DIR]
                      [-- CMD [ARG]...]

Publish a task request in the harness inbox and print its task id. The queue admits it
(validates, deduplicates, checks dependencies) at its next write by any process: the
supervisor's next pass, a worker's claim, `harness task add`, `harness queue ingest` (now),
and `harness task list` or `harness status` when the queue lock is free (they do not wait
for it; while it is busy they report the request as pending in the inbox). Until then it is
not in task-queue.json. A request the queue cannot accept moves to inbox/rejected/ with a
.reason file.

Options:
  --description D     what the task is (required, non-empty, at most max_description_bytes)
  --priority P        critical | high | medium | low (default: medium)
  --type T            worker type from config/worker-types.json (default: default)
  --dedup-key K       at most one live task per key; 1-256 of [A-Za-z0-9._:/@+-]
  --max-attempts N    attempts before the task is dead-lettered, 1..1000
                      (default: the worker type's, else default_max_attempts)
  --timeout S         seconds per attempt, a positive number (default: the worker type's)
  --depends-on ID     run only after task ID completed (repeatable)
  --correlation ID    correlation id carried into events; same syntax as --dedup-key
  --not-before TS     do not start before UTC YYYY-MM-DDTHH:MM:SS[.mmm]Z
  --budget N          token budget, a non-negative integer (default: the worker type's)
  --home DIR          the harness home (default: $HARNESS_HOME, else the first entry of
                      $STATE_DIRECTORY, else ${XDG_STATE_HOME:-~/.local/state}/harness)
  -- CMD [ARG]...     the task's argv, stored exactly (never run through a shell). Without
                      it the request has no command and the worker type's command_template
                      applies at ingestion (the type must have one).
  -h, --help          show this help and exit
Every option also accepts the --option=VALUE form.

Request written (JSON object; absent options are left out):
  task_id ("t-YYYYmmddTHHMMSSmmm-<10 hex>"), description, priority, worker_type, command,
  max_attempts, timeout_s, depends_on, not_before, dedup_key, correlation_id, created_at,
  budget

Files:
  HOME/coordination/config/system.json        read: must exist (`harness init --home DIR`);
                                              size limits and durability are honoured
  HOME/coordination/config/worker-types.json  read: the worker type must exist
  HOME/coordination/inbox/.tmp-<task_id>      written, then renamed to <task_id>.json
  HOME/coordination/inbox/<task_id>.json      the published request (fsynced with its
                                              directory when durability is "fsync")
No lock is taken: publishing by rename is atomic and the queue drains the inbox under
locks/queue.lock.

Exit status:
  0   the request is in the inbox; its task id is on stdout
  1   writing the request failed (e.g. disk full); nothing was published
  2   bad input (missing description, unknown priority or worker type, bad number, id or
      timestamp, text that is not UTF-8, unknown option), or the home is not initialised
      or not writable; nothing was written
EOF
}

LC_ALL=C

description=""
have_description=0
priority="medium"
worker_type="default"
dedup_key=""
max_attempts=""
timeout_s=""
correlation=""
not_before=""
budget=""
home_opt=""
depends_on=()
command_argv=()
have_command=0
# Set by the helpers of lib/common.sh (printf -v).
home="" task_id="" max_description_bytes="" max_command_bytes="" max_depends_on=""
durability=""

need_value() {
    (($2 >= 2)) || die 2 "option $1 needs a value (see --help)"
}

while (($# > 0)); do
    opt=$1
    case $opt in
        --*=*)
            shift
            set -- "${opt%%=*}" "${opt#*=}" "$@"
            continue
            ;;
    esac
    case $opt in
        -h | --help) usage; exit 0 ;;
        --description) need_value "$opt" $#; description=$2; have_description=1; shift 2 ;;
        --priority) need_value "$opt" $#; priority=$2; shift 2 ;;
        --type) need_value "$opt" $#; worker_type=$2; shift 2 ;;
        --dedup-key) need_value "$opt" $#; dedup_key=$2; shift 2 ;;
        --max-attempts) need_value "$opt" $#; max_attempts=$2; shift 2 ;;
        --timeout) need_value "$opt" $#; timeout_s=$2; shift 2 ;;
        --depends-on) need_value "$opt" $#; depends_on+=("$2"); shift 2 ;;
        --correlation) need_value "$opt" $#; correlation=$2; shift 2 ;;
        --not-before) need_value "$opt" $#; not_before=$2; shift 2 ;;
        --budget) need_value "$opt" $#; budget=$2; shift 2 ;;
        --home) need_value "$opt" $#; home_opt=$2; shift 2 ;;
        --)
            shift
            command_argv=("$@")
            ((${#command_argv[@]} == 0)) || have_command=1
            break
            ;;
        -?*) die 2 "unknown option $opt (see --help)" ;;
        *) die 2 "unexpected argument '$opt': put the command after -- (see --help)" ;;
    esac
done

# -- validate what is cheap (the queue re-validates everything at ingestion) ----------------
command -v jq >/dev/null 2>&1 || die 2 "jq is not installed (it builds the request JSON)"
[[ $have_description == 1 && -n $description ]] || die 2 "missing --description (see --help)"
harness_is_utf8 "$description" || die 2 "--description is not valid UTF-8"
case $priority in
    critical | high | medium | low) ;;
    *) die 2 "unknown priority '$priority'; use one of critical, high, medium, low" ;;
esac
[[ -n $worker_type ]] || die 2 "--type must not be empty"
harness_is_utf8 "$worker_type" || die 2 "--type is not valid UTF-8"
token_re='^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}$'
if [[ -n $dedup_key && ! $dedup_key =~ $token_re ]]; then
    die 2 "--dedup-key '$dedup_key' must be 1-256 characters of letters, digits and ._:/@+-"
fi
if [[ -n $correlation && ! $correlation =~ $token_re ]]; then
    die 2 "--correlation '$correlation' must be 1-256 characters of letters, digits and ._:/@+-"
fi
if [[ -n $max_attempts ]]; then
    if [[ ! $max_attempts =~ ^[0-9]{1,4}$ ]] || ((10#$max_attempts < 1 || 10#$max_attempts > 1000)); then
        die 2 "--max-attempts must be an integer 1..1000, got '$max_attempts'"
    fi
    max_attempts=$((10#$max_attempts))
fi
if [[ -n $timeout_s ]]; then
    [[ $timeout_s =~ ^[0-9]{1,12}(\.[0-9]{1,9})?$ && $timeout_s =~ [1-9] ]] \
        || die 2 "--timeout must be a positive number of seconds, got '$timeout_s'"
fi
if [[ -n $budget ]]; then
    [[ $budget =~ ^[0-9]{1,15}$ ]] \
        || die 2 "--budget must be a non-negative integer, got '$budget'"
fi
if [[ -n $not_before ]]; then
    ts_re='^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?Z$'
    [[ $not_before =~ $ts_re ]] \
        || die 2 "--not-before '$not_before' is not a UTC timestamp YYYY-MM-DDTHH:MM:SS.mmmZ"
fi
id_re='^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'
for dep in ${depends_on[@]+"${depends_on[@]}"}; do
    [[ $dep =~ $id_re ]] || die 2 "--depends-on '$dep' is not a valid task id"
done
command_bytes=0
for arg in ${command_argv[@]+"${command_argv[@]}"}; do
    harness_is_utf8 "$arg" || die 2 "the command has an argument that is not valid UTF-8"
    command_bytes=$((command_bytes + ${#arg}))
done

# -- the home ------------------------------------------------------------------------------
harness_resolve_home home "$home_opt"
harness_require_home "$home"
inbox=$HARNESS_COORD/inbox
[[ -d $inbox ]] || die 2 "$inbox is missing; run \`harness init --home $home\`"
[[ -w $inbox ]] || die 2 "$inbox is not writable"
harness_config_number max_description_bytes max_description_bytes 65536
harness_config_number max_command_bytes max_command_bytes 131072
harness_config_number max_depends_on max_depends_on 100
harness_config_string durability durability fsync
((${#description} <= max_description_bytes)) \
    || die 2 "--description is ${#description} bytes; the limit is $max_description_bytes (max_description_bytes)"
((command_bytes <= max_command_bytes)) \
    || die 2 "the command is $command_bytes bytes; the limit is $max_command_bytes (max_command_bytes)"
((${#depends_on[@]} <= max_depends_on)) \
    || die 2 "--depends-on names ${#depends_on[@]} tasks; the limit is $max_depends_on (max_depends_on)"

types_file=$HARNESS_COORD/config/worker-types.json
if [[ -e $types_file ]]; then
    types_arg=(--slurpfile wt "$types_file")
else
    # What coordination.config.DEFAULT_WORKER_TYPES provides when the file is absent.
    types_arg=(--argjson wt '[{"types":{"default":{"command_template":null},"shell":{"command_template":["bash","-c","{description}"]}}}]')
fi

# -- build the request ---------------------------------------------------------------------
harness_clock
harness_new_task_id task_id
[[ $task_id =~ $id_re ]] || die 1 "generated an invalid task id '$task_id'"

# The argv goes in as jq positional arguments, each prefixed with "x" so that jq never
# mistakes one for an option (e.g. "-c" or "--arg"); the filter strips the prefix.
prefixed=()
for arg in ${command_argv[@]+"${command_argv[@]}"}; do
    prefixed+=("x$arg")
done

# shellcheck disable=SC2016  # $names are jq variables, not shell ones
filter='
def opt($key; $value; f): if $value == "" then {} else {($key): ($value | f)} end;
($wt[0].worker_types // $wt[0].types // {}) as $types
| if ($types | type) != "object" then
    error("worker-types.json has no \"worker_types\" object")
  elif ($types | has($worker_type) | not) then
    error("unknown worker type \($worker_type | @json); known: \($types | keys | join(", ")) (coordination/config/worker-types.json)")
  elif $has_command == 0 and (($types[$worker_type].command_template // []) | length) == 0 then
    error("no command given and worker type \($worker_type | @json) has no command_template; put the command after --")
  else . end
| {task_id: $task_id, description: $description, priority: $priority,
   worker_type: $worker_type}
  + (if $has_command == 1 then {command: [$ARGS.positional[] | .[1:]]} else {} end)
  + opt("max_attempts"; $max_attempts; tonumber)
  + opt("timeout_s"; $timeout_s; tonumber)
  + (if $depends_on == "" then {} else {depends_on: ($depends_on | split(" "))} end)
  + opt("not_before"; $not_before; .)
  + opt("dedup_key"; $dedup_key; .)
  + opt("correlation_id"; $correlation; .)
  + {created_at: $created_at}
  + opt("budget"; $budget; tonumber)'

if ! request=$(jq -cn \
    --arg task_id "$task_id" --arg description "$description" --arg priority "$priority" \
    --arg worker_type "$worker_type" --arg max_attempts "$max_attempts" \
    --arg timeout_s "$timeout_s" --arg depends_on "${depends_on[*]-}" \
    --arg not_before "$not_before" --arg dedup_key "$dedup_key" \
    --arg correlation "$correlation" --arg created_at "$HARNESS_NOW_ISO" \
    --arg budget "$budget" --argjson has_command "$have_command" \
    "${types_arg[@]}" "$filter" --args ${prefixed[@]+"${prefixed[@]}"} 2>&1); then
    request=${request//$'\n'/ }
    die 2 "${request#jq: error (at *): }"
fi

[[ $request == "{"*"}" ]] || die 1 "jq did not produce a request object: $request"

# -- publish: temp file in the inbox, then rename ------------------------------------------
final=$inbox/$task_id.json
tmp=$inbox/.tmp-$task_id
[[ ! -e $final ]] || die 1 "task id $task_id is already pending in the inbox"
cleanup() {
    if [[ -n ${tmp:-} && -e $tmp ]]; then
        rm -f -- "$tmp"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! { printf '%s\n' "$request" >"$tmp"; } 2>/dev/null; then
    die 1 "could not write $tmp (disk full or not writable?)"
fi
if [[ $durability == fsync ]]; then
    sync -- "$tmp" || die 1 "fsync of $tmp failed"
fi
mv -T -- "$tmp" "$final" || die 1 "could not rename $tmp to $final"
tmp=""
if [[ $durability == fsync ]]; then
    sync -- "$inbox" || die 1 "fsync of $inbox failed"
fi

printf '%s\n' "$task_id"
