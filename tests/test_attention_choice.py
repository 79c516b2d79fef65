"""Kernel choices made by timing (the CPU attention backend and fp32 product path, per use) are recorded, and a
rerun or a resumed run reuses them without timing again: two identical runs compute with the same kernels. A
candidate is kept only where its own timing on the run's computation beat the defaults."""
import json

import pytest
import torch

import modules.backends
from modules.backends import FLASH, MATH, backend_name, backends_from_name
from tests.toy import run_toy, tiny_dgl

REAL_CHOOSE = modules.backends.choose_for_use
FLAGS = dict(batch_size=4, data_kwargs={"num_videos": 4}, model_kwargs={"seed": 4}, no_tensorboard=True)


@pytest.fixture(autouse=True)
def _restore_settings():
    yield
    modules.backends.restore()


def _propose_everything(monkeypatch, onednn_exact=True):
    """The single-call checks propose math attention for both uses and, where exact, oneDNN products."""
    times = {("math", "eval"): 1.0, ("math", "train"): 1.0, ("flash", "eval"): 3.0, ("flash", "train"): 3.0}
    monkeypatch.setattr(modules.backends, "_cached_attention_times", lambda shape, dtype, threads: times)
    check = modules.backends.Fp32Check(exact=onednn_exact, error_mkl=1e-7, error_onednn=1e-7 if onednn_exact else 1e-3,
                                       speedup=1.5)
    monkeypatch.setattr(modules.backends, "_cached_fp32_check", lambda threads: check)


def _model_timing(monkeypatch, seconds_by_use):
    """Make the whole-model timing answer ``seconds_by_use[use][candidate name]`` (default 1 s) and record
    which candidates each use timed."""
    timed = {}
    real = REAL_CHOOSE

    def choose(model, use, *args, **kwargs):
        def fake_times(runs, rounds):
            timed.setdefault(use, []).extend(runs)
            return {name: seconds_by_use.get(use, {}).get(name, 1.0) for name in runs}
        monkeypatch.setattr(modules.backends, "time_candidates", fake_times)
        return real(model, use, *args, **kwargs)
    monkeypatch.setattr(modules.backends, "choose_for_use", choose)
    return timed


def _no_timing(monkeypatch):
    def refuse(runs, rounds):
        raise AssertionError(f"timed again: {sorted(runs)}")
    monkeypatch.setattr(modules.backends, "choose_for_use", REAL_CHOOSE)
    monkeypatch.setattr(modules.backends, "time_candidates", refuse)


def _precision_record(run_dir):
    return json.loads((run_dir / "reproducibility.json").read_text())["precision"]


def test_names_round_trip():
    for backends in (None, [MATH], [FLASH, MATH]):
        assert backends_from_name(backend_name(backends)) == backends
    with pytest.raises(ValueError):
        backends_from_name("fast")


def test_choice_is_kept_only_where_its_own_timing_won():
    """Candidates that lose on the model, or win by less than MODEL_MIN_SPEEDUP, leave the defaults; a clear
    winner is kept; each use on its own times."""
    model = tiny_dgl(width=128, max_frames=3)
    mp = pytest.MonkeyPatch()
    try:
        _propose_everything(mp)
        default, math, onednn_math = "mkl + PyTorch's choice", "mkl + math", "onednn + math"
        timed = _model_timing(mp, {"eval": {default: 1.0, math: 1.5, onednn_math: 1.01 ** -1},  # loses / 1 % only
                                   "train": {default: 1.0, onednn_math: 0.5}})
        tuning = modules.backends.tune(model, "cpu", "fp32")
        assert set(timed["eval"]) == set(timed["train"]) == {default, math, "onednn + PyTorch's choice", onednn_math}
        assert (tuning.eval_fp32, tuning.eval_attention) == ("mkl", None)  # the bare call's favourite lost here
        assert (tuning.train_fp32, tuning.train_attention) == ("onednn", [MATH])
        assert tuning.choices["eval"].seconds[math] == 1.5 and tuning.choices["train"].source == "measured"
        # the process's fp32 path is the training one (its backward runs outside any context); evaluation
        # switches to its own path inside inference()
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        with tuning.inference():
            assert torch.backends.mkldnn.matmul.fp32_precision != "bf16"
        tuning.restore()
        # oneDNN computing in reduced precision is never a candidate, whatever a timing says
        _propose_everything(mp, onednn_exact=False)
        timed = _model_timing(mp, {"eval": {onednn_math: 0.1}})
        tuning = modules.backends.tune(model, "cpu", "fp32")
        assert set(timed["eval"]) == {default, math} and tuning.eval_fp32 == "mkl"
        tuning.restore()
    finally:
        mp.undo()


def test_a_candidate_must_win_every_round_of_its_timing(monkeypatch):
    """The whole-model timing is compared round by round: a candidate far faster in two rounds but slower in
    one (a load spike on the default's turn looks like that) leaves the defaults; of the candidates that win
    every round by MODEL_MIN_SPEEDUP, the one with the largest smallest gain is kept."""
    model = tiny_dgl(width=128, max_frames=3)
    _propose_everything(monkeypatch)
    default, math, onednn, onednn_math = ("mkl + PyTorch's choice", "mkl + math", "onednn + PyTorch's choice",
                                          "onednn + math")
    rounds = {"eval": {default: [1.0, 2.0, 1.0], math: [0.5, 0.5, 1.1], onednn: [1.5, 3.0, 1.5],
                       onednn_math: [0.95, 1.9, 0.99]},  # math: best of rounds 0.5, loses round 3
              "train": {default: [1.0, 1.0, 1.0], math: [0.9, 0.9, 0.9], onednn: [0.7, 0.97, 0.7],
                        onednn_math: [0.95, 0.95, 0.95]}}

    def choose(model, use, *args, **kwargs):
        monkeypatch.setattr(modules.backends, "time_candidates", lambda runs, n: {k: rounds[use][k] for k in runs})
        return REAL_CHOOSE(model, use, *args, **kwargs)
    monkeypatch.setattr(modules.backends, "choose_for_use", choose)
    tuning = modules.backends.tune(model, "cpu", "fp32")
    assert (tuning.eval_fp32, tuning.eval_attention) == ("mkl", None)
    assert tuning.choices["eval"].seconds[math] == 0.5  # recorded: each candidate's best round
    # onednn alone wins by 3 % in its worst round, math by 11 % in every round: math
    assert (tuning.train_fp32, tuning.train_attention) == ("mkl", [MATH])
    tuning.restore()


def test_forced_choices_are_results_within_tolerance_of_the_untuned_path(monkeypatch):
    """Whatever the timing picks (here: oneDNN and math for both uses), fp32 results equal the untuned
    ones to 1e-5 (features and prompt gradients)."""
    model = tiny_dgl(width=128, max_frames=3)
    g = torch.Generator().manual_seed(1)
    video = torch.randn(2, 3, 3, 32, 32, generator=g)
    ids = torch.randint(1, 63, (2, 8), generator=g)
    ids[:, -1] = 63
    mask = torch.ones(2, 3, dtype=torch.long)

    def results(context):
        model.zero_grad(set_to_none=True)
        with context():
            out = model(ids, video, mask)
        out["loss"].backward()
        grads = torch.cat([p.grad.flatten() for _, p in model.trainable_parameters() if p.grad is not None])
        with torch.no_grad(), context():
            model.eval()
            features = model.encode_video(video, mask)
            model.train()
        return out["text_features"].detach(), out["video_features"].detach(), grads, features

    import contextlib
    reference = results(contextlib.nullcontext)
    _propose_everything(monkeypatch)
    _model_timing(monkeypatch, {use: {"onednn + math": 0.5} for use in ("train", "eval")})
    with modules.backends.tune(model, "cpu", "fp32") as tuning:
        assert tuning.choices["train"].name == tuning.choices["eval"].name == "onednn + math"
        got = results(tuning.autocast)
        got_eval = results(tuning.inference)
    for a, b in zip(got + got_eval, reference + reference):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_measured_choice_is_recorded_and_reused_on_resume(tmp_path, monkeypatch):
    _propose_everything(monkeypatch)
    _model_timing(monkeypatch, {"train": {"mkl + math": 0.5}, "eval": {"onednn + PyTorch's choice": 0.5}})
    first = tmp_path / "first"
    run_toy(str(first), epochs=1, **FLAGS)
    record = _precision_record(first)
    assert {k: record["attention"][k] for k in ("train", "eval", "flag", "source")} == {
        "train": "math", "eval": "PyTorch's choice", "flag": "auto", "source": "measured at start-up"}
    assert record["kernels"]["train"]["seconds"]["mkl + math"] == 0.5
    assert record["kernels"]["eval"]["fp32_products"] == "onednn"
    ckpt = torch.load(first / "ckpt.pth.tar", weights_only=False)
    assert ckpt["attention_backends"] == {"train": "math", "eval": "PyTorch's choice", "device": "cpu"}
    assert ckpt["kernels"]["eval"]["fp32_products"] == "onednn" and ckpt["kernels"]["train"]["fp32_products"] == "mkl"

    # a resumed run takes the recorded kernels without timing anything
    _no_timing(monkeypatch)
    resumed = tmp_path / "resumed"
    auto = run_toy(str(resumed), epochs=2, resume=str(first / "ckpt.pth.tar"), **FLAGS)
    rec = _precision_record(resumed)
    assert (rec["attention"]["train"], rec["attention"]["eval"], rec["attention"]["flag"]) == (
        "math", "PyTorch's choice", "auto")
    assert rec["attention"]["source"].startswith("recorded in ") and rec["attention"]["source"].endswith("ckpt.pth.tar")
    assert rec["kernels"]["eval"]["source"] == "recorded" and rec["kernels"]["eval"]["fp32_products"] == "onednn"
    assert torch.load(resumed / "ckpt.pth.tar", weights_only=False)["kernels"]["train"]["attention"] == "math"
    # the same as resuming with the training backend named on the command line, bit for bit
    named = run_toy(str(tmp_path / "named"), epochs=2, resume=str(first / "ckpt.pth.tar"),
                    attention_backend="math", **FLAGS)
    assert [loss for _, loss in auto["step_losses"]] == [loss for _, loss in named["step_losses"]]


def test_flag_forces_the_backend_without_measuring(tmp_path, monkeypatch):
    _propose_everything(monkeypatch, onednn_exact=False)
    _no_timing(monkeypatch)  # math forced, MKL the only exact path: nothing left to time
    forced = tmp_path / "math"
    run_toy(str(forced), epochs=1, attention_backend="math", **FLAGS)
    rec = _precision_record(forced)["attention"]
    assert (rec["train"], rec["eval"], rec["flag"], rec["source"]) == ("math", "math", "math", "--attention_backend")
    assert torch.load(forced / "ckpt.pth.tar", weights_only=False)["attention_backends"]["eval"] == "math"
    # a flag given with --resume wins over the checkpoint's record
    over = tmp_path / "flash"
    run_toy(str(over), epochs=2, resume=str(forced / "ckpt.pth.tar"), attention_backend="flash", **FLAGS)
    rec = _precision_record(over)["attention"]
    assert (rec["train"], rec["eval"], rec["flag"], rec["source"]) == ("flash", "flash", "flash", "--attention_backend")


def test_fp32_product_path_is_recorded_and_reused_on_resume(tmp_path, monkeypatch):
    _propose_everything(monkeypatch)
    _model_timing(monkeypatch, {"train": {"onednn + PyTorch's choice": 0.5}})
    first = tmp_path / "first"
    run_toy(str(first), epochs=1, **FLAGS)
    record = _precision_record(first)["fp32_products"]
    assert record == {"path": "onednn", "source": "measured at start-up"}
    assert torch.load(first / "ckpt.pth.tar", weights_only=False)["fp32_products"] == {"path": "onednn",
                                                                                       "device": "cpu"}
    # the timing now says MKL: a new run takes it, the resumed run keeps the first run's path
    _model_timing(monkeypatch, {})
    fresh = tmp_path / "fresh"
    run_toy(str(fresh), epochs=1, **FLAGS)
    assert _precision_record(fresh)["fp32_products"]["path"] == "mkl"
    resumed = tmp_path / "resumed"
    run_toy(str(resumed), epochs=2, resume=str(first / "ckpt.pth.tar"), **FLAGS)
    record = _precision_record(resumed)["fp32_products"]
    assert record["path"] == "onednn" and record["source"] == f"recorded in {first / 'ckpt.pth.tar'}"
    assert torch.load(resumed / "ckpt.pth.tar", weights_only=False)["fp32_products"]["path"] == "onednn"
    assert "training step: fp32 matrix products onednn, attention backend PyTorch's choice (recorded)" in \
        (resumed / "log.txt").read_text()
