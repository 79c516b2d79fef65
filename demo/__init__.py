"""The demo: a synthetic moving-shapes dataset, a tiny CLIP, DGL trained on CPU in a few minutes.
Run it with ``bash scripts/demo.sh`` or ``python -m demo``."""
