"""scripts/demo.sh end to end, scaled down (the full demo takes a few minutes)."""
import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_small(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--out", str(out), "--epochs", "1",
                        "--num_train", "16", "--num_test", "8", "--batch_size", "8", "--max_frames", "3",
                        "--own_vocab", "--threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "text-to-video R@1 before training:" in r.stdout
    assert "QB-norm: Best beta: " in r.stdout
    run = out / "run"
    for name in ("ckpt.pth.tar", "ckpt.best.pth.tar", "results.json", "log.txt", "config.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    evals = json.loads((run / "results.json").read_text())["evaluations"]
    assert [e["epoch"] for e in evals] == [0, 1]
    assert (out / "pretrained" / "bpe_simple_vocab_16e6.txt.gz").is_file()   # the demo's own vocabulary
    assert json.loads((run / "config.json").read_text())["threads"] == 1   # --threads reaches main.py
    assert "cores: 1 compute thread(s)" in (run / "log.txt").read_text()
