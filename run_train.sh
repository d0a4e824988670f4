#!/usr/bin/env bash
# Launch training with torchrun. Environment:
#   NGPU         processes on this node (default 1; CPU runs use gloo, one process per rank)
#   CONFIG_FILE  TOML job config (default: train_configs/debug.toml, the CPU-sized embedded default)
#   LOG_RANK     rank whose INFO logs are shown (default 0; the others show warnings and errors)
#   MAX_RESTARTS times torchrun restarts every rank after one dies (default 0); each restart resumes
#                from the newest complete checkpoint (checkpoint.enable = true)
# Extra arguments are passed to the trainer, e.g. ./run_train.sh --training.steps 20
set -euo pipefail
cd "$(dirname "$0")"

NGPU=${NGPU:-1}
CONFIG_FILE=${CONFIG_FILE:-./train_configs/debug.toml}
export LOG_RANK=${LOG_RANK:-0}
MAX_RESTARTS=${MAX_RESTARTS:-0}
# a fresh rendezvous TCPStore for every restart: torchrun's shared one can hand the restarted ranks
# addresses of the dead ones (pytorch/pytorch#135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# every rank's output goes straight to the console: the trainer's logger prefixes each line with its
# rank once and filters by LOG_RANK itself (torchrun's --tee/--local-ranks-filter would add a second
# prefix and hide the other ranks' errors)
exec python -m torch.distributed.run --nproc_per_node="${NGPU}" --rdzv_backend c10d --rdzv_endpoint="localhost:0" \
    --max-restarts="${MAX_RESTARTS}" train.py --config "${CONFIG_FILE}" "$@"
