#!/bin/sh
# A planned Sentinel failover that loses no write: fence the old master, pause its writes, then
# SENTINEL FAILOVER.
#
# A plain `SENTINEL FAILOVER` leaves the old master up and accepting writes until the Sentinels
# announce the new one (about a second) and chronoq's clients follow (REDIS_SENTINEL_CHECK_S);
# those writes are discarded when the old master resyncs as a replica (measured: about 1.2 s of
# writes, see docs/sentinel.md). Here the old master's writes are paused (CLIENT PAUSE WRITE:
# they wait, unexecuted, so the replica is promoted with everything acknowledged so far) until
# the Sentinels name the new master, and min-replicas-to-write 1 makes it refuse them (and any
# later one) once its replica has left; chronoq retries refused writes against the new master.
#
# Usage: planned-failover.sh [SENTINEL_HOST:PORT] [MASTER_NAME]
# Environment: REDIS_SENTINEL_PASSWORD (the Sentinels' password), REDIS_PASSWORD (the data
# password); passed to redis-cli through REDISCLI_AUTH, never on the command line.
set -eu

sentinel=${1:-127.0.0.1:26379}
name=${2:-mymaster}
s_host=${sentinel%:*}
s_port=${sentinel##*:}

sentinel_cli() { REDISCLI_AUTH=${REDIS_SENTINEL_PASSWORD:-} redis-cli --no-auth-warning -h "$s_host" -p "$s_port" "$@"; }
node_cli() { h=$1; p=$2; shift 2; REDISCLI_AUTH=${REDIS_PASSWORD:-} redis-cli --no-auth-warning -h "$h" -p "$p" "$@"; }

addr=$(sentinel_cli SENTINEL GET-MASTER-ADDR-BY-NAME "$name")
old_host=$(echo "$addr" | sed -n 1p)
old_port=$(echo "$addr" | sed -n 2p)
[ -n "$old_port" ] || { echo "planned-failover: no master named $name at $sentinel" >&2; exit 69; }
before=$(node_cli "$old_host" "$old_port" CONFIG GET min-replicas-to-write | sed -n 2p)

echo "planned-failover: fencing $old_host:$old_port (min-replicas-to-write 1, was ${before:-0})"
node_cli "$old_host" "$old_port" CONFIG SET min-replicas-to-write 1 >/dev/null
restore() {
    node_cli "$old_host" "$old_port" CLIENT UNPAUSE >/dev/null || true
    node_cli "$old_host" "$old_port" CONFIG SET min-replicas-to-write "${before:-0}" >/dev/null || true
}
# The pause lifts by itself after 10 s should this script die; it is lifted below as soon as
# the new master is named.
node_cli "$old_host" "$old_port" CLIENT PAUSE 10000 WRITE >/dev/null

if ! sentinel_cli SENTINEL FAILOVER "$name" | grep -q OK; then
    restore
    echo "planned-failover: SENTINEL FAILOVER refused" >&2
    exit 69
fi

i=0
while [ "$(sentinel_cli SENTINEL GET-MASTER-ADDR-BY-NAME "$name" | tr '\n' ' ')" = "$old_host $old_port " ]; do
    i=$((i + 1))
    [ "$i" -lt 600 ] || { restore; echo "planned-failover: no new master after 60 s" >&2; exit 69; }
    sleep 0.1
done
node_cli "$old_host" "$old_port" CLIENT UNPAUSE >/dev/null
echo "planned-failover: new master $(sentinel_cli SENTINEL GET-MASTER-ADDR-BY-NAME "$name" | tr '\n' ' ')"

# The old master stays fenced until Sentinel turns it into a replica (about 10 s later), then
# gets its own setting back (a replica ignores it; it matters if it is promoted again).
i=0
until node_cli "$old_host" "$old_port" ROLE | sed -n 1p | grep -q slave; do
    i=$((i + 1))
    [ "$i" -lt 600 ] || { echo "planned-failover: $old_host:$old_port is not a replica after 60 s; left fenced" >&2; exit 70; }
    sleep 0.1
done
restore
node_cli "$old_host" "$old_port" CONFIG REWRITE >/dev/null 2>&1 || true
echo "planned-failover: done; $old_host:$old_port is a replica"
