#!/usr/bin/env bash
# The embedded demo: synthetic moving-shapes clips whose captions need the whole video ("moves left then
# up"), a tiny CLIP pre-trained on single frames and frozen (OpenAI state-dict format), DGL's prompts
# trained on CPU with main.py, then a table: text-to-video R@1/R@5 and an order probe for the frozen CLIP
# alone, DGL-Transformer and (--compare) DGL-Linear. Data and CLIP are kept per configuration and reused.
# Usage: scripts/demo.sh [--out demo_output] [--epochs N] [--compare] ...   (python -m demo --help)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python -m demo "$@"
