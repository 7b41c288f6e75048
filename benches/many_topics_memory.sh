#!/bin/bash
# Resident memory of a broker holding many topics' backlogs (docs/performance.md,
# "Memory"): TOPICS topics, one idle subscription each, MIB MiB of 1 KiB
# messages published to each with `courier publish --lines`.
#
#   benches/many_topics_memory.sh target/release/courier [TOPICS] [MIB]
set -euo pipefail
BIN=$1; TOPICS=${2:-100}; MIB=${3:-10}
DIR=$(mktemp -d)
trap 'kill $PID 2>/dev/null || true; rm -rf "$DIR"' EXIT
"$BIN" serve --listen 127.0.0.1:0 --data-dir "$DIR/data" 2>"$DIR/log" &
PID=$!
until ADDR=$(grep -o 'listening on [0-9.:]*' "$DIR/log" | awk '{print $3}') && [ -n "$ADDR" ]; do sleep 0.1; done
export COURIER_SERVER=http://$ADDR
python3 -c "import sys; sys.stdout.write(('x' * 1023 + '\n') * (1024 * $MIB))" > "$DIR/lines"
rss() { awk '/VmRSS/ {printf "%.1f MiB", $2 / 1024}' /proc/$PID/status; }
echo "started: $(rss)"
for i in $(seq 1 "$TOPICS"); do
  "$BIN" topic create "t$i" >/dev/null
  "$BIN" sub create "s$i" --topic "t$i" >/dev/null
  "$BIN" publish "t$i" --lines < "$DIR/lines" >/dev/null
done
echo "after $TOPICS topics x $MIB MiB: $(rss)"
