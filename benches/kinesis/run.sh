#!/bin/bash
# Sluice reading a local Kinesis next to a plain boto3 read loop on the same server.
#
#   make test-kinesis && cargo build --release --bin sluice
#   pip install boto3 && benches/kinesis/run.sh [RECORDS]
#
# Starts kinesalite on port 4599, writes RECORDS (default 200000) view events to a 4-shard
# stream `views`, times the boto3 loop (sdkloop.py), then Sluice (read-to-null.yaml) from
# process start until /metrics counts every record in.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-200000}
BIN=${SLUICE:-target/release/sluice}
PORT=4599
MPORT=9399
export CHECKPOINT_DIR=$(mktemp -d)
.tools/kinesalite/node_modules/.bin/kinesalite --port $PORT --createStreamMs 0 >/dev/null 2>&1 &
KPID=$!
trap 'kill $KPID 2>/dev/null; rm -rf "$CHECKPOINT_DIR"' EXIT
sleep 1.5
python3 benches/kinesis/setup.py $PORT $N
python3 benches/kinesis/sdkloop.py $PORT $N
KINESIS_ENDPOINT=http://127.0.0.1:$PORT $BIN run benches/kinesis/read-to-null.yaml --metrics-addr $MPORT >/dev/null 2>&1 &
SPID=$!
T0=$(date +%s.%N)
while true; do
  v=$(curl -s 127.0.0.1:$MPORT/metrics | awk '/^sluice_records_in_total/ {print $2}' || true)
  if [ -n "$v" ] && [ "${v%.*}" -ge "$N" ]; then break; fi
  sleep 0.05
done
T1=$(date +%s.%N)
kill -INT $SPID; wait $SPID || true
python3 -c "t=$T1-$T0; print(f'sluice: $N records in {t:.2f}s = {$N/t:.0f}/s (from process start)')"
