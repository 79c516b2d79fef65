#!/usr/bin/env bash
# DGL on ActivityNet Captions, paragraph retrieval (published recipe: linear latent space, lr 1e-2, 10 epochs,
# 16 per GPU x 8 GPUs, 64 frames, 64 words, AMP). DATA_PATH holds train_ids.json, val_ids.json, train.json,
# val_1.json; VIDEO_PATH the videos.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DATASET=activity
parse_mode "$@"
require_env
LR=${LR:-1e-2}
LATENT=${SHARED_LATENT_SPACE:-linear}
mode_flags
launch "${MODE_FLAGS[@]}" \
    --datatype activity \
    --data_path "${DATA_PATH}" --features_path "${VIDEO_PATH}" \
    --pretrained_dir "${PRETRAINED_DIR}" --pretrained_clip_name "${CLIP_NAME:-ViT-B/32}" \
    --output_dir "${OUTPUT_DIR}" \
    --lr "${LR}" --coef_lr 1e-3 --wd 0.2 --epochs 10 --optim AdamW \
    --batch_size "${BATCH_SIZE:-16}" --batch_size_val 16 --num_thread_reader 6 --n_display 50 \
    --max_words 64 --max_frames 64 --feature_framerate 3 --slice_framepos 2 \
    --precision amp --freeze_clip 1 --shared_latent_space "${LATENT}" \
    --text_prompt_length 8 --local_each_frame_prompt_length 4 --global_visual_prompt_length 4 \
    --unified_transformer_layers 12 \
    "$@"
