"""End-to-end runs of the training / evaluation loop on tiny in-memory data with a tiny random CLIP."""
import json

import numpy as np
import pytest
import torch

from modules.metrics import compute_ranks, metrics_from_ranks
from tests.toy import FIXED_KERNELS, ToyData, run_toy, tiny_dgl


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_train_and_eval_end_to_end(tmp_path):
    out = tmp_path / "run"
    s = run_toy(str(out), epochs=2, do_train=1, do_eval=1, gradient_accumulation_steps=2, batch_size=4,
                save_sim_matrix=True, **FIXED_KERNELS)
    for name in ("ckpt.pth.tar", "ckpt.best.pth.tar", "results.json", "config.json", "log.txt"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    results = json.loads((out / "results.json").read_text())
    evals = results["evaluations"]
    assert [e["tag"] for e in evals] == ["eval", "epoch", "epoch"]   # before training, then every epoch
    assert [e["epoch"] for e in evals] == [0, 1, 2]
    # 16 samples, micro-batch 2, accumulation 2 -> 4 optimiser steps per epoch
    assert [e["global_step"] for e in evals] == [0, 4, 8]
    for e in evals:
        for d in ("t2v", "v2t"):
            assert set(e[d]) >= {"R1", "R5", "R10", "MR", "MeanR"}
    assert results["best"]["epoch"] in (1, 2)
    assert all(np.isfinite(l) for _, l in s["step_losses"])
    ckpt = _load(out / "ckpt.pth.tar")
    # the official layout
    assert {"epoch", "global_step", "arch", "best_acc1", "optimizer", "state_dict"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 8
    keys = list(ckpt["state_dict"])
    assert all(k.startswith("module.") for k in keys)
    assert "module.clip.visual.prompt_embeddings" in keys and "module.clip.visual_prompt_embedding" in keys
    assert "module.clip.prefix_text_prompt_proj_layer.weight" in keys
    assert "module.clip.visual.conv1.weight" in keys
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr"] == 1e-2 and cfg["epochs"] == 2
    log = (out / "log.txt").read_text()
    assert "trainable parameters:" in log
    assert (out / "msrvtt_sim_matrix.npy").is_file()
    sim = np.load(out / "msrvtt_sim_matrix.npy")
    assert sim.shape == (16, 16)
    np.testing.assert_allclose(metrics_from_ranks(compute_ranks(sim))["R1"], evals[-1]["t2v"]["R1"])
    assert np.load(out / "msrvtt_train_test_t2v.npy").shape == (16, 16)
    assert np.load(out / "msrvtt_train_test_v2t.npy").shape == (16, 16)


def test_only_prompts_change_and_optimizer_groups(tmp_path):
    model0 = tiny_dgl()
    s = run_toy(str(tmp_path / "r"), epochs=1, **FIXED_KERNELS)
    model1 = s["model"]
    trainable = {n for n, _ in model1.trainable_parameters()}
    p0, p1 = dict(model0.named_parameters()), dict(model1.named_parameters())
    changed = {n for n in p0 if not torch.equal(p0[n], p1[n])}
    assert changed and changed <= trainable                    # the CLIP backbone stays frozen
    assert "clip.logit_scale" not in changed
    ckpt = _load(tmp_path / "r" / "ckpt.pth.tar")
    groups = ckpt["optimizer"]["param_groups"]
    decay = [g for g in groups if g["decay_mult"] == 1.0]
    no_decay = [g for g in groups if g["decay_mult"] == 0.0]
    assert decay and no_decay
    names = [n for n, _ in model1.trainable_parameters()]
    n_bias = sum("bias" in n for n in names)
    assert sum(len(g["params"]) for g in no_decay) == n_bias
    assert ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.98)
    assert ckpt["optimizer"]["param_groups"][0]["eps"] == 1e-6


def test_kill_and_resume_is_exact(tmp_path):
    flags = dict(epochs=3, augment=True, batch_size=4, gradient_accumulation_steps=1, **FIXED_KERNELS)
    a = run_toy(str(tmp_path / "a"), **flags)
    b1 = run_toy(str(tmp_path / "b"), max_epochs_this_run=1, **flags)  # "killed" after epoch 1
    assert b1["global_step"] == 4
    b = run_toy(str(tmp_path / "b"), resume=str(tmp_path / "b" / "ckpt.pth.tar"),
                model_kwargs={"seed": 123}, **flags)  # a fresh process, another init: all comes from the ckpt
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ra = json.loads((tmp_path / "a" / "results.json").read_text())
    rb = json.loads((tmp_path / "b" / "results.json").read_text())
    assert len(rb["evaluations"]) == 3
    for ea, eb in zip(ra["evaluations"], rb["evaluations"]):
        assert ea["epoch"] == eb["epoch"] and ea["global_step"] == eb["global_step"]
        assert ea["t2v"] == eb["t2v"] and ea["v2t"] == eb["v2t"]
        assert ea["train_loss"] == pytest.approx(eb["train_loss"], rel=0, abs=0)
    assert a["step_losses"][4:] == b["step_losses"]
    ca, cb = _load(tmp_path / "a" / "ckpt.pth.tar"), _load(tmp_path / "b" / "ckpt.pth.tar")
    assert ca["epoch"] == cb["epoch"] == 3 and ca["global_step"] == cb["global_step"] == 12


def test_eval_of_official_checkpoint(tmp_path):
    data = ToyData(num_videos=12)
    ref = tiny_dgl(seed=5)
    with torch.no_grad():  # not a fresh init: perturb the prompts
        for _, p in ref.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    official = {"epoch": 5, "global_step": 100, "arch": "CLIp4Clip", "best_acc1": 45.8,
                "optimizer": {"state": {}, "param_groups": []},
                "state_dict": {"module." + k: v.clone() for k, v in ref.state_dict().items()}}
    path = tmp_path / "ckpt.best.pth.tar"
    torch.save(official, path)
    s = run_toy(str(tmp_path / "eval"), do_eval=1, resume=str(path), model_kwargs={"seed": 9},
                data_kwargs={"num_videos": 12}, **FIXED_KERNELS)
    assert not (tmp_path / "eval" / "ckpt.pth.tar").exists()  # eval only
    with torch.no_grad():
        t = ref.encode_text(data.ids)
        v = ref.encode_video(data.videos, data.masks)
        sim = ref.similarity(t, v).numpy()
    expected = metrics_from_ranks(compute_ranks(sim))
    got = json.loads((tmp_path / "eval" / "results.json").read_text())["evaluations"][0]
    assert got["epoch"] == 5 and got["global_step"] == 100
    for k in ("R1", "R5", "R10", "MR", "MeanR"):
        assert got["t2v"][k] == pytest.approx(expected[k])
    assert s["last"]["t2v"]["R1"] == pytest.approx(expected["R1"])


def test_multi_sentence_evaluation_ranks_every_caption(tmp_path):
    data = ToyData(num_videos=8, captions_per_video=3)
    s = run_toy(str(tmp_path / "ms"), do_eval=1, data_kwargs={"num_videos": 8, "captions_per_video": 3},
                **FIXED_KERNELS)
    got = json.loads((tmp_path / "ms" / "results.json").read_text())["evaluations"][0]
    assert got["multi_sentence"] and got["num_captions"] == 24 and got["num_videos"] == 8
    assert got["t2v"]["num_queries"] == 24 and got["v2t"]["num_queries"] == 8
    model = s["model"]
    with torch.no_grad():
        sim = model.similarity(model.encode_text(data.ids), model.encode_video(data.videos, data.masks)).numpy()
    assert sim.shape == (24, 8)
    t2v = metrics_from_ranks(compute_ranks(sim, data.caption_video_index))
    assert got["t2v"]["R1"] == pytest.approx(t2v["R1"]) and got["t2v"]["MeanR"] == pytest.approx(t2v["MeanR"])
    # video-to-text: best caption of each video
    v2t_sim = np.full((8, 8), -np.inf)
    for c, v in enumerate(data.caption_video_index.tolist()):
        v2t_sim[:, v] = np.maximum(v2t_sim[:, v], sim[c])
    v2t = metrics_from_ranks(compute_ranks(v2t_sim))
    assert got["v2t"]["R1"] == pytest.approx(v2t["R1"])


def test_schedule_matches_published_formula():
    import math

    from training.optim import WarmupCosineSchedule, total_optimization_steps

    total = total_optimization_steps(35, 1, 5)
    assert total == 175.0
    s = WarmupCosineSchedule(2e-3, total, 0.1, 0.2)
    assert s.lr_at(0) == pytest.approx(1e-8)
    assert s.lr_at(17.5) == pytest.approx(2e-3)
    assert s.lr_at(10) == pytest.approx(1e-8 + 10 / 17.5 * (2e-3 - 1e-8))
    t = 100
    assert s.lr_at(t) == pytest.approx(0.5 * 2e-3 * (1 + math.cos(math.pi * (t - 17.5) / (175 - 17.5))))
    assert s.lr_at(175) == pytest.approx(1e-8)
    # steps past the end (epochs of --batch_groups can pack into more batches) stay at the floor
    assert s.lr_at(200) == pytest.approx(1e-8) and s.lr_at(330) == pytest.approx(1e-8)
    assert total_optimization_steps(35, 2, 5) == 18 * 5


@pytest.mark.parametrize("precision", ["bf16", "amp"])
def test_reduced_precision_on_cpu(tmp_path, precision):
    s = run_toy(str(tmp_path / precision), epochs=1, precision=precision, **FIXED_KERNELS)
    assert all(np.isfinite(l) for _, l in s["step_losses"])
    log = (tmp_path / precision / "log.txt").read_text()
    if precision == "amp":
        assert "using bf16 autocast" in log   # no GradScaler on CPU
    ckpt = _load(tmp_path / precision / "ckpt.pth.tar")
    assert "scaler" not in ckpt
    assert all(v.dtype == torch.float32 for k, v in ckpt["state_dict"].items() if v.is_floating_point())


def test_resume_from_finished_run_and_load_from_pretrained(tmp_path):
    run_toy(str(tmp_path / "a"), epochs=1, **FIXED_KERNELS)
    ck = str(tmp_path / "a" / "ckpt.pth.tar")
    # weights only: a new schedule from epoch 0
    s = run_toy(str(tmp_path / "b"), epochs=1, resume=ck, load_from_pretrained=1, **FIXED_KERNELS)
    assert s["global_step"] == 4
    # a finished run resumed with the same --epochs trains no further
    s = run_toy(str(tmp_path / "c"), epochs=1, resume=ck, **FIXED_KERNELS)
    assert s["global_step"] == 4 and s["step_losses"] == []


def test_replaced_training_samples_are_counted_in_the_log_and_results(tmp_path, monkeypatch):
    """Samples whose video the loader replaced (--skip_bad_videos) are what the epoch's log line and
    results.json's train_replaced report, counted once by the training loop."""
    from tests import toy

    flagged = {1, 6}
    real_item = toy._Pairs.__getitem__

    def item(self, i):
        return {**real_item(self, i), "replaced": i in flagged}

    monkeypatch.setattr(toy._Pairs, "__getitem__", item)
    out = tmp_path / "run"
    run_toy(str(out), data_kwargs={"num_videos": 8}, epochs=1, **FIXED_KERNELS)
    evals = json.loads((out / "results.json").read_text())["evaluations"]
    assert evals[-1]["train_replaced"] == len(flagged)
    assert "epoch 1: 2 of 8 training samples had an unreadable video and were replaced" in (out / "log.txt").read_text()
