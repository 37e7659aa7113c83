#!/usr/bin/env bash
# Train one model on N processes with accelerate: `train.batch_size` stays the global batch of a step.
#
#   scripts/train_multiprocess.sh configs/emoji.yaml 2 [key=value ...]
#
# With GPUs this is the usual multi-GPU launch. Without them, ACCELERATE_USE_CPU=true makes accelerate
# start N CPU processes on the gloo backend (`accelerate launch --cpu --num_processes N` starts only one).
set -euo pipefail
config=${1:?usage: $0 CONFIG NUM_PROCESSES [key=value ...]}
processes=${2:-2}
shift 2 || true
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${CART_BIN:-$here/.venv/bin}
if ! "$bin/python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    export ACCELERATE_USE_CPU=true
fi
exec "$bin/accelerate" launch --multi_gpu --num_processes "$processes" --num_machines 1 \
    --dynamo_backend no -m cart train --config "$config" "$@"
