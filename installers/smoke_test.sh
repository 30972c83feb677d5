#!/usr/bin/env bash
# Smoke test of a built `meshagent` binary, run the way a user runs it: a clean environment
# (no virtualenv, pyenv or ~/.local on PATH, a throwaway HOME), a Mesh Server on a free port,
# two agents with their own --home that enrol, come up, see each other online and ping each
# other peer to peer (one on each QUIC engine: qh3 and aioquic), send a file and a folder, then
# doctor, config and a user error. Everything it starts is stopped and its temp dir removed,
# pass or fail.
#
#   installers/smoke_test.sh [BINARY]        default: dist/meshagent/meshagent
#
# Exit 0 when every step passes; otherwise one "smoke test FAILED: ..." line on stderr (plus the
# tail of the logs that explain it) and exit 1. KEEP_SMOKE_DIR=1 keeps the temp dir to look at.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${1:-$ROOT/dist/meshagent/meshagent}"
START=$SECONDS
WORK=""
PIDS=()

fail() {
  echo "smoke test FAILED: $*" >&2
  if [ -n "$WORK" ]; then
    for log in "$WORK"/*.err "$WORK"/*.out; do
      [ -s "$log" ] || continue
      echo "--- tail of $(basename "$log")" >&2
      tail -n 15 "$log" >&2
    done
  fi
  exit 1
}

stop_all() {
  local pid
  [ "${#PIDS[@]}" -gt 0 ] || return 0
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  PIDS=()
}

cleanup() {
  stop_all
  if [ -n "$WORK" ] && [ -z "${KEEP_SMOKE_DIR:-}" ]; then
    rm -rf "$WORK"
  elif [ -n "$WORK" ]; then
    echo "kept $WORK" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ok() { echo "ok   $*"; }

case "$BIN" in /*) ;; *) BIN="$PWD/$BIN" ;; esac
if [ ! -f "$BIN" ] || [ ! -x "$BIN" ]; then
  fail "no executable at $BIN (build it: installers/build_linux.sh)"
fi
[ "$(head -c 2 "$BIN")" != "#!" ] || fail "$BIN is a script, not a frozen binary"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/meshagent-smoke.XXXXXX")"
mkdir -p "$WORK/home" "$WORK/tmp"

# The binary gets nothing of the build environment: only the system PATH and a fresh HOME (on
# Linux no keychain either: the agents fall back to the file secret store, as on a headless
# machine). MESHAGENT_SECRET_STORE=file passes through, to keep a desktop's keychain out of it.
clean_env=(env -i "HOME=$WORK/home" "PATH=/usr/sbin:/usr/bin:/sbin:/bin" "LANG=C.UTF-8"
  "TMPDIR=$WORK/tmp" "USER=${USER:-smoke}" "MESHAGENT_SECRET_STORE=${MESHAGENT_SECRET_STORE:-}")

# meshagent ARGS...: one command, bounded in time; stdout captured, stderr to $WORK/cli.err.
# (macOS has no `timeout` unless coreutils is installed: there the commands run unbounded.)
bounded=()
if command -v timeout >/dev/null; then bounded=(timeout 90); elif command -v gtimeout >/dev/null; then bounded=(gtimeout 90); fi
meshagent() {
  "${clean_env[@]}" ${bounded[@]+"${bounded[@]}"} "$BIN" "$@" 2>>"$WORK/cli.err"
}

# start NAME ARGS...: a long-running command in the background, output to $WORK/NAME.out/.err.
start() {
  local name="$1"
  shift
  "${clean_env[@]}" "$BIN" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  PIDS+=("$!")
}

# wait_for WHAT SECONDS COMMAND...: poll until COMMAND succeeds.
wait_for() {
  local what="$1" limit="$2"
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${limit}s waiting for $what"
    sleep 0.2
  done
}

# ---------------------------------------------------------------- version
version="$(meshagent --version)" || fail "meshagent --version exited $?"
[[ "$version" =~ ^meshagent\ [0-9]+\.[0-9]+ ]] || fail "unexpected --version output: $version"
ok "--version: $version"

# ---------------------------------------------------------------- server
SERVER_DATA="$WORK/server"
echo "smoke-password-1" | meshagent server add-user alice --password-stdin --data-dir "$SERVER_DATA" \
  >/dev/null || fail "server add-user failed"
start server server --port 0 --data-dir "$SERVER_DATA"
server_url() { grep -oE 'listening on [^ ]+' "$WORK/server.out" 2>/dev/null | head -n 1 | cut -d' ' -f3; }
server_ready() { [ -n "$(server_url)" ] || { kill -0 "${PIDS[0]}" 2>/dev/null || fail "the server exited"; false; }; }
wait_for "the server to listen" 30 server_ready
URL="$(server_url)"
ok "server listening on $URL"

CODE_A="$(meshagent server join-code --user alice --data-dir "$SERVER_DATA")" || fail "join-code failed"
CODE_B="$(meshagent server join-code --user alice --data-dir "$SERVER_DATA")" || fail "join-code failed"
if [ -z "$CODE_A" ] || [ "$CODE_A" = "$CODE_B" ]; then
  fail "join codes missing or equal: '$CODE_A' '$CODE_B'"
fi
ok "user alice and two one-time join codes"

# ---------------------------------------------------------------- two agents
HOME_A="$WORK/agent-a"
HOME_B="$WORK/agent-b"
meshagent --home "$HOME_A" login "$URL" --join-code "$CODE_A" --name smoke-a >/dev/null \
  || fail "login of smoke-a failed"
meshagent --home "$HOME_B" login "$URL" --join-code "$CODE_B" --name smoke-b >/dev/null \
  || fail "login of smoke-b failed"
meshagent --home "$HOME_B" config set p2p.engine aioquic || fail "config set p2p.engine failed"
[ "$(meshagent --home "$HOME_B" config get p2p.engine)" = "aioquic" ] || fail "config get p2p.engine"
ok "smoke-a (qh3) and smoke-b (aioquic) enrolled"

start agent-a --home "$HOME_A" up
start agent-b --home "$HOME_B" up
agent_up() { grep -q "Mesh Agent up" "$WORK/$1.out" 2>/dev/null; }
wait_for "smoke-a to come up" 30 agent_up agent-a
wait_for "smoke-b to come up" 30 agent_up agent-b
ok "both agents up"

# sees HOME NAME: the agent in HOME lists device NAME as online (one JSON object per line).
sees() {
  local listing
  listing="$(meshagent --home "$1" devices --json)" || return 1
  grep "\"name\": \"$2\"" <<<"$listing" | grep -q '"online": true'
}
wait_for "smoke-a to see smoke-b online" 30 sees "$HOME_A" smoke-b
wait_for "smoke-b to see smoke-a online" 30 sees "$HOME_B" smoke-a
ok "devices --json: each sees the other online"

# ping_check FROM_HOME TO_NAME: real QUIC between the two engines; sets PATHS to the path(s) taken.
ping_check() {
  local out
  out="$(meshagent --home "$1" ping "$2" --count 3 --json)" || fail "ping $2 failed: $out"
  PATHS="$(grep -oE '"path": "(direct|relay)"' <<<"$out" | sort -u | cut -d'"' -f4 | paste -sd, -)"
  [ -n "$PATHS" ] || fail "ping $2 reported no path: $out"
}
ping_check "$HOME_A" smoke-b
ok "ping smoke-a -> smoke-b: $PATHS"
ping_check "$HOME_B" smoke-a
ok "ping smoke-b -> smoke-a: $PATHS"

# ---------------------------------------------------------------- file send (issue 4)
# A file and a folder, smoke-a (qh3) -> smoke-b (aioquic); they land in smoke-b's
# <home>/downloads (downloads.dir unset) and must arrive identical.
head -c 3000000 /dev/urandom >"$WORK/payload.bin"
mkdir -p "$WORK/album/sub"
head -c 200000 /dev/urandom >"$WORK/album/one.jpg"
printf 'hello from smoke-a\n' >"$WORK/album/sub/note.txt"
out="$(meshagent --home "$HOME_A" send "$WORK/payload.bin" "$WORK/album" --to smoke-b --json)" \
  || fail "send smoke-a -> smoke-b failed: $out"
[ "$(grep -c '"name"' <<<"$out")" -eq 2 ] || fail "send reported other than 2 items: $out"
cmp -s "$WORK/payload.bin" "$HOME_B/downloads/payload.bin" \
  || fail "payload.bin did not arrive identical in smoke-b's downloads"
diff -r "$WORK/album" "$HOME_B/downloads/album" >/dev/null \
  || fail "the album folder did not arrive identical in smoke-b's downloads"
ok "send: a 3 MB file and a folder smoke-a -> smoke-b, identical"

# ---------------------------------------------------------------- doctor
for agent in a:qh3 b:aioquic; do
  home="$WORK/agent-${agent%%:*}"
  engine="${agent#*:}"
  report="$(meshagent --home "$home" doctor --json)" || fail "doctor smoke-${agent%%:*} exited non-zero: $report"
  grep '"name": "quic engine"' <<<"$report" | grep -q "\"detail\": \"$engine " \
    || fail "doctor smoke-${agent%%:*} does not report the $engine engine: $report"
  grep -q '"name": "peer smoke-' <<<"$report" || fail "doctor shows no peer path: $report"
done
ok "doctor: both agents healthy, engines qh3 and aioquic, peer paths shown"

# ---------------------------------------------------------------- a user error
if meshagent --home "$HOME_A" notify "Smoke" "test" >/dev/null; then
  fail "notify without Gotify configured succeeded"
fi
tail -n 1 "$WORK/cli.err" | grep -q "^meshagent: Gotify is not set up" \
  || fail "notify without Gotify: expected a one-line error, got: $(tail -n 3 "$WORK/cli.err")"
ok "notify without Gotify: one clear error line, non-zero exit"

# ---------------------------------------------------------------- clean shutdown
for i in 2 1 0; do
  pid="${PIDS[$i]}"
  kill -TERM "$pid"
  status=0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && fail "process $pid did not stop within 10 s of SIGTERM"
  wait "$pid" || status=$?
  # 0, or 130: the CLI's status for a command stopped by a signal ("meshagent: stopped (SIGTERM)").
  [ "$status" -eq 0 ] || [ "$status" -eq 130 ] || fail "process $pid exited $status after SIGTERM"
done
PIDS=()
ok "agents and server stop cleanly on SIGTERM"

if grep -l "Traceback" "$WORK"/*.err >/dev/null 2>&1; then
  fail "a traceback was printed: $(grep -l Traceback "$WORK"/*.err | paste -sd' ' -)"
fi
# A library falling back at run time (a native module the bundle lacks) warns once per start.
if grep -lE "(User|Runtime|Import)Warning" "$WORK"/*.err >/dev/null 2>&1; then
  fail "a warning was printed: $(grep -hE "(User|Runtime|Import)Warning" "$WORK"/*.err | head -n 1)"
fi
echo "smoke test passed in $((SECONDS - START)) s ($BIN)"
