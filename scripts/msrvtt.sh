#!/usr/bin/env bash
# DGL on MSR-VTT 1k-A (published recipe: transformer latent space, lr 2e-3, 5 epochs, 128 per GPU x 4 GPUs,
# 12 frames at 3 fps, 32 words, AMP). DATA_PATH holds MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv and
# MSRVTT_data.json; VIDEO_PATH the videos. `bash scripts/msrvtt.sh --help` lists the environment variables.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DATASET=msrvtt
parse_mode "$@"
require_env
LR=${LR:-2e-3}
LATENT=${SHARED_LATENT_SPACE:-transformer}
mode_flags
launch "${MODE_FLAGS[@]}" \
    --datatype msrvtt \
    --train_csv "${DATA_PATH}/MSRVTT_train.9k.csv" --val_csv "${DATA_PATH}/MSRVTT_JSFUSION_test.csv" \
    --data_path "${DATA_PATH}/MSRVTT_data.json" --features_path "${VIDEO_PATH}" \
    --pretrained_dir "${PRETRAINED_DIR}" --pretrained_clip_name "${CLIP_NAME:-ViT-B/32}" \
    --output_dir "${OUTPUT_DIR}" \
    --lr "${LR}" --coef_lr 1e-3 --wd 0.2 --epochs 5 --optim AdamW \
    --batch_size "${BATCH_SIZE:-128}" --batch_size_val 16 --num_thread_reader 8 --n_display 50 \
    --max_words 32 --max_frames 12 --feature_framerate 3 --slice_framepos 2 --expand_msrvtt_sentences \
    --precision amp --freeze_clip 1 --shared_latent_space "${LATENT}" \
    --text_prompt_length 8 --local_each_frame_prompt_length 4 --global_visual_prompt_length 4 \
    --unified_transformer_layers 12 \
    "$@"
