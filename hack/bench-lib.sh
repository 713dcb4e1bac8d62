# Sourced by hack/bench and hack/bench-pool; needs $bin (the tools) and $NATS_URL.

# drained STREAM CONSUMER: waits until the consumer has nothing pending or unacked.
# Polled every 0.5 s with one consumer info request (orderctl status counts
# subjects, and frequent polls would take CPU from the run): the figures do not
# depend on it, they come from the server's timestamps (outcome_span).
drained() {
  local left
  while :; do
    left=$("$bin/nats" --server "$NATS_URL" consumer info "$1" "$2" --json 2>/dev/null \
      | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["num_pending"]+s["num_ack_pending"])' 2>/dev/null || echo 1)
    [ "$left" = 0 ] && return
    sleep 0.5
  done
}

# outcome_span STREAM SUBJECT FROM_SEQ: seconds between the server's timestamps of
# the first and the last message on SUBJECT (wildcards allowed) from FROM_SEQ on:
# from the first outcome to the last, the same clock for every program measured;
# start-up and polling are not in it. The rate is then (N - 1) / span.
msg_get() { "$bin/nats" --server "$NATS_URL" req "\$JS.API.STREAM.MSG.GET.$1" "$2" 2>/dev/null; }
outcome_span() {
  python3 - "$(msg_get "$1" "{\"next_by_subj\":\"$2\",\"seq\":$3}")" "$(msg_get "$1" "{\"last_by_subj\":\"$2\"}")" <<'PY'
import datetime, json, sys
def ns(resp):
    t = json.loads(resp)["message"]["time"]  # RFC 3339 with up to 9 fraction digits, UTC
    head, _, frac = t.rstrip("Z").partition(".")
    secs = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.timezone.utc).timestamp()
    return int(secs) * 10**9 + int((frac + "000000000")[:9])
try:
    first, last = ns(sys.argv[1]), ns(sys.argv[2])
except (ValueError, KeyError) as e:
    sys.exit(f"bench: cannot read the outcomes' timestamps ({e}): {sys.argv[1][:200]} / {sys.argv[2][:200]}")
print((last - first) / 1e9)
PY
}

# cpu_ticks PID...: the CPU time (user + system, in clock ticks) the processes
# have used so far; hz is the ticks per second.
cpu_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo "$t"; }
hz=$(getconf CLK_TCK)

# last_seq STREAM: the stream's last sequence.
last_seq() {
  "$bin/nats" --server "$NATS_URL" stream info "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"]["last_seq"])'
}
