#!/usr/bin/env bash
# A multi-node Ray cluster on one machine: a head plus N worker raylets, each with its own CPUs.
#
#   bash cluster/local-multinode.sh start 3      # head + 3 nodes of 1 CPU each
#   RAY_ADDRESS=127.0.0.1:6399 .venv/bin/orch run pipeline.jobs.pretrain.workers=3 trainer.global_batch_size=24
#   bash cluster/local-multinode.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=".venv/bin/ray"
# Ray's command, with every node on 127.0.0.1 only (GCS, raylets, dashboard, client server):
# see orchestrator/raycluster/local.py.
LOCAL_RAY=(.venv/bin/python -m orchestrator.raycluster.local)
PORT="${ORCH_LOCAL_RAY_PORT:-6399}"
CPUS_PER_NODE="${ORCH_CPUS_PER_NODE:-1}"
# Token authentication (Ray's default for new clusters): every raylet and client of this machine
# reads the token from ~/.ray/auth_token.
export RAY_AUTH_MODE=token
"$RAY" get-auth-token --generate >/dev/null
case "${1:-}" in
  start)
    n="${2:-2}"
    "${LOCAL_RAY[@]}" start --head --port="$PORT" --node-ip-address=127.0.0.1 --num-cpus=0 --include-dashboard=true \
      --dashboard-host=127.0.0.1 --ray-client-server-port="$((PORT + 1))" --disable-usage-stats >/dev/null
    for i in $(seq 1 "$n"); do
      "${LOCAL_RAY[@]}" start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus="$CPUS_PER_NODE" \
        --resources="{\"node-$i\": 1}" --disable-usage-stats >/dev/null
    done
    echo "Ray head at 127.0.0.1:$PORT with $n worker nodes of $CPUS_PER_NODE CPU(s): export RAY_ADDRESS=127.0.0.1:$PORT"
    ;;
  stop)
    # (every Ray process of this machine; `orch up` / `orch down` stop only their own cluster's)
    "$RAY" stop --force >/dev/null && echo "stopped"
    ;;
  *)
    echo "usage: $0 start [NODES] | stop" >&2
    exit 2
    ;;
esac
