#!/usr/bin/env bash
# Shared by scripts/{msrvtt,vatex,lsmdc,activitynet}.sh: environment checks, run mode and the launch.
# Relative paths (DATA_PATH, OUTPUT_DIR, --resume, ...) are relative to the current folder.
set -euo pipefail

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    sed -n '2,/^[^#]/{s/^# \{0,1\}//p}' "$0"
    cat <<'HELP'

Usage: [ENV=value ...] bash scripts/<dataset>.sh [main.py flags ...]   (later flags win)

Environment:
  DATA_PATH        dataset annotations (required)
  VIDEO_PATH       videos (default: $DATA_PATH/videos)
  PRETRAINED_DIR   folder with the CLIP weights (ViT-B-32.pt / ViT-B-16.pt) and bpe_simple_vocab_16e6.txt.gz
                   (default: $DGL_PRETRAINED_DIR; required)
  CLIP_NAME        ViT-B/32 (default), ViT-B/16, or a file name in PRETRAINED_DIR
  OUTPUT_DIR       training: runs/<dataset>_dgl_<latent>_lr<lr>;  evaluation: runs/<dataset>_eval_<date-time>
  EVAL             1: evaluate only (never trains, never writes a checkpoint); same as passing --do_eval 1
                   without --do_train 1. Give the checkpoint with --resume <file>.
  SHARED_LATENT_SPACE   transformer | linear (default: the recipe's)
  LR, BATCH_SIZE   override the recipe's learning rate / per-process batch
  NUM_GPUS         processes per node (default: the GPUs visible; 1 on CPU). One process on one node runs
                   main.py directly; more run under torchrun.
  NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node runs (defaults 1, 0, 127.0.0.1, 29500)

Examples:
  DATA_PATH=/data/msrvtt PRETRAINED_DIR=/models/clip bash scripts/msrvtt.sh                 # train
  DATA_PATH=/data/msrvtt PRETRAINED_DIR=/models/clip EVAL=1 bash scripts/msrvtt.sh --resume runs/x/ckpt.best.pth.tar
  DATA_PATH=/data/msrvtt PRETRAINED_DIR=/models/clip bash scripts/msrvtt.sh --do_eval 1 \
      --resume runs/x/ckpt.best.pth.tar                                                     # the same

main.py's flags follow.

HELP
}

# Sets MODE (train | eval) from EVAL and the flags; with --help / -h prints the help and exits.
parse_mode() {
    local do_train="" do_eval="" prev=""
    for arg in "$@"; do
        case "${arg}" in
            -h|--help) usage; exec python "${REPO_DIR}/main.py" --help ;;
            --do_train=*) do_train="${arg#*=}" ;;
            --do_eval=*) do_eval="${arg#*=}" ;;
        esac
        case "${prev}" in
            --do_train) do_train="${arg}" ;;
            --do_eval) do_eval="${arg}" ;;
        esac
        prev="${arg}"
    done
    MODE=train
    if [[ "${EVAL:-0}" == 1 ]]; then
        [[ "${do_train}" != 1 ]] || die "EVAL=1 evaluates only; do not pass --do_train 1"
        MODE=eval
    elif [[ "${do_eval}" == 1 && "${do_train}" != 1 ]]; then
        MODE=eval
    fi
}

require_env() {
    [[ -n "${DATA_PATH:-}" ]] || die "set DATA_PATH to the ${DATASET} annotation folder (see --help)"
    [[ -d "${DATA_PATH}" ]] || die "DATA_PATH=${DATA_PATH} is not a directory"
    VIDEO_PATH="${VIDEO_PATH:-${DATA_PATH}/videos}"
    [[ -d "${VIDEO_PATH}" ]] || die "VIDEO_PATH=${VIDEO_PATH} is not a directory (set VIDEO_PATH to the ${DATASET} videos)"
    PRETRAINED_DIR="${PRETRAINED_DIR:-${DGL_PRETRAINED_DIR:-}}"
    [[ -n "${PRETRAINED_DIR}" ]] || die "set PRETRAINED_DIR to the folder holding the CLIP weights (ViT-B-32.pt)"
    [[ -d "${PRETRAINED_DIR}" ]] || die "PRETRAINED_DIR=${PRETRAINED_DIR} is not a directory"
    local clip="${CLIP_NAME:-ViT-B/32}"; clip="${clip//\//-}"; [[ "${clip}" == *.* ]] || clip="${clip}.pt"
    [[ -f "${PRETRAINED_DIR}/${clip}" ]] || die "CLIP weights ${PRETRAINED_DIR}/${clip} not found (set PRETRAINED_DIR / CLIP_NAME)"
}

# The run-mode flags and the default output folder: an evaluation gets a folder of its own.
mode_flags() {
    if [[ "${MODE}" == eval ]]; then
        OUTPUT_DIR="${OUTPUT_DIR:-runs/${DATASET}_eval_$(date +%Y%m%d-%H%M%S)}"
        MODE_FLAGS=(--do_eval 1 --do_train 0)
    else
        OUTPUT_DIR="${OUTPUT_DIR:-runs/${DATASET}_dgl_${LATENT}_lr${LR}}"
        MODE_FLAGS=(--do_train 1)
    fi
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

# main.py with the given flags: directly for one process, under torchrun (training/launch.py) for several;
# either way main.py's one-line error is the last line and its exit status is the script's.
launch() {
    local nproc; nproc=$(count_gpus)
    [[ "${nproc}" =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS must be a positive integer, got '${nproc}'"
    [[ "${NNODES:-1}" =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '${NNODES}'"
    echo "[${DATASET}] ${MODE}: ${nproc} process(es) per node x ${NNODES:-1} node(s); output: ${OUTPUT_DIR}"
    if [[ "${nproc}" == 1 && "${NNODES:-1}" == 1 ]]; then
        exec python "${REPO_DIR}/main.py" "$@"
    fi
    export PYTHONPATH="${REPO_DIR}${PYTHONPATH:+:${PYTHONPATH}}"   # for python -m training.launch
    exec python -m training.launch \
        --nproc_per_node "${nproc}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
        --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
        "${REPO_DIR}/main.py" "$@"
}
