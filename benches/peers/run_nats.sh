#!/usr/bin/env bash
# Run the NATS JetStream peer benchmark (benches/peers/nats) against a
# throwaway nats-server on 127.0.0.1:4222, for comparison with
# `courier bench --workload publish` (and, with --mode fanout,
# `courier bench --workload fanout`) on the same machine.
#
#   benches/peers/run_nats.sh [nats-peer-bench options...]
#
# e.g. benches/peers/run_nats.sh --messages 100000 --publishers 200
#      benches/peers/run_nats.sh --messages 100000 --publishers 200 --streams 1000
#      benches/peers/run_nats.sh --mode fanout --messages 100000 --subscriptions 10
#
# What this does: installs nats-server with apt-get if it is missing; builds
# the peer bench in release mode; starts `nats-server -js -sd DIR -a 127.0.0.1
# -p 4222` with DIR in a fresh temp dir; waits until the server says it is
# ready; runs the bench with all arguments passed through; then (trap, also on
# error or Ctrl-C) stops the server and removes the temp dir. The bench's one
# JSON line goes to stdout; progress and the server's log (on failure) go to
# stderr.
#
# Server measured: nats-server v2.9.10 (Debian bookworm package
# 2.9.10-1+b3; `nats-server --version` prints "nats-server: v2.9.10").
#
# Durability, which matters when comparing with Courier: JetStream acks a
# publish once the message is written to the stream's block file (the OS page
# cache), NOT after an fsync; the file store fsyncs in the background on a
# timer. In 2.9.10 that timer is not configurable (`nats-server --help` lists
# no sync option; the `sync_interval` setting, default 2 min, and
# `sync_interval: always` came with server 2.10) and is built in at 2 minutes:
# traced with `strace -f -e trace=fsync,fdatasync,sync_file_range,syncfs,sync`
# under a steady single-stream publish load, the server's only sync calls were
# one fsync of the current block file (N.blk) and its index (N.idx) every
# 120 s after the stream was created (+120, +240, +360, +480 s). The 8 MiB
# blocks that filled and rolled over in between were never fsynced by the
# server; they got to disk only through the kernel's own writeback. So an R1
# stream here can lose up to ~2 minutes of acknowledged messages on an OS
# crash or power loss (a killed nats-server process alone loses nothing: the
# data is in the page cache). Read Courier's figures against that.

set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
MANIFEST="$REPO/benches/peers/nats/Cargo.toml"
BIN="$REPO/benches/peers/nats/target/release/nats-peer-bench"
ADDR=127.0.0.1
PORT=4222

log() { echo "run_nats.sh: $*" >&2; }

# --- nats-server -------------------------------------------------------------
# Debian installs it in /usr/sbin, which a non-root PATH may lack.
NATS_SERVER="$(command -v nats-server || true)"
if [[ -z "$NATS_SERVER" && -x /usr/sbin/nats-server ]]; then
    NATS_SERVER=/usr/sbin/nats-server
fi
if [[ -z "$NATS_SERVER" ]]; then
    log "nats-server not found; installing it with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq nats-server >&2
    NATS_SERVER="$(command -v nats-server || echo /usr/sbin/nats-server)"
fi
log "$("$NATS_SERVER" --version)"

# --- build ---------------------------------------------------------------------
log "building the peer bench (release)"
cargo build --release --quiet --manifest-path "$MANIFEST" >&2

# --- start the server ----------------------------------------------------------
port_open() { (exec 3<>"/dev/tcp/$ADDR/$PORT") 2>/dev/null; }
if port_open; then
    log "something is already listening on $ADDR:$PORT; stop it first (the bench would measure it instead)"
    exit 1
fi

TMP="$(mktemp -d -t nats-peer.XXXXXX)"
SERVER_PID=""
cleanup() {
    local rc=$?
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        # Give it a few seconds to shut down cleanly, then insist.
        for _ in $(seq 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ $rc -ne 0 && -f "$TMP/nats-server.log" ]]; then
        log "failed (exit $rc); last lines of the server log:"
        tail -n 20 "$TMP/nats-server.log" >&2 || true
    fi
    rm -rf "$TMP"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A JetStream stream keeps two files open (its block and its index), so
# 10,000 streams need more than 20,000 descriptors: raise the limit where
# allowed (root), else use the hard limit.
ulimit -n 262144 2>/dev/null || ulimit -n "$(ulimit -Hn)"
"$NATS_SERVER" -js -sd "$TMP/store" -a "$ADDR" -p "$PORT" -l "$TMP/nats-server.log" &
SERVER_PID=$!

# Up = it logged "Server is ready" (JetStream is started before that) and the
# port accepts connections; give up after 15 s.
for i in $(seq 150); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        log "nats-server exited during startup"
        exit 1
    fi
    if grep -q "Server is ready" "$TMP/nats-server.log" 2>/dev/null && port_open; then
        break
    fi
    if [[ $i -eq 150 ]]; then
        log "nats-server did not come up within 15 s"
        exit 1
    fi
    sleep 0.1
done
log "nats-server up on $ADDR:$PORT (pid $SERVER_PID, store $TMP/store)"

# --- run -------------------------------------------------------------------------
"$BIN" "$@"
