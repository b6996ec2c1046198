#!/usr/bin/env bash
# Trains the shipped demo weights on this bundle's synthetic cohorts, through the bundle CLI only.
# Usage (from the bundle root): bash scripts/tools/train_demo.sh [chest|brain|all]
set -euo pipefail
cd "$(dirname "$0")/../.."
which="${1:-all}"
run() { python -m monai.bundle run "$@" --logging_file configs/logging.conf; }

if [[ "$which" == chest || "$which" == all ]]; then
    run generate --config_file configs/generate_cohort.json --modality chest --num_subjects 300 --seed 0
    run training --config_file "['configs/common.json','configs/chest_xray_2d.json','configs/train_autoencoder.json']" \
        --batch_size 8 --max_epochs 25 --val_interval 5 --adversarial_weight 0 --resume False
    run training --config_file "['configs/common.json','configs/chest_xray_2d.json','configs/train_diffusion.json']" \
        --batch_size 16 --learning_rate 0.0003 --max_epochs 240 --val_interval 40 --sample_every_epochs 120 --resume False
fi
if [[ "$which" == brain || "$which" == all ]]; then
    run generate --config_file configs/generate_cohort.json --modality brain --anatomy mni152 --num_subjects 200 --seed 0
    run training --config_file "['configs/common.json','configs/brain_mri_3d.json','configs/train_autoencoder.json']" \
        --patch_size "[32,32,32]" --batch_size 4 --learning_rate 0.001 --max_epochs 20 --val_interval 10 \
        --adversarial_weight 0 --resume False
    # GroupNorm statistics of 32^3 patches differ from whole volumes (a brighter reconstruction): adapt on whole ones
    cp models/autoencoder.pt runs/autoencoder_patches.pt
    run training --config_file "['configs/common.json','configs/brain_mri_3d.json','configs/train_autoencoder.json']" \
        --finetune_from runs/autoencoder_patches.pt --batch_size 2 --learning_rate 0.0002 --max_epochs 2 \
        --val_interval 1 --adversarial_weight 0 --resume False
    run training --config_file "['configs/common.json','configs/brain_mri_3d.json','configs/train_diffusion.json']" \
        --batch_size 8 --learning_rate 0.0003 --max_epochs 100 --val_interval 10 --sample_every_epochs 100 --delta 0.1 \
        --resume False
fi
