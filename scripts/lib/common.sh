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

# die CODE MSG...: print "script: MSG" to stderr and exit with CODE.
die() {
    local code=$1
    shift
    printf '%s: %s\n' "${0##*/}" "$*" >&2
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
