# shellcheck shell=bash
# Helpers shared by the harness shell scripts (sourced, never executed).
#
# Contract (see coordination/paths.py, clock.py, events.py):
# - home: --home DIR, else $HARNESS_HOME, else $STATE_DIRECTORY (first entry), else
#   ${XDG_STATE_HOME:-$HOME/.local/state}/harness; initialised when
#   HOME/coordination/config/system.json exists.
# - timestamps: UTC YYYY-MM-DDTHH:MM:SS.mmmZ; ids: PREFIX-YYYYmmddTHHMMSSmmm-HEX.
#
# Every helper that produces a value writes it into a variable named by its first argument
# (printf -v), so callers never pay for a $(...) fork. Requires bash >= 4.3; bash >= 5.0
# ($EPOCHREALTIME) and >= 5.1 ($SRANDOM) avoid forking date/od.

if [[ -n ${_HARNESS_COMMON_SH:-} ]]; then
    return 0
fi
_HARNESS_COMMON_SH=1

# What the scripts create is private whatever the caller's umask (0700 folders, 0600
# files); harness_require_home widens it to 027 for a home shared with a group.
umask 077

# die CODE MSG...: print "script: MSG" to stderr (secrets masked: a message may quote the
# input) and exit with CODE.
die() {
    local code=$1 _die_msg
    shift
    harness_redact _die_msg "$*"
    printf '%s: %s\n' "${0##*/}" "$_die_msg" >&2
    exit "$code"
}

# harness_normpath OUTVAR PATH: PATH made absolute against $PWD, with "//", "/./" and a
# trailing "/" removed (what Python's Path(...).absolute() does; ".." is kept).
harness_normpath() {
    local _hn_p=$2
    [[ $_hn_p == /* ]] || _hn_p=${PWD%/}/$_hn_p
    while [[ $_hn_p == *//* ]]; do _hn_p=${_hn_p//\/\//\/}; done
    while [[ $_hn_p == */./* ]]; do _hn_p=${_hn_p//\/.\//\/}; done
    [[ $_hn_p == */. ]] && _hn_p=${_hn_p%/.}
    [[ $_hn_p == ?*/ ]] && _hn_p=${_hn_p%/}
    [[ -n $_hn_p ]] || _hn_p=/
    printf -v "$1" '%s' "$_hn_p"
}

# harness_expanduser OUTVAR PATH: expand a leading "~" or "~/" to the user's home.
harness_expanduser() {
    local _he_p=$2 _he_home=${HOME:-}
    if [[ -z $_he_home ]]; then
        _he_home=~
    fi
    case $_he_p in
        \~) _he_p=$_he_home ;;
        \~/*) _he_p=$_he_home/${_he_p#\~/} ;;
    esac
    printf -v "$1" '%s' "$_he_p"
}

# harness_resolve_home OUTVAR [EXPLICIT]: the home directory, resolved exactly like the
# Python CLI (coordination.paths.resolve_home). EXPLICIT is the --home value ("" = unset).
harness_resolve_home() {
    local _hr_out=$1 _hr_explicit=${2:-} _hr_p
    if [[ -n $_hr_explicit ]]; then
        harness_expanduser _hr_p "$_hr_explicit"
    elif [[ -n ${HARNESS_HOME:-} ]]; then
        harness_expanduser _hr_p "$HARNESS_HOME"
    elif [[ -n ${STATE_DIRECTORY:-} ]]; then
        _hr_p=${STATE_DIRECTORY%%:*}
    else
        # shellcheck disable=SC2088  # the tilde is expanded by harness_expanduser
        _hr_p=${XDG_STATE_HOME:-"~/.local/state"}
        harness_expanduser _hr_p "$_hr_p"
        _hr_p=${_hr_p%/}/harness
    fi
    harness_normpath "$_hr_out" "$_hr_p"
}

# harness_require_home HOME: exit 2 unless HOME is an initialised harness home. Sets
# HARNESS_COORD (HOME/coordination) and HARNESS_SYSTEM_JSON (the text of system.json,
# read with a builtin: no fork).
harness_require_home() {
    local home=$1
    HARNESS_COORD=$home/coordination
    # A shared home (harness init --group) has setgid folders: its files are 0640.
    if [[ -g $home ]]; then umask 027; else umask 077; fi
    local system=$HARNESS_COORD/config/system.json
    if [[ ! -f $system ]]; then
        die 2 "$home is not an initialised harness home (missing $system); run \`harness init --home $home\`"
    fi
    HARNESS_SYSTEM_JSON=
    if [[ ! -r $system ]]; then
        die 2 "cannot read $system"
    fi
    # read -d '' stops at end of file with status 1: the text is read all the same.
    IFS= read -r -d '' HARNESS_SYSTEM_JSON <"$system" || true
    _HR_LOADED=""  # redact_patterns are read from this system.json on the next use
}

# harness_config_number OUTVAR KEY DEFAULT: a top-level number of system.json (a cheap regex
# on the text read by harness_require_home; the Python loader is the validating reader).
harness_config_number() {
    local _cn_re="\"$2\"[[:space:]]*:[[:space:]]*(-?[0-9]+(\\.[0-9]+)?([eE][-+]?[0-9]+)?)"
    if [[ ${HARNESS_SYSTEM_JSON:-} =~ $_cn_re ]]; then
        printf -v "$1" '%s' "${BASH_REMATCH[1]}"
    else
        printf -v "$1" '%s' "$3"
    fi
}

# harness_config_string OUTVAR KEY DEFAULT: a top-level string of system.json made only of
# [A-Za-z0-9_.-] (enough for "durability": "fsync"|"none").
harness_config_string() {
    local _cs_re="\"$2\"[[:space:]]*:[[:space:]]*\"([A-Za-z0-9_.-]*)\""
    if [[ ${HARNESS_SYSTEM_JSON:-} =~ $_cs_re ]]; then
        printf -v "$1" '%s' "${BASH_REMATCH[1]}"
    else
        printf -v "$1" '%s' "$3"
    fi
}

# harness_clock: sample the wall clock once and set HARNESS_NOW_ISO
# (YYYY-MM-DDTHH:MM:SS.mmmZ) and HARNESS_NOW_COMPACT (YYYYmmddTHHMMSSmmm), both UTC with
# milliseconds truncated like coordination.clock. Uses $EPOCHREALTIME (no fork).
harness_clock() {
    local rt=${EPOCHREALTIME:-} secs frac
    if [[ -z $rt ]]; then
        rt=$(date -u +%s.%N)
    fi
    secs=${rt%%[.,]*}
    frac=${rt#"$secs"}
    frac=${frac#[.,]}000
    # shellcheck disable=SC2034  # HARNESS_NOW_ISO is read by the scripts sourcing this file
    TZ=UTC0 printf -v HARNESS_NOW_ISO '%(%Y-%m-%dT%H:%M:%S)T.%sZ' "$secs" "${frac:0:3}"
    TZ=UTC0 printf -v HARNESS_NOW_COMPACT '%(%Y%m%dT%H%M%S)T%s' "$secs" "${frac:0:3}"
}

# harness_rand_hex OUTVAR NCHARS: NCHARS (<= 64) random lowercase hex digits, from $SRANDOM
# (bash >= 5.1, no fork) or /dev/urandom.
harness_rand_hex() {
    local _rh_n=$2 _rh_hex=""
    if ((BASH_VERSINFO[0] > 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] >= 1))); then
        local _rh_chunk
        while ((${#_rh_hex} < _rh_n)); do
            printf -v _rh_chunk '%08x' "$SRANDOM"
            _rh_hex+=$_rh_chunk
        done
    else
        _rh_hex=$(od -An -vtx1 -N"$(((_rh_n + 1) / 2))" /dev/urandom)
        _rh_hex=${_rh_hex//[!0-9a-f]/}
    fi
    printf -v "$1" '%s' "${_rh_hex:0:_rh_n}"
}

# harness_new_event_id OUTVAR: ev-<HARNESS_NOW_COMPACT>-<12 hex>; call harness_clock first.
harness_new_event_id() {
    local _ne_r
    harness_rand_hex _ne_r 12
    printf -v "$1" 'ev-%s-%s' "$HARNESS_NOW_COMPACT" "$_ne_r"
}

# harness_new_task_id OUTVAR: t-<HARNESS_NOW_COMPACT>-<10 hex>; call harness_clock first.
harness_new_task_id() {
    local _nt_r
    harness_rand_hex _nt_r 10
    printf -v "$1" 't-%s-%s' "$HARNESS_NOW_COMPACT" "$_nt_r"
}

# Valid UTF-8 (RFC 3629: no overlongs, no surrogates, at most U+10FFFF), as bytes.
_HARNESS_UTF8_RE=$'^([\x01-\x7f]|[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf][\x80-\xbf]|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf][\x80-\xbf]|[\xf1-\xf3][\x80-\xbf][\x80-\xbf][\x80-\xbf]|\xf4[\x80-\x8f][\x80-\xbf][\x80-\xbf])*$'

# harness_is_utf8 STRING: status 0 when STRING is valid UTF-8 (ASCII is checked for free).
harness_is_utf8() {
    local LC_ALL=C
    [[ $1 != *[$'\x80'-$'\xff']* ]] || [[ $1 =~ $_HARNESS_UTF8_RE ]]
}

# harness_byte_length OUTVAR STRING: the length of STRING in bytes (whatever the locale).
harness_byte_length() {
    local LC_ALL=C
    printf -v "$1" '%d' "${#2}"
}

# json_quote OUTVAR STRING: STRING as a JSON string literal, quotes included, in pure bash.
# Escapes backslash, double quote, \n \r \t, and every other control character as \u00XX;
# other bytes pass through. Status 1 (OUTVAR untouched) when STRING is not valid UTF-8.
json_quote() {
    local LC_ALL=C
    local _jq_s=$2 _jq_bs=\\ _jq_q='"'
    if [[ $_jq_s == *[$'\x80'-$'\xff']* ]] && [[ ! $_jq_s =~ $_HARNESS_UTF8_RE ]]; then
        return 1
    fi
    if [[ $_jq_s == *[\"\\$'\x01'-$'\x1f']* ]]; then
        _jq_s=${_jq_s//"$_jq_bs"/"$_jq_bs$_jq_bs"}
        _jq_s=${_jq_s//"$_jq_q"/"$_jq_bs$_jq_q"}
        if [[ $_jq_s == *[$'\x01'-$'\x1f']* ]]; then
            _jq_s=${_jq_s//$'\n'/"${_jq_bs}n"}
            _jq_s=${_jq_s//$'\r'/"${_jq_bs}r"}
            _jq_s=${_jq_s//$'\t'/"${_jq_bs}t"}
            local _jq_i _jq_hex _jq_ch
            for ((_jq_i = 1; _jq_i < 32; _jq_i++)); do
                [[ $_jq_s == *[$'\x01'-$'\x1f']* ]] || break
                printf -v _jq_hex '%02x' "$_jq_i"
                printf -v _jq_ch '%b' "\\x$_jq_hex"
                _jq_s=${_jq_s//"$_jq_ch"/"${_jq_bs}u00$_jq_hex"}
            done
        fi
    fi
    printf -v "$1" '"%s"' "$_jq_s"
}

# json_quote_or_null OUTVAR STRING: like json_quote, but null for an empty STRING.
json_quote_or_null() {
    if [[ -z $2 ]]; then
        printf -v "$1" 'null'
    else
        json_quote "$1" "$2"
    fi
}

# -- redaction (the shell side of coordination/redact.py) ---------------------------------
# Built-in token shapes, as POSIX extended regexes that bash's [[ =~ ]] and jq read alike:
# group 1 is the context before the shape (kept), group 2 the visible prefix (kept), group
# _HR_SECRET[i] the secret (masked); what the match has after the secret is kept too.
# _HR_STYLE: "e" masks as "…[redacted]", "p" as "[redacted]". _HR_NOCASE: matched without
# case. _HR_CHECK: an "assignment" value that is only digits, already "[redacted]", or a
# Bearer/Basic keyword is kept (as Python's lookaheads do). Keep in step with redact.py
# (tests/test_secrets.py compares both on the same texts).
_HR_KEY='[A-Za-z0-9_.-]*(token|secret|password|passwd|api_?key|authorization|credential|private_?key|access_?key)[A-Za-z0-9_.-]*'
_HR_RE=(
    '(^|[^A-Za-z0-9_])(([Bb]earer|[Bb]asic)[[:space:]]+)([A-Za-z0-9._~+/-]{8,}=*)'
    '(^|[^A-Za-z0-9_-])(sk-)((ant-)?[A-Za-z0-9_-]{16,})'
    '(^|[^A-Za-z0-9_])(github_pat_)([A-Za-z0-9_]{20,})'
    '(^|[^A-Za-z0-9_])(gh[pousr]_)([A-Za-z0-9]{20,})'
    '(^|[^A-Za-z0-9])(AKIA)([0-9A-Z]{16})([^0-9A-Z]|$)'
    '(^|[^A-Za-z0-9])(xox[baprs]-)([A-Za-z0-9-]{10,})'
    "(^|[^A-Za-z0-9_])(${_HR_KEY}\"?[[:space:]]*[=:][[:space:]]*\"?)([^[:space:]\"',;&]+)"
)
# A cheap glob that a text must match before the regex runs (most texts match none).
_HR_GLOB=('*[Bb][ea][as][ri][ec]*' '*sk-*' '*github_pat_*' '*gh[pousr]_*' '*AKIA*'
    '*xox[baprs]-*' '*[=:]*')
_HR_SECRET=(4 3 3 3 3 3 4)
_HR_STYLE=(p e e e e e p)
_HR_NOCASE=(0 0 0 0 0 0 1)
_HR_CHECK=(0 0 0 0 0 0 1)
_HR_EXTRA=()
_HR_LOADED=""

# harness_redact_init: read redact_patterns of system.json (HARNESS_SYSTEM_JSON, set by
# harness_require_home) into _HR_EXTRA. jq runs only when the key is set and not empty.
harness_redact_init() {
    _HR_EXTRA=()
    _HR_LOADED=1
    local text=${HARNESS_SYSTEM_JSON:-} empty_re='"redact_patterns"[[:space:]]*:[[:space:]]*\[[[:space:]]*\]'
    [[ $text == *'"redact_patterns"'* ]] || return 0
    [[ $text =~ $empty_re ]] && return 0
    command -v jq >/dev/null 2>&1 || die 2 "redact_patterns in system.json needs jq, which is not installed"
    local line
    while IFS= read -r line; do
        [[ -n $line ]] && _HR_EXTRA+=("$line")
    done < <(jq -r '.redact_patterns // [] | .[] | strings' <<<"$text" 2>/dev/null)
}

# _harness_redact_pattern RE SECRET_GROUP STYLE NOCASE CHECK: mask every match in _hr_text.
_harness_redact_pattern() {
    local re=$1 group=$2 style=$3 nocase=$4 check=$5
    local out="" rest=$_hr_text m pre keep secret before post mask next
    local -a found
    while :; do
        ((nocase)) && shopt -s nocasematch
        if [[ $rest =~ $re ]]; then found=("${BASH_REMATCH[@]}"); else found=(); fi
        ((nocase)) && shopt -u nocasematch
        ((${#found[@]} > 0)) || break
        m=${found[0]}
        [[ -n $m ]] || break
        if ((group == 0)); then
            pre="" keep="" secret=$m
        else
            pre=${found[1]} keep=${found[2]} secret=${found[group]}
        fi
        before=${rest%%"$m"*}
        post=${m:${#pre}+${#keep}+${#secret}}
        if ((check)); then
            next=${rest:${#before}+${#m}:1}
            if [[ $secret =~ ^[0-9]+([^A-Za-z0-9_]|$) || $secret == "[redacted]"* ]] \
                || [[ $secret =~ ^[Bb](earer|asic)$ && $next == [[:space:]] ]]; then
                out+=$before$pre$keep
                rest=${rest:${#before}+${#pre}+${#keep}}
                continue
            fi
        fi
        if [[ $style == e ]]; then mask=$'\xe2\x80\xa6[redacted]'; else mask="[redacted]"; fi
        out+=$before$pre$keep$mask
        rest=$post${rest:${#before}+${#m}}
    done
    _hr_text=$out$rest
}

# harness_redact OUTVAR TEXT: TEXT with the built-in token shapes and the configured
# redact_patterns masked, as coordination.redact.redact_text does.
harness_redact() {
    local LC_ALL=C _hr_text=$2 i
    [[ -n $_HR_LOADED ]] || harness_redact_init
    if [[ -n $_hr_text ]]; then
        for i in "${!_HR_RE[@]}"; do
            # shellcheck disable=SC2053  # the right side is a glob on purpose
            [[ $_hr_text == ${_HR_GLOB[i]} ]] || continue
            if ((_HR_CHECK[i])); then  # an assignment needs a secret-looking key word
                local lower=${_hr_text,,}
                [[ $lower == *token* || $lower == *secret* || $lower == *passw* \
                    || $lower == *api*key* || $lower == *authorization* \
                    || $lower == *credential* || $lower == *private*key* \
                    || $lower == *access*key* ]] || continue
            fi
            _harness_redact_pattern "${_HR_RE[i]}" "${_HR_SECRET[i]}" "${_HR_STYLE[i]}" \
                "${_HR_NOCASE[i]}" "${_HR_CHECK[i]}"
        done
        for i in "${!_HR_EXTRA[@]}"; do
            _harness_redact_pattern "${_HR_EXTRA[i]}" 0 p 0 0
        done
    fi
    printf -v "$1" '%s' "$_hr_text"
}

# harness_redact_patterns_json OUTVAR: every pattern harness_redact applies, as the JSON
# array that the jq function red($pats) of _HR_JQ reads.
harness_redact_patterns_json() {
    local _rp_json="" _rp_q _rp_i _rp_flags _rp_mask
    [[ -n $_HR_LOADED ]] || harness_redact_init
    for _rp_i in "${!_HR_RE[@]}"; do
        json_quote _rp_q "${_HR_RE[_rp_i]}"
        _rp_flags='""'; ((_HR_NOCASE[_rp_i])) && _rp_flags='"i"'
        _rp_mask='"[redacted]"'; [[ ${_HR_STYLE[_rp_i]} == e ]] && _rp_mask=$'"\xe2\x80\xa6[redacted]"'
        _rp_json+="${_rp_json:+,}{\"re\":$_rp_q,\"group\":${_HR_SECRET[_rp_i]},\"flags\":$_rp_flags,\"mask\":$_rp_mask,\"check\":${_HR_CHECK[_rp_i]}}"
    done
    for _rp_i in "${!_HR_EXTRA[@]}"; do
        json_quote _rp_q "${_HR_EXTRA[_rp_i]}" || continue
        _rp_json+="${_rp_json:+,}{\"re\":$_rp_q,\"group\":0,\"flags\":\"\",\"mask\":\"[redacted]\",\"check\":0}"
    done
    printf -v "$1" '[%s]' "$_rp_json"
}

# jq definitions: red($pats) masks a JSON value as coordination.redact.redact does: the
# values under secret-looking keys (numbers kept under a key whose only secret part is
# "token": they are counts), and the patterns of $pats in every other string.
# shellcheck disable=SC2016  # $names are jq variables
_HR_JQ='
def mask($tok): if type == "string" then (if . == "" then . else "[redacted]" end)
  elif type == "number" then (if $tok then . else "[redacted]" end)
  elif type == "object" then map_values(mask($tok))
  elif type == "array" then map(mask($tok)) else . end;
def kind: ascii_downcase as $k
  | if ($k | test("secret|password|passwd|api_key|apikey|authorization|credential|private_key|access_key"))
    then "secret" elif ($k | test("token")) then "token" else null end;
def kept($p; $sec; $next): $p.check == 1 and (($sec | test("^[0-9]+([^A-Za-z0-9_]|$)"))
  or ($sec | startswith("[redacted]"))
  or (($sec | test("^[Bb](earer|asic)$")) and ($next | test("^[[:space:]]"))));
def shape($p):
  def go:
    (first(.rest | match($p.re; $p.flags)) // null) as $m
    | if $m == null or $m.string == "" then .out + .rest
      else (.rest | split($m.string)) as $parts
        | ($parts[1:] | join($m.string)) as $after
        | ($m.captures | map(.string // "")) as $c
        | (if $p.group == 0 then ["", "", $m.string] else [$c[0], $c[1], $c[$p.group - 1]] end)
          as [$pre, $keep, $sec]
        | if kept($p; $sec; $after[0:1])
          then {out: (.out + $parts[0] + $pre + $keep),
                rest: ($m.string[($pre + $keep | length):] + $after)}
          else {out: (.out + $parts[0] + $pre + $keep + $p.mask),
                rest: ($m.string[($pre + $keep + $sec | length):] + $after)}
          end
        | go
      end;
  {out: "", rest: .} | go;
def red($pats): if type == "object" then with_entries((.key | kind) as $k
    | if $k == null then .value |= red($pats) else .value |= mask($k == "token") end)
  elif type == "array" then map(red($pats))
  elif type == "string" then reduce $pats[] as $p (.; shape($p)) else . end;
'
