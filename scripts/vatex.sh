#!/usr/bin/env bash
# DGL on VATEX (published recipe: linear latent space, lr 5e-3, 10 epochs, 64 per GPU x 8 GPUs, 12 frames,
# 32 words, AMP). DATA_PATH holds train_list.txt, test_list.txt, ref_captions.json; VIDEO_PATH the videos.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DATASET=vatex
parse_mode "$@"
require_env
LR=${LR:-5e-3}
LATENT=${SHARED_LATENT_SPACE:-linear}
mode_flags
launch "${MODE_FLAGS[@]}" \
    --datatype vatex \
    --data_path "${DATA_PATH}" --features_path "${VIDEO_PATH}" \
    --pretrained_dir "${PRETRAINED_DIR}" --pretrained_clip_name "${CLIP_NAME:-ViT-B/32}" \
    --output_dir "${OUTPUT_DIR}" \
    --lr "${LR}" --coef_lr 1e-3 --wd 0.2 --epochs 10 --optim AdamW \
    --batch_size "${BATCH_SIZE:-64}" --batch_size_val 16 --num_thread_reader 8 --n_display 50 \
    --max_words 32 --max_frames 12 --feature_framerate 3 --slice_framepos 2 \
    --precision amp --freeze_clip 1 --shared_latent_space "${LATENT}" \
    --text_prompt_length 8 --local_each_frame_prompt_length 4 --global_visual_prompt_length 4 \
    --unified_transformer_layers 12 \
    "$@"
