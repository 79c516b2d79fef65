#!/usr/bin/env bash
# Shared by scripts/{msrvtt,vatex,lsmdc,activitynet}.sh: environment checks and the torchrun launch.
#
# Environment:
#   DATA_PATH        dataset annotations (required)
#   VIDEO_PATH       videos (default: $DATA_PATH/videos)
#   PRETRAINED_DIR   folder with ViT-B-32.pt / ViT-B-16.pt and bpe_simple_vocab_16e6.txt.gz
#                    (default: $DGL_PRETRAINED_DIR; required)
#   OUTPUT_DIR       where checkpoints / logs / results.json go (default: runs/<dataset>_dgl_<latent>_lr<lr>)
#   NUM_GPUS         processes per node (default: GPUs visible to nvidia-smi / CUDA_VISIBLE_DEVICES; 1 on CPU)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node runs (defaults 1, 0, 127.0.0.1, 29500)
#   CLIP_NAME        ViT-B/32 (default) or ViT-B/16;  SHARED_LATENT_SPACE  transformer | linear
# Extra arguments are passed on to main.py (later flags win), e.g. --do_eval 1 --resume ckpt.best.pth.tar
set -euo pipefail

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

require_env() {
    [[ -n "${DATA_PATH:-}" ]] || die "set DATA_PATH to the ${DATASET} annotation folder"
    [[ -d "${DATA_PATH}" ]] || die "DATA_PATH=${DATA_PATH} is not a directory"
    VIDEO_PATH="${VIDEO_PATH:-${DATA_PATH}/videos}"
    [[ -d "${VIDEO_PATH}" ]] || die "VIDEO_PATH=${VIDEO_PATH} is not a directory (set VIDEO_PATH to the ${DATASET} videos)"
    PRETRAINED_DIR="${PRETRAINED_DIR:-${DGL_PRETRAINED_DIR:-}}"
    [[ -n "${PRETRAINED_DIR}" ]] || die "set PRETRAINED_DIR to the folder holding the CLIP weights (ViT-B-32.pt)"
    [[ -d "${PRETRAINED_DIR}" ]] || die "PRETRAINED_DIR=${PRETRAINED_DIR} is not a directory"
    local clip="${CLIP_NAME:-ViT-B/32}"; clip="${clip//\//-}"; [[ "${clip}" == *.* ]] || clip="${clip}.pt"
    [[ -f "${PRETRAINED_DIR}/${clip}" ]] || die "CLIP weights ${PRETRAINED_DIR}/${clip} not found (set PRETRAINED_DIR / CLIP_NAME)"
}

count_gpus() {
    if [[ -n "${NUM_GPUS:-}" ]]; then echo "${NUM_GPUS}"; return; fi
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        echo "${CUDA_VISIBLE_DEVICES}" | tr ',' '\n' | grep -c .; return
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        local n; n=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
        if [[ "${n}" -gt 0 ]]; then echo "${n}"; return; fi
    fi
    echo 1
}

launch() {
    local nproc; nproc=$(count_gpus)
    [[ "${nproc}" =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS must be a positive integer, got '${nproc}'"
    echo "[${DATASET}] ${nproc} process(es) per node x ${NNODES:-1} node(s); output: ${OUTPUT_DIR}"
    cd "${REPO_DIR}"
    exec python -m torch.distributed.run \
        --nproc_per_node "${nproc}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
        --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
        main.py "$@"
}
