#!/usr/bin/env bash
# Run nanojaxgpt on one multi-GPU node, or on each of several nodes (one process per node,
# all its GPUs local to that process). Run the same command on every node with its own NODE_RANK.
#
#   docker build -t nanojaxgpt .
#   # one node, 8 GPUs:
#   launch/gpu_node.sh configs/gpt2_124m.toml --attention=cudnn --data_dir=gs://BUCKET/openwebtext
#   # two nodes: on node 0 and node 1 (COORDINATOR = node 0's address reachable by node 1)
#   NUM_NODES=2 NODE_RANK=0 COORDINATOR=10.0.0.2:1234 launch/gpu_node.sh configs/gpt2_124m.toml ...
#   NUM_NODES=2 NODE_RANK=1 COORDINATOR=10.0.0.2:1234 launch/gpu_node.sh configs/gpt2_124m.toml ...
#
# The container runs detached with `--restart on-failure:$RESTARTS` (default 10): a run that
# exits non-zero (a crashed peer, a storage error) is started again by Docker and resumes from
# the latest checkpoint; a run that reaches max_iters exits 0 and stays stopped (it writes
# out_dir/DONE; started again, it exits 0 at once). The script then follows its log (Ctrl-C
# leaves it running). `docker stop $NAME` sends SIGTERM: the run saves a checkpoint, exits 0 and
# is not restarted. Credentials for gs:// paths: Application Default Credentials mounted from the
# host (GOOGLE_APPLICATION_CREDENTIALS or ~/.config/gcloud), never baked into the image.
set -euo pipefail

IMAGE=${IMAGE:-nanojaxgpt}
NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
RUNS=${RUNS:-$PWD/runs}
RESTARTS=${RESTARTS:-10}
NAME=${NAME:-nanojaxgpt-$NODE_RANK}
mkdir -p "$RUNS"

env_args=()
if [ "$NUM_NODES" -gt 1 ]; then
  : "${COORDINATOR:?set COORDINATOR=host:port of node 0}"
  env_args+=(-e "JAX_COORDINATOR_ADDRESS=$COORDINATOR" -e "JAX_NUM_PROCESSES=$NUM_NODES"
             -e "JAX_PROCESS_ID=$NODE_RANK")
fi
creds=()
if [ -n "${GOOGLE_APPLICATION_CREDENTIALS:-}" ]; then
  creds+=(-v "$GOOGLE_APPLICATION_CREDENTIALS:/creds.json:ro" -e GOOGLE_APPLICATION_CREDENTIALS=/creds.json)
elif [ -d "$HOME/.config/gcloud" ]; then
  creds+=(-v "$HOME/.config/gcloud:/root/.config/gcloud:ro")
fi

# --network host: the coordinator and NCCL talk between nodes directly.
# --shm-size / --ipc host: NCCL and the data loader use shared memory.
# --restart on-failure (not --rm: Docker refuses both): restarts after a non-zero exit only.
if [ -n "$(docker ps -q --filter "name=^$NAME\$")" ]; then
  echo "container $NAME is already running: follow it with docker logs -f $NAME, or docker stop $NAME" >&2
  exit 2
fi
docker rm "$NAME" >/dev/null 2>&1 || true  # the stopped container of an earlier run
docker run -d --name "$NAME" --restart "on-failure:$RESTARTS" \
  --gpus all --network host --ipc host --shm-size 16g --stop-timeout 600 \
  "${env_args[@]}" "${creds[@]}" \
  -v "$RUNS:/opt/nanojaxgpt/runs" -v "$PWD/data:/opt/nanojaxgpt/data" \
  "$IMAGE" "$@"
echo "started container $NAME (restarts on failure, at most $RESTARTS times); following its log"
exec docker logs -f "$NAME"
