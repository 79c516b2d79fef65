#!/usr/bin/env bash
# The embedded demo: synthetic moving-shapes dataset, a small random-initialised CLIP (OpenAI state-dict
# format), a small BPE vocabulary when CLIP's is absent; trains DGL on CPU, evaluates before and after
# training, runs the QB-norm search and says where the checkpoint, TensorBoard logs and results.json are.
# Usage: scripts/demo.sh [--out demo_output] [--epochs N] ...   (python -m demo --help)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python -m demo "$@"
