#!/usr/bin/env bash
# Create a Cloud TPU VM slice, install nanojaxgpt on every host, and run the same training
# command on all of them (jax.distributed finds the other hosts by itself on TPU VMs).
#
#   export TPU_NAME=gpt2 ZONE=us-central2-b ACCELERATOR=v4-32 BUCKET=gs://my-bucket
#   launch/tpu_vm.sh create          # add SPOT=1 for a spot (preemptible) slice
#   launch/tpu_vm.sh setup           # copy this checkout to every worker and pip install it
#   launch/tpu_vm.sh train configs/gpt2_124m.toml --data_dir=$BUCKET/openwebtext --out_dir=$BUCKET/runs/gpt2
#   launch/tpu_vm.sh logs            # follow worker 0's log
#   launch/tpu_vm.sh stop            # SIGTERM: every host saves a checkpoint and exits 0
#   launch/tpu_vm.sh delete
#   # or all of it, unattended, until the run writes out_dir/DONE (re-creating a preempted slice):
#   SPOT=1 launch/tpu_vm.sh run configs/gpt2_124m.toml --data_dir=$BUCKET/openwebtext --out_dir=$BUCKET/runs/gpt2
#   (QUEUED=1, BEST_EFFORT=1, NUM_SLICES=2 and SUPERVISE_ARGS="--max-retries=50" go to launch/supervise.py)
#
# Running `train` again with the same --out_dir resumes from the latest complete checkpoint,
# also on a slice of another size. Credentials: the TPU VM's service account (ADC); it needs
# read/write access to $BUCKET.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
LOG=${LOG:-\$HOME/nanojaxgpt-train.log}

on_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}

cmd=${1:?usage: launch/tpu_vm.sh create|setup|train CONFIG [--key=value ...]|run CONFIG [--key=value ...]|logs|stop|delete}
shift
case "$cmd" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR" --version "$RUNTIME" ${SPOT:+--spot}
    ;;
  setup)
    # The committed tree of this checkout, so every host runs exactly the same code.
    tarball=$(mktemp --suffix=.tar.gz)
    git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$tarball" HEAD
    gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:nanojaxgpt.tar.gz" --zone "$ZONE" --worker=all
    on_all "set -e; rm -rf nanojaxgpt && mkdir nanojaxgpt && tar -xzf nanojaxgpt.tar.gz -C nanojaxgpt && \
      cd nanojaxgpt && pip install -q -e . && \
      pip install -q \"jax[tpu]==\$(pip show jax | sed -n 's/^Version: //p')\""
    ;;
  train)
    args=$(printf '%q ' "$@")
    # nohup + setsid: training outlives the ssh session; the log stays on every host.
    on_all "cd nanojaxgpt && setsid nohup python -m nanojaxgpt.train $args > $LOG 2>&1 < /dev/null &"
    echo "started on all workers; follow with: launch/tpu_vm.sh logs"
    ;;
  run)
    flags=(--name "$TPU_NAME" --zone "$ZONE" --accelerator "$ACCELERATOR" --version "$RUNTIME"
           --num-slices "${NUM_SLICES:-1}" ${SPOT:+--spot} ${BEST_EFFORT:+--best-effort} ${QUEUED:+--queued})
    # shellcheck disable=SC2086  # SUPERVISE_ARGS is a list of flags
    exec python3 "$(dirname "$0")/supervise.py" "${flags[@]}" ${SUPERVISE_ARGS:-} -- "$@"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=0 --command "tail -f $LOG"
    ;;
  stop)
    on_all "pkill -TERM -f nanojaxgpt.train || true"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet
    ;;
  *)
    echo "unknown command $cmd" >&2; exit 2
    ;;
esac
