#!/bin/sh
# Gantry agent installer. The hub serves this script at /install.sh with its own URL
# filled in:
#
#   curl -fsSL https://HUB/install.sh | sudo sh -s -- --token TOKEN [--label KEY=VALUE]...
#
# It checks the machine (a table with a fix for each failure), downloads the agent the hub
# serves and verifies its SHA-256, installs it to /usr/local/bin, writes
# /etc/gantry/agent.toml, enrolls, starts the agent under systemd and waits until the hub
# shows it online. Running it again is safe: what is already in place is left alone, and
# the binary is upgraded when the hub serves a different build. On a machine that is
# already enrolled no token is needed: the agent's certificate identifies it to the hub.
#
# Options:
#   --token TOKEN      enrollment token from the operator (or env GANTRY_TOKEN); not
#                      needed on a machine that is already enrolled
#   --label KEY=VALUE  a label for this agent, besides the token's own (repeatable; labels
#                      are set at enrollment, a re-run does not change them)
#   --state-dir DIR    where the agent keeps its identity (default /var/lib/gantry-agent;
#                      a re-run uses the state_dir of /etc/gantry/agent.toml)
#   --dry-run          run the checks (including download and QUIC probe), change nothing
#   --no-systemd       without systemd: run the agent as a background process
#                      (pid file /run/gantry-agent.pid, log /var/log/gantry-agent.log)
#   --timeout SECONDS  how long to wait for the agent to come online (default 60)
#   --uninstall        stop the agent, remove its service and binary (keeps its identity)
#   --purge            --uninstall, then revoke the agent at the hub and delete its
#                      configuration and state (without the binary, a verified copy of
#                      the hub's build signs the revocation and is deleted again)
#   --help             show this help
#
# Exit codes:
#   0  done: installed and online, already up to date, uninstalled, or dry run passed
#   1  unexpected failure of a system command (the message names it)
#   2  usage error: unknown option, missing or malformed argument; nothing was changed
#   3  preflight failed; nothing was changed (the table shows a fix for each failure)
#   4  the hub refused the token or the agent (unknown, expired, used up, org suspended or
#      at its agent limit, agent revoked); nothing was changed
#   5  the hub or its downloads could not be reached, or a checksum did not match;
#      nothing was changed (with --purge: removed here, but not revoked at the hub)
#   6  installed and started, but the hub did not show the agent online in time

set -u

HUB_URL='@GANTRY_HUB_URL@'

BIN=/usr/local/bin/gantry-agent
CONF_DIR=/etc/gantry
CONF=$CONF_DIR/agent.toml
VERSION_FILE=$CONF_DIR/agent.version
DEFAULT_STATE_DIR=/var/lib/gantry-agent
UNIT=/etc/systemd/system/gantry-agent.service
PID_FILE=/run/gantry-agent.pid
LOG_FILE=/var/log/gantry-agent.log

EXIT_FAILURE=1
EXIT_USAGE=2
EXIT_PREFLIGHT=3
EXIT_REFUSED=4
EXIT_UNREACHABLE=5
EXIT_NOT_ONLINE=6

usage() {
    cat <<EOF
Gantry agent installer for $HUB_URL

  curl -fsSL $HUB_URL/install.sh | sudo sh -s -- --token TOKEN [options]
  curl -fsSL $HUB_URL/install.sh | sudo sh -s -- [options]   (already enrolled: upgrade, repair)
  curl -fsSL $HUB_URL/install.sh | sudo sh -s -- --uninstall [--purge]

Options:
  --token TOKEN      enrollment token from the operator (or env GANTRY_TOKEN); not
                     needed on a machine that is already enrolled
  --label KEY=VALUE  a label for this agent, besides the token's own (repeatable; labels
                     are set at enrollment, a re-run does not change them)
  --state-dir DIR    where the agent keeps its identity (default $DEFAULT_STATE_DIR;
                     a re-run uses the state_dir of $CONF)
  --dry-run          run the checks (including download and QUIC probe), change nothing
  --no-systemd       without systemd: run the agent as a background process
                     (pid file $PID_FILE, log $LOG_FILE)
  --timeout SECONDS  how long to wait for the agent to come online (default 60)
  --uninstall        stop the agent, remove its service and binary (keeps its identity)
  --purge            --uninstall, then revoke the agent at the hub and delete its
                     configuration and state (without the binary, a verified copy of
                     the hub's build signs the revocation and is deleted again)
  --help             show this help

Exit codes:
  0  done: installed and online, already up to date, uninstalled, or dry run passed
  1  unexpected failure of a system command (the message names it)
  2  usage error: unknown option, missing or malformed argument; nothing was changed
  3  preflight failed; nothing was changed (the table shows a fix for each failure)
  4  the hub refused the token or the agent; nothing was changed
  5  the hub or its downloads could not be reached, or a checksum did not match
  6  installed and started, but the hub did not show the agent online in time
EOF
}

say() { printf '%s\n' "$*"; }
err() { printf 'error: %s\n' "$*" >&2; }
die() {
    code=$1
    shift
    err "$*"
    exit "$code"
}

# ---- arguments ----

TOKEN=${GANTRY_TOKEN:-}
LABELS=''
STATE_DIR_FLAG=''
DRY_RUN=0
NO_SYSTEMD=0
UNINSTALL=0
PURGE=0
TIMEOUT=60

parse_args() {
    while [ $# -gt 0 ]; do
        case $1 in
            --token)
                [ $# -ge 2 ] || die $EXIT_USAGE "--token needs a value"
                TOKEN=$2
                shift 2
                ;;
            --token=*)
                TOKEN=${1#--token=}
                shift
                ;;
            --label)
                [ $# -ge 2 ] || die $EXIT_USAGE "--label needs KEY=VALUE"
                add_label "$2"
                shift 2
                ;;
            --label=*)
                add_label "${1#--label=}"
                shift
                ;;
            --state-dir)
                [ $# -ge 2 ] || die $EXIT_USAGE "--state-dir needs a directory"
                STATE_DIR_FLAG=$2
                shift 2
                ;;
            --state-dir=*)
                STATE_DIR_FLAG=${1#--state-dir=}
                shift
                ;;
            --dry-run) DRY_RUN=1; shift ;;
            --no-systemd) NO_SYSTEMD=1; shift ;;
            --uninstall) UNINSTALL=1; shift ;;
            --purge) UNINSTALL=1; PURGE=1; shift ;;
            --timeout)
                [ $# -ge 2 ] || die $EXIT_USAGE "--timeout needs a number of seconds"
                TIMEOUT=$2
                shift 2
                ;;
            -h | --help)
                usage
                exit 0
                ;;
            *)
                err "unknown option: $1"
                usage >&2
                exit $EXIT_USAGE
                ;;
        esac
    done
    case $TIMEOUT in
        '' | *[!0-9]*) die $EXIT_USAGE "--timeout must be a whole number of seconds, not '$TIMEOUT'" ;;
    esac
}

# The state directory: --state-dir, else the one an existing configuration names, else the
# default. The systemd unit lets the agent write there and nowhere else, so the script
# and the agent must agree on it.
resolve_state_dir() {
    configured=''
    has_config=0
    if [ -f "$CONF" ]; then
        has_config=1
        configured=$(sed -n "s/^[[:space:]]*state_dir[[:space:]]*=[[:space:]]*[\"']\([^\"']*\)[\"'][[:space:]]*\(#.*\)\{0,1\}$/\1/p" "$CONF" | sed -n 1p)
    fi
    if [ -n "$STATE_DIR_FLAG" ]; then
        STATE_DIR_FLAG=${STATE_DIR_FLAG%/}
        if [ -n "$configured" ] && [ "$configured" != "$STATE_DIR_FLAG" ]; then
            die $EXIT_USAGE "--state-dir $STATE_DIR_FLAG differs from state_dir = \"$configured\" in $CONF; drop --state-dir, or run with --purge first to start over elsewhere"
        fi
        if [ $has_config -eq 1 ] && [ -z "$configured" ] && [ "$STATE_DIR_FLAG" != "$DEFAULT_STATE_DIR" ]; then
            die $EXIT_USAGE "$CONF sets no state_dir, so the agent uses $DEFAULT_STATE_DIR; add state_dir = \"$STATE_DIR_FLAG\" to it, or drop --state-dir"
        fi
    fi
    STATE_DIR=${STATE_DIR_FLAG:-${configured:-$DEFAULT_STATE_DIR}}
    case $STATE_DIR in
        /*/* | /[!/]*) ;;
        *) die $EXIT_USAGE "state directory '$STATE_DIR' must be an absolute path below /" ;;
    esac
    case $STATE_DIR in
        *[!A-Za-z0-9._/-]* | *//* | */../* | */.. | */./* | */.)
            die $EXIT_USAGE "state directory '$STATE_DIR' must be a plain absolute path of letters, digits, '.', '_', '-' and '/'"
            ;;
    esac
}

add_label() {
    case $1 in
        *=*) ;;
        *) die $EXIT_USAGE "label '$1' must be KEY=VALUE" ;;
    esac
    label_key=${1%%=*}
    label_value=${1#*=}
    case $label_key in
        '' | *[!A-Za-z0-9._/-]*) die $EXIT_USAGE "label key '$label_key' must be 1-63 characters of a-z, 0-9, '-', '_', '.', '/'" ;;
    esac
    # The hub's limits, checked here so that a bad label stops the run before it changes
    # anything.
    [ ${#label_key} -le 63 ] || die $EXIT_USAGE "label key '$label_key' is longer than 63 characters"
    [ ${#label_value} -le 63 ] || die $EXIT_USAGE "label value for '$label_key' is longer than 63 characters"
    # Newline-separated: values may hold spaces.
    LABELS="$LABELS$1
"
}

# ---- small helpers ----

# The value of a string field in compact JSON (the hub's answers hold no escaped quotes in
# the fields read here).
json_str() { printf '%s' "$1" | sed -n "s/.*\"$2\":\"\([^\"]*\)\".*/\1/p"; }
json_num() { printf '%s' "$1" | sed -n "s/.*\"$2\":\(-\{0,1\}[0-9][0-9]*\).*/\1/p"; }
json_true() { printf '%s' "$1" | grep -q "\"$2\":true"; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

enrolled() { [ -f "$STATE_DIR/identity.json" ]; }

agent_id() { sed -n 's/.*"agent_id": *"\([^"]*\)".*/\1/p' "$STATE_DIR/identity.json" 2>/dev/null; }

# SHA-256 of the agent's current certificate (DER): how an enrolled machine identifies
# itself to the hub without a token. Read anew each time, as the agent renews it.
agent_cert_sha256() {
    awk '/-----BEGIN CERTIFICATE-----/ {p = 1; next} /-----END CERTIFICATE-----/ {exit} p' "$STATE_DIR/agent.crt" 2>/dev/null |
        base64 -d 2>/dev/null | sha256sum | cut -d' ' -f1
}

# The hub's install facts (POST /api/v1/install/check) into CHECK: for the agent of this
# machine when it is enrolled, else for the token.
hub_check() {
    if enrolled; then
        http POST /api/v1/install/check -H 'Content-Type: application/json' \
            --data "{\"agent_id\":\"$(agent_id)\",\"certificate_sha256\":\"$(agent_cert_sha256)\"}"
    else
        http POST /api/v1/install/check -H 'Content-Type: application/json' --data "{\"token\":\"$TOKEN\"}"
    fi
    CHECK=$(cat "$WORK/http.out")
}

# HTTP to the hub: answers "STATUS BODY-FILE"; STATUS 000 when the hub was not reached.
http() {
    http_method=$1
    http_path=$2
    shift 2
    http_out=$WORK/http.out
    : >"$http_out"
    http_status=$(curl -sS --connect-timeout 10 --max-time 60 -o "$http_out" -w '%{http_code}' -X "$http_method" "$@" "$HUB_URL$http_path" 2>"$WORK/http.err" </dev/null) || http_status=000
}

# ---- preflight table ----

FAILED=0
FAIL_CODE=0

row() {
    printf '  %-9s %-6s %s\n' "$1" "$2" "$3"
}

pass() { row "$1" ok "$2"; }
warn() {
    row "$1" WARN "$2"
    printf '  %-9s %-6s %s\n' '' fix: "$3"
}
fail() {
    row "$1" FAIL "$2"
    printf '  %-9s %-6s %s\n' '' fix: "$3"
    FAILED=1
    code=${4:-$EXIT_PREFLIGHT}
    # The most specific cause decides the exit code: refused, then unreachable, then
    # any other failed check.
    if [ "$(rank "$code")" -gt "$(rank "$FAIL_CODE")" ]; then
        FAIL_CODE=$code
    fi
}

rank() {
    case $1 in
        "$EXIT_REFUSED") echo 3 ;;
        "$EXIT_UNREACHABLE") echo 2 ;;
        "$EXIT_PREFLIGHT") echo 1 ;;
        *) echo 0 ;;
    esac
}

check_local() {
    if [ "$(id -u)" -eq 0 ]; then
        pass root "running as root"
    else
        fail root "running as uid $(id -u)" "run the installer as root: curl -fsSL $HUB_URL/install.sh | sudo sh -s -- --token ..."
    fi

    OS=$(uname -s)
    ARCH=$(uname -m)
    case $OS/$ARCH in
        Linux/x86_64 | Linux/aarch64) pass os/arch "$OS $ARCH" ;;
        *) fail os/arch "$OS $ARCH is not supported" "use Linux on x86_64 or aarch64" ;;
    esac

    missing=''
    for tool in curl sha256sum base64 uname df awk nohup; do
        command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
    done
    if [ -z "$missing" ]; then
        pass tools "curl, sha256sum, base64, df, awk, nohup"
    else
        fail tools "missing:$missing" "install them (Debian/Ubuntu: apt-get install -y curl coreutils)"
    fi

    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        if [ $NO_SYSTEMD -eq 1 ]; then
            pass systemd "present, not used (--no-systemd)"
        else
            pass systemd "present"
        fi
    else
        if [ $NO_SYSTEMD -eq 1 ]; then
            pass systemd "absent; the agent will run as a background process (--no-systemd)"
        else
            fail systemd "systemd is not running here" "re-run with --no-systemd to run the agent as a background process, or run '$BIN run --config $CONF' under your own supervisor"
        fi
    fi

    if [ -S /var/run/docker.sock ] && curl -sf --max-time 5 --unix-socket /var/run/docker.sock http://localhost/_ping >/dev/null 2>&1 </dev/null; then
        pass docker "socket /var/run/docker.sock answers"
    else
        warn docker "no Docker engine at /var/run/docker.sock: deployments are disabled" "install Docker (https://docs.docker.com/engine/install/) and restart the agent to enable deployments"
    fi
}

check_hub() {
    hub_check
    case $http_status in
        200) ;;
        000)
            fail hub "cannot reach $HUB_URL: $(cat "$WORK/http.err")" "check the network and the hub URL; the hub's HTTP port must be reachable from here" $EXIT_UNREACHABLE
            return 1
            ;;
        400 | 401)
            if enrolled; then
                fail agent "$(json_str "$CHECK" message)" "this machine's identity in $STATE_DIR is not the hub's: run the installer with --purge, then install again with a new token" $EXIT_REFUSED
            else
                fail token "$(json_str "$CHECK" message)" "copy the whole token again, or ask the operator for a new one" $EXIT_REFUSED
            fi
            return 1
            ;;
        *)
            fail hub "$HUB_URL answered HTTP $http_status: $(json_str "$CHECK" message)" "try again later, or ask the operator to look at the hub's log" $EXIT_UNREACHABLE
            return 1
            ;;
    esac
    ORG=$(json_str "$CHECK" org)
    PLAN=$(json_str "$CHECK" plan)
    HUB_ADDR=$(json_str "$CHECK" hub_addr)
    pass hub "$HUB_URL (org $ORG${PLAN:+, plan $PLAN})"

    if enrolled; then
        if [ "$(json_str "$CHECK" agent_status)" = revoked ]; then
            fail agent "$(agent_id) was revoked at the hub" "run the installer with --purge, then install again with a new token" $EXIT_REFUSED
        else
            pass agent "this machine is enrolled as $(agent_id) (no token needed)"
        fi
    elif json_true "$CHECK" enrollable; then
        pass token "valid for org $ORG"
    else
        fail token "$(json_str "$CHECK" refusal)" "ask the operator for a new enrollment token" $EXIT_REFUSED
    fi

    need_cpus=$(json_num "$CHECK" min_cpus)
    need_mem=$(json_num "$CHECK" min_memory_mib)
    need_disk=$(json_num "$CHECK" min_disk_mib)
    have_cpus=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
    mem_kib=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)
    have_mem=$((mem_kib / 1024))
    # The file system the state directory is (or will be) on.
    disk_at=$STATE_DIR
    while [ ! -d "$disk_at" ]; do
        disk_at=${disk_at%/*}
        [ -n "$disk_at" ] || disk_at=/
    done
    disk_kib=$(df -Pk "$disk_at" | awk 'NR==2 {print $4}')
    have_disk=$((disk_kib / 1024))
    plan_name=${PLAN:-default}
    if [ "$have_cpus" -ge "${need_cpus:-0}" ]; then
        pass cpu "$have_cpus CPUs (plan needs $need_cpus)"
    else
        fail cpu "$have_cpus CPUs, plan $plan_name needs $need_cpus" "use a machine with at least $need_cpus CPUs, or ask the operator about a plan for smaller hosts"
    fi
    if [ "$have_mem" -ge "${need_mem:-0}" ]; then
        pass memory "$have_mem MiB (plan needs $need_mem MiB)"
    else
        fail memory "$have_mem MiB, plan $plan_name needs $need_mem MiB" "use a machine with at least $need_mem MiB of memory, or ask the operator about a plan for smaller hosts"
    fi
    if [ "$have_disk" -ge "${need_disk:-0}" ]; then
        pass disk "$have_disk MiB free in $disk_at (plan needs $need_disk MiB)"
    else
        fail disk "$have_disk MiB free in $disk_at, plan $plan_name needs $need_disk MiB" "free at least $need_disk MiB in $disk_at"
    fi

    hub_ms=$(json_num "$CHECK" hub_time_ms)
    hub_s=$((hub_ms / 1000))
    skew=$(($(date +%s) - hub_s))
    abs_skew=${skew#-}
    if [ "$abs_skew" -le 5 ]; then
        pass clock "within ${abs_skew}s of the hub"
    elif [ "$abs_skew" -le 60 ]; then
        warn clock "${skew}s off the hub's clock" "sync the clock: timedatectl set-ntp true (or install chrony)"
    else
        fail clock "${skew}s off the hub's clock; certificates would not be accepted" "sync the clock: timedatectl set-ntp true (or install chrony), then re-run"
    fi

    VERSION=$(json_str "$CHECK" version)
    FILE=gantry-agent-linux-$ARCH
    if [ -z "$VERSION" ]; then
        fail build "the hub serves no agent build" "ask the operator to give the hub agent builds (installer.downloads_dir)"
        return 1
    fi
    if ! printf '%s' "$CHECK" | grep -q "\"$FILE\""; then
        fail build "the hub has no $FILE for version $VERSION" "ask the operator for a $ARCH build of the agent"
        return 1
    fi
    pass build "gantry-agent $VERSION for linux/$ARCH"
    return 0
}

# EXPECTED: the SHA-256 of $FILE in the SHA256SUMS of $VERSION. On failure FETCH_ERROR
# says what went wrong and FETCH_FIX what to do.
expected_sha256() {
    http GET "/downloads/$VERSION/SHA256SUMS"
    if [ "$http_status" != 200 ]; then
        FETCH_ERROR="SHA256SUMS of $VERSION: HTTP $http_status $(cat "$WORK/http.err")"
        FETCH_FIX="check the network; try again"
        return 1
    fi
    EXPECTED=$(awk -v f="$FILE" '$2 == f || $2 == "*" f {print $1}' "$WORK/http.out")
    if [ -z "$EXPECTED" ]; then
        FETCH_ERROR="SHA256SUMS of $VERSION lists no $FILE"
        FETCH_FIX="ask the operator to fix the hub's downloads"
        return 1
    fi
}

# Download $FILE of $VERSION to $WORK/gantry-agent and check it against EXPECTED.
fetch_build() {
    http GET "/downloads/$VERSION/$FILE"
    if [ "$http_status" != 200 ]; then
        FETCH_ERROR="$FILE: HTTP $http_status $(cat "$WORK/http.err")"
        FETCH_FIX="check the network; try again"
        return 1
    fi
    mv "$WORK/http.out" "$WORK/gantry-agent"
    GOT=$(sha256_of "$WORK/gantry-agent")
    if [ "$GOT" != "$EXPECTED" ]; then
        rm -f "$WORK/gantry-agent"
        FETCH_ERROR="checksum mismatch for $FILE: got $GOT, SHA256SUMS says $EXPECTED"
        FETCH_FIX="try again; if it persists, the download is being altered on the way"
        return 1
    fi
    chmod 0755 "$WORK/gantry-agent"
}

download() {
    if ! expected_sha256; then
        fail download "$FETCH_ERROR" "$FETCH_FIX" $EXIT_UNREACHABLE
        return 1
    fi
    if [ -x "$BIN" ] && [ "$(sha256_of "$BIN")" = "$EXPECTED" ]; then
        NEW_BIN=$BIN
        pass download "installed $BIN is already $VERSION (sha256 ${EXPECTED%"${EXPECTED#????????????}"}...)"
        return 0
    fi
    if ! fetch_build; then
        fail download "$FETCH_ERROR" "$FETCH_FIX" $EXIT_UNREACHABLE
        return 1
    fi
    NEW_BIN=$WORK/gantry-agent
    pass download "$FILE $VERSION, sha256 verified"
    return 0
}

check_quic() {
    if [ -z "$TOKEN" ]; then
        row quic skip "no --token to probe with; the agent's own connection is waited for below"
        return
    fi
    if probe=$(GANTRY_TOKEN=$TOKEN "$NEW_BIN" preflight --timeout-secs 10 2>&1 </dev/null); then
        pass quic "$probe"
    else
        case $? in
            4) fail quic "$probe" "the hub at $HUB_ADDR is not the one that issued this token: check DNS, or ask for a new token" $EXIT_REFUSED ;;
            2) fail quic "$probe" "copy the whole token again, or ask the operator for a new one" $EXIT_REFUSED ;;
            *) fail quic "$probe" "allow outbound UDP to $HUB_ADDR (QUIC) in the firewall and any security group" ;;
        esac
    fi
}

preflight() {
    say "Preflight checks for $HUB_URL"
    row CHECK RESULT DETAIL
    check_local
    if check_hub && download; then
        check_quic
    fi
    if [ $FAILED -ne 0 ]; then
        say ""
        err "preflight failed; nothing was changed. Fix the FAIL rows above and run the installer again."
        exit "$FAIL_CODE"
    fi
}

# ---- install ----

CHANGED=0

install_binary() {
    if [ "$NEW_BIN" = "$BIN" ]; then
        say "  binary    $BIN is gantry-agent $VERSION already"
        return
    fi
    was=''
    if [ -f "$BIN" ]; then
        was=unknown
        [ -f "$VERSION_FILE" ] && was=$(cat "$VERSION_FILE")
    fi
    # A new file renamed over the old one: a running agent keeps its (old) program intact.
    if ! { cp "$NEW_BIN" "$BIN.new" && chmod 0755 "$BIN.new" && mv -f "$BIN.new" "$BIN"; }; then
        die $EXIT_FAILURE "could not install $BIN"
    fi
    if [ -n "$was" ]; then
        say "  binary    upgraded $BIN from $was to $VERSION"
    else
        say "  binary    installed $BIN ($VERSION)"
    fi
    CHANGED=1
}

write_config() {
    mkdir -p "$CONF_DIR" || die $EXIT_FAILURE "could not create $CONF_DIR"
    printf '%s\n' "$VERSION" >"$VERSION_FILE"
    if [ -f "$CONF" ]; then
        say "  config    kept $CONF"
        return
    fi
    cat >"$CONF" <<EOF || die $EXIT_FAILURE "could not write $CONF"
# Gantry agent configuration, written by install.sh. Every key is optional; see the
# hub's README, "Configure" (the agent keeps its identity in state_dir).
state_dir = "$STATE_DIR"
EOF
    chmod 0644 "$CONF"
    say "  config    wrote $CONF"
    CHANGED=1
}

enroll() {
    if enrolled; then
        AGENT_ID=$(agent_id)
        say "  enroll    already enrolled as $AGENT_ID"
        if [ -n "$LABELS" ]; then
            say "  labels    --label not applied: labels are set at enrollment, and $AGENT_ID keeps the ones it has"
            say "            (see them in the dashboard, Agents). To change them, run the installer with"
            say "            --purge, then install again with a new token and the labels you want."
        fi
        return
    fi
    set --
    old_ifs=$IFS
    IFS='
'
    for label in $LABELS; do
        set -- "$@" --label "$label"
    done
    IFS=$old_ifs
    if ! out=$(GANTRY_TOKEN=$TOKEN "$BIN" enroll --state-dir "$STATE_DIR" "$@" 2>&1 </dev/null); then
        err "$out"
        die $EXIT_REFUSED "enrollment failed; the agent is installed but not enrolled. Fix the cause and run the installer again."
    fi
    AGENT_ID=$(agent_id)
    say "  enroll    enrolled as $AGENT_ID in org $ORG"
    CHANGED=1
}

unit_template() {
    cat <<'UNIT'
@GANTRY_AGENT_UNIT@
UNIT
}

# The unit with the state directory the agent is configured with as the one path it may
# write (STATE_DIR is a plain path: no character in it is special to sed). systemd's own
# StateDirectory= stays for the default only, so no empty directory is left beside another.
unit_text() {
    if [ "$STATE_DIR" = "$DEFAULT_STATE_DIR" ]; then
        unit_template
    else
        unit_template | sed -e "s|^ReadWritePaths=.*|ReadWritePaths=$STATE_DIR|" -e '/^StateDirectory/d'
    fi
}

start_systemd() {
    if [ ! -f "$UNIT" ] || [ "$(cat "$UNIT")" != "$(unit_text)" ]; then
        unit_text >"$UNIT" || die $EXIT_FAILURE "could not write $UNIT"
        say "  service   wrote $UNIT"
        CHANGED=1
    fi
    systemctl daemon-reload || die $EXIT_FAILURE "systemctl daemon-reload failed"
    systemctl enable gantry-agent >/dev/null 2>&1 || die $EXIT_FAILURE "systemctl enable gantry-agent failed"
    if [ $CHANGED -eq 1 ] || ! systemctl is-active --quiet gantry-agent; then
        systemctl restart gantry-agent || die $EXIT_FAILURE "systemctl restart gantry-agent failed; see: journalctl -u gantry-agent"
        say "  service   (re)started gantry-agent.service"
    else
        say "  service   gantry-agent.service already running"
    fi
}

running_pid() {
    [ -f "$PID_FILE" ] || return 1
    pid=$(cat "$PID_FILE")
    case $pid in '' | *[!0-9]*) return 1 ;; esac
    kill -0 "$pid" 2>/dev/null || return 1
    printf '%s' "$pid"
}

stop_background() {
    if pid=$(running_pid); then
        kill "$pid" 2>/dev/null
        waited=0
        while kill -0 "$pid" 2>/dev/null && [ $waited -lt 10 ]; do
            sleep 1
            waited=$((waited + 1))
        done
        kill -9 "$pid" 2>/dev/null
        say "  service   stopped the agent (pid $pid)"
    fi
    rm -f "$PID_FILE"
}

start_background() {
    if pid=$(running_pid) && [ $CHANGED -eq 0 ]; then
        say "  service   agent already running (pid $pid)"
        return
    fi
    stop_background
    nohup "$BIN" run --config "$CONF" </dev/null >>"$LOG_FILE" 2>&1 &
    printf '%s\n' $! >"$PID_FILE"
    say "  service   started the agent in the background (pid $!, log $LOG_FILE)"
    say "            without systemd it does not start at boot: add '$BIN run --config $CONF' to your init system"
}

wait_online() {
    say ""
    say "Waiting up to ${TIMEOUT}s for the hub to show $AGENT_ID online..."
    waited=0
    status=''
    while :; do
        http GET "/api/v1/install/agents/$AGENT_ID" -H "X-Gantry-Agent-Certificate: $(agent_cert_sha256)"
        answer=$(cat "$WORK/http.out")
        case $http_status in
            200) status=$(json_str "$answer" status) ;;
            404) die $EXIT_NOT_ONLINE "the hub knows no agent $AGENT_ID with the certificate in $STATE_DIR; look for it in the dashboard" ;;
            *) status="unknown (HTTP $http_status)" ;;
        esac
        [ "$status" = online ] && break
        [ "$status" = revoked ] && die $EXIT_REFUSED "agent $AGENT_ID was revoked at the hub; run the installer with --purge, then install again with a new token"
        if [ $waited -ge "$TIMEOUT" ]; then
            if [ "$SERVICE" = systemd ]; then hint="journalctl -u gantry-agent"; else hint="tail $LOG_FILE"; fi
            die $EXIT_NOT_ONLINE "the agent is installed and started, but the hub still shows it $status after ${TIMEOUT}s; see: $hint"
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

install_agent() {
    preflight
    if [ $DRY_RUN -eq 1 ]; then
        say ""
        say "Dry run: every check passed. A real run would install gantry-agent $VERSION to $BIN, write $CONF, enroll in org $ORG and start the agent. Nothing was changed."
        exit 0
    fi
    say ""
    say "Installing"
    install_binary
    write_config
    enroll
    if [ $NO_SYSTEMD -eq 1 ]; then
        SERVICE=background
        start_background
    else
        SERVICE=systemd
        start_systemd
    fi
    wait_online
    say ""
    if [ $CHANGED -eq 1 ]; then
        say "Done: agent $AGENT_ID is online at $HUB_URL (org $ORG, gantry-agent $VERSION)."
    else
        say "Done: nothing to change; agent $AGENT_ID is online at $HUB_URL (org $ORG, gantry-agent $VERSION)."
    fi
    if [ "$SERVICE" = systemd ]; then
        say "Logs: journalctl -u gantry-agent -f"
    else
        say "Logs: tail -f $LOG_FILE"
    fi
}

# ---- uninstall ----

uninstall_agent() {
    [ "$(id -u)" -eq 0 ] || die $EXIT_PREFLIGHT "run the uninstaller as root (sudo)"
    found=0
    revoke_failed=0
    if [ -f "$UNIT" ]; then
        found=1
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            systemctl disable --now gantry-agent >/dev/null 2>&1
            rm -f "$UNIT"
            systemctl daemon-reload
        else
            rm -f "$UNIT"
        fi
        say "removed $UNIT"
    fi
    if [ -f "$PID_FILE" ]; then
        found=1
        stop_background
    fi
    if [ $PURGE -eq 1 ] && enrolled; then
        found=1
        revoke || revoke_failed=1
    fi
    if [ -f "$BIN" ]; then
        found=1
        rm -f "$BIN" "$VERSION_FILE"
        say "removed $BIN"
    fi
    if [ $PURGE -eq 1 ]; then
        for path in "$STATE_DIR" "$CONF_DIR" "$LOG_FILE"; do
            if [ -e "$path" ]; then
                found=1
                rm -rf "$path"
                say "removed $path"
            fi
        done
    elif enrolled; then
        say "kept $CONF and the agent's identity in $STATE_DIR (use --purge to remove them and revoke the agent)"
    fi
    if [ $found -eq 0 ]; then
        say "nothing to uninstall: the agent is not installed here"
        return
    fi
    if [ $revoke_failed -eq 1 ]; then
        exit $EXIT_UNREACHABLE
    fi
    say "Done."
}

# Ask the hub to revoke this agent, with a request signed by the agent's own key. When the
# agent's program is gone (--uninstall ran before), a copy of the hub's build, verified
# against its SHA256SUMS, signs the request and is deleted right after.
revoke() {
    signer=$BIN
    if [ ! -x "$BIN" ]; then
        fetch_signer
        case $? in
            0) signer=$WORK/gantry-agent ;;
            2) return 0 ;;
            *) return 1 ;;
        esac
    fi
    signed=$("$signer" deregister --state-dir "$STATE_DIR" 2>&1 </dev/null)
    signed_ok=$?
    if [ "$signer" != "$BIN" ]; then
        rm -f "$signer"
    fi
    if [ $signed_ok -ne 0 ]; then
        err "$signed"
        err "cannot revoke the agent at the hub; revoke $(agent_id) in the dashboard"
        return 1
    fi
    revoke_id=$(printf '%s\n' "$signed" | sed -n 1p)
    printf '%s\n' "$signed" | sed -n 2p >"$WORK/deregister.json"
    http POST "/api/v1/agents/$revoke_id/deregister" -H 'Content-Type: application/json' --data-binary "@$WORK/deregister.json"
    if [ "$http_status" = 200 ]; then
        say "revoked agent $revoke_id at $HUB_URL"
        return 0
    fi
    err "the hub did not revoke agent $revoke_id (HTTP $http_status: $(json_str "$(cat "$WORK/http.out")" message)$(cat "$WORK/http.err")); revoke it in the dashboard"
    return 1
}

# Put a verified copy of the hub's agent build in $WORK/gantry-agent to sign the
# revocation with: 0 done, 2 the agent is already revoked (nothing to sign), 1 failed.
fetch_signer() {
    revoke_id=$(agent_id)
    say "$BIN is not installed: fetching gantry-agent from $HUB_URL to sign the revocation"
    hub_check
    case $http_status in
        200) ;;
        000)
            err "cannot revoke the agent at the hub: cannot reach $HUB_URL: $(cat "$WORK/http.err"); revoke $revoke_id in the dashboard"
            return 1
            ;;
        *)
            err "cannot revoke the agent at the hub: HTTP $http_status: $(json_str "$CHECK" message); revoke $revoke_id in the dashboard"
            return 1
            ;;
    esac
    if [ "$(json_str "$CHECK" agent_status)" = revoked ]; then
        say "agent $revoke_id is already revoked at $HUB_URL"
        return 2
    fi
    VERSION=$(json_str "$CHECK" version)
    FILE=gantry-agent-linux-$(uname -m)
    if [ -z "$VERSION" ]; then
        err "cannot revoke the agent at the hub: the hub serves no agent build; revoke $revoke_id in the dashboard"
        return 1
    fi
    if ! expected_sha256 || ! fetch_build; then
        err "cannot revoke the agent at the hub: $FETCH_ERROR; revoke $revoke_id in the dashboard"
        return 1
    fi
    say "fetched $FILE $VERSION, sha256 verified (deleted again once it has signed)"
}

main() {
    parse_args "$@"
    resolve_state_dir
    if [ $UNINSTALL -eq 0 ] && [ -z "$TOKEN" ] && ! enrolled; then
        die $EXIT_USAGE "missing --token: ask the operator for an enrollment token (dashboard, Agents, or: gantry-hub token create --org ORG)"
    fi
    WORK=$(mktemp -d 2>/dev/null || echo "/tmp/gantry-install.$$")
    mkdir -p "$WORK" || die $EXIT_FAILURE "could not create a temporary directory"
    trap 'rm -rf "$WORK"' EXIT
    if [ $UNINSTALL -eq 1 ]; then
        uninstall_agent
    else
        install_agent
    fi
}

# Everything above only defines; this line runs it, so a partly downloaded script does nothing.
main "$@"
