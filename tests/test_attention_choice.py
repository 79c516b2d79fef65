"""A choice made by timing (the CPU attention backend) is recorded, and a rerun or a resumed run reuses it:
two identical runs compute with the same kernels."""
import json

import pytest
import torch

from modules.backends import FLASH, MATH, backend_name, backends_from_name
from tests.toy import run_toy

FLAGS = dict(batch_size=4, data_kwargs={"num_videos": 4}, model_kwargs={"seed": 4}, no_tensorboard=True)


def _timing_picks(monkeypatch, train, evaluation):
    """Make the start-up measurement answer (eval, train) backends as if timed so."""
    import modules.backends

    calls = []

    def choose(shape, dtype):
        calls.append(shape)
        return evaluation, train, {}
    monkeypatch.setattr(modules.backends, "choose_attention", choose)
    return calls


def _attention(run_dir):
    return json.loads((run_dir / "reproducibility.json").read_text())["precision"]["attention"]


def test_names_round_trip():
    for backends in (None, [MATH], [FLASH, MATH]):
        assert backends_from_name(backend_name(backends)) == backends
    with pytest.raises(ValueError):
        backends_from_name("fast")


def test_measured_choice_is_recorded_and_reused_on_resume(tmp_path, monkeypatch):
    _timing_picks(monkeypatch, train=[MATH], evaluation=[FLASH, MATH])
    first = tmp_path / "first"
    run_toy(str(first), epochs=1, **FLAGS)
    assert _attention(first) == {"train": "math", "eval": "flash", "flag": "auto", "source": "measured at start-up"}
    ckpt = torch.load(first / "ckpt.pth.tar", weights_only=False)
    assert ckpt["attention_backends"] == {"train": "math", "eval": "flash", "device": "cpu"}

    # the timing now says otherwise: the resumed run still computes as the first one did
    _timing_picks(monkeypatch, train=[FLASH, MATH], evaluation=[MATH])
    resumed = tmp_path / "resumed"
    auto = run_toy(str(resumed), epochs=2, resume=str(first / "ckpt.pth.tar"), **FLAGS)
    rec = _attention(resumed)
    assert (rec["train"], rec["eval"], rec["flag"]) == ("math", "flash", "auto")
    assert rec["source"].startswith("recorded in ") and rec["source"].endswith("ckpt.pth.tar")
    assert torch.load(resumed / "ckpt.pth.tar", weights_only=False)["attention_backends"]["train"] == "math"
    # the same as resuming with the backends named on the command line, bit for bit
    named = run_toy(str(tmp_path / "named"), epochs=2, resume=str(first / "ckpt.pth.tar"),
                    attention_backend="math", **FLAGS)
    assert [loss for _, loss in auto["step_losses"]] == [loss for _, loss in named["step_losses"]]


def test_flag_forces_the_backend_without_measuring(tmp_path, monkeypatch):
    calls = _timing_picks(monkeypatch, train=[FLASH, MATH], evaluation=[FLASH, MATH])
    forced = tmp_path / "math"
    run_toy(str(forced), epochs=1, attention_backend="math", **FLAGS)
    assert _attention(forced) == {"train": "math", "eval": "math", "flag": "math", "source": "--attention_backend"}
    assert torch.load(forced / "ckpt.pth.tar", weights_only=False)["attention_backends"]["eval"] == "math"
    # a flag given with --resume wins over the checkpoint's record
    over = tmp_path / "flash"
    run_toy(str(over), epochs=2, resume=str(forced / "ckpt.pth.tar"), attention_backend="flash", **FLAGS)
    assert _attention(over) == {"train": "flash", "eval": "flash", "flag": "flash", "source": "--attention_backend"}
    assert calls == []  # nothing was timed


def _timing_says_fp32(monkeypatch, speedup):
    """Make the start-up fp32 check answer: oneDNN exact, ``speedup`` times as fast as MKL."""
    import modules.backends

    check = modules.backends.Fp32Check(exact=True, error_mkl=1e-7, error_onednn=1e-7, speedup=speedup)
    monkeypatch.setattr(modules.backends, "_cached_fp32_check", lambda threads: check)


def test_fp32_product_path_is_recorded_and_reused_on_resume(tmp_path, monkeypatch):
    _timing_says_fp32(monkeypatch, speedup=1.5)
    first = tmp_path / "first"
    run_toy(str(first), epochs=1, **FLAGS)
    record = json.loads((first / "reproducibility.json").read_text())["precision"]["fp32_products"]
    assert record == {"path": "onednn", "source": "measured at start-up"}
    assert torch.load(first / "ckpt.pth.tar", weights_only=False)["fp32_products"] == {"path": "onednn",
                                                                                       "device": "cpu"}
    # the timing now says MKL: a new run takes it, the resumed run keeps the first run's path
    _timing_says_fp32(monkeypatch, speedup=1.0)
    fresh = tmp_path / "fresh"
    run_toy(str(fresh), epochs=1, **FLAGS)
    assert json.loads((fresh / "reproducibility.json").read_text())["precision"]["fp32_products"]["path"] == "mkl"
    resumed = tmp_path / "resumed"
    run_toy(str(resumed), epochs=2, resume=str(first / "ckpt.pth.tar"), **FLAGS)
    record = json.loads((resumed / "reproducibility.json").read_text())["precision"]["fp32_products"]
    assert record["path"] == "onednn" and record["source"] == f"recorded in {first / 'ckpt.pth.tar'}"
    assert torch.load(resumed / "ckpt.pth.tar", weights_only=False)["fp32_products"]["path"] == "onednn"
    assert "fp32 matrix products: oneDNN (recorded: onednn" in (resumed / "log.txt").read_text()
