#!/usr/bin/env bash
# DGL on your own captioned videos (--datatype custom), with the MSR-VTT recipe as the starting point
# (transformer latent space, lr 2e-3, 5 epochs, 128 per GPU, 12 frames, 32 words, one sample per caption, AMP).
# DATA_PATH holds train.csv and test.csv (or .tsv / .jsonl, one file per split: video, caption[, start, end, video_id]);
# VIDEO_PATH is the folder their 'video' paths are relative to (default: DATA_PATH). Fine-tune a trained
# DGL with --init_checkpoint <ckpt>. Extra flags go to main.py, e.g. --order_negatives reverse --batch_groups
# (a 'group' column in train.csv; docs/order.md). See docs/custom-data.md.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DATASET=custom
parse_mode "$@"
VIDEO_PATH="${VIDEO_PATH:-${DATA_PATH:-}}"
require_env
annotation_file() {  # DATA_PATH/<name>.csv, .tsv or .jsonl; two of them leave the choice open: refused
    local ext found=()
    for ext in csv tsv jsonl; do
        [[ ! -e "${DATA_PATH}/$1.${ext}" ]] || found+=("${DATA_PATH}/$1.${ext}")
    done
    (( ${#found[@]} <= 1 )) || die "DATA_PATH=${DATA_PATH} holds ${#found[@]} $1 files (${found[*]}); keep one"
    (( ${#found[@]} == 0 )) || echo "${found[0]}"
}
TEST_FILE="$(annotation_file test)" || exit 2
TRAIN_FILE="$(annotation_file train)" || exit 2
[[ -n "${TEST_FILE}" ]] || die "DATA_PATH=${DATA_PATH} holds no test.csv / test.tsv / test.jsonl (python -m preprocess.split_annotations writes them)"
[[ "${MODE}" == eval || -n "${TRAIN_FILE}" ]] || die "DATA_PATH=${DATA_PATH} holds no train.csv / train.tsv / train.jsonl"
LR=${LR:-2e-3}
LATENT=${SHARED_LATENT_SPACE:-transformer}
mode_flags
TRAIN_FLAGS=()
[[ -z "${TRAIN_FILE}" ]] || TRAIN_FLAGS=(--train_csv "${TRAIN_FILE}")
launch "${MODE_FLAGS[@]}" \
    --datatype custom "${TRAIN_FLAGS[@]}" --val_csv "${TEST_FILE}" --features_path "${VIDEO_PATH}" \
    --pretrained_dir "${PRETRAINED_DIR}" --pretrained_clip_name "${CLIP_NAME:-ViT-B/32}" \
    --output_dir "${OUTPUT_DIR}" \
    --lr "${LR}" --coef_lr 1e-3 --wd 0.2 --epochs 5 --optim AdamW \
    --batch_size "${BATCH_SIZE:-128}" --batch_size_val 16 --num_thread_reader 8 --n_display 50 \
    --max_words 32 --max_frames 12 --feature_framerate 3 --slice_framepos 2 --expand_msrvtt_sentences \
    --precision amp --freeze_clip 1 --shared_latent_space "${LATENT}" \
    --text_prompt_length 8 --local_each_frame_prompt_length 4 --global_visual_prompt_length 4 \
    --unified_transformer_layers 12 \
    "$@"
