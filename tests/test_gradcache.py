"""Gradient caching (--contrastive_chunk_size): the chunked step equals the plain full-batch step."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from modules.dgl import DGL, contrastive_loss
from training.gradcache import gradcache_step
from tests.toy import FIXED_KERNELS, ToyData, free_port, gloo_member, tiny_dgl
from tests.toy import assert_same_grads as _assert_same_grads
from tests.toy import trainable_grads as _grads


def _plain(model, ids, video, mask):
    loss = model(ids, video, mask)["loss"]
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("latent", ["linear", "transformer"])
@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_chunked_step_equals_plain_step(latent, chunk_size):
    data = ToyData(num_videos=8)
    model = tiny_dgl(seed=1, shared_latent_space=latent).train()
    other = copy.deepcopy(model)
    ref_loss, ref = _plain(model, data.ids, data.videos, data.masks)
    loss = gradcache_step(other, data.ids, data.videos, data.masks, chunk_size)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    _assert_same_grads(_grads(other), ref)


def test_loss_scaling_and_accumulation_compose_like_the_plain_step():
    """A GradScaler's scale and an accumulation divisor act on the cached gradients like on loss.backward()."""
    data = ToyData(num_videos=8)
    model = tiny_dgl(seed=2, shared_latent_space="transformer")
    other = copy.deepcopy(model)
    scale, accumulation = 2.0 ** 12, 2
    for half in (slice(0, 4), slice(4, 8)):  # two micro-batches, gradients added up
        (model(data.ids[half], data.videos[half], data.masks[half])["loss"] * scale / accumulation).backward()
        gradcache_step(other, data.ids[half], data.videos[half], data.masks[half], 3,
                       scale_loss=lambda loss: loss * scale / accumulation)
    _assert_same_grads(_grads(other), _grads(model))


def test_grad_scaler_unscales_the_cached_gradients():
    data = ToyData(num_videos=6)
    model = tiny_dgl(seed=4)
    other = copy.deepcopy(model)
    _, ref = _plain(model, data.ids, data.videos, data.masks)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    optimizer = torch.optim.SGD([p for _, p in other.trainable_parameters()], lr=0.0)
    gradcache_step(other, data.ids, data.videos, data.masks, 2, scale_loss=scaler.scale)
    scaler.unscale_(optimizer)
    _assert_same_grads(_grads(other), ref)


def test_bf16_autocast_chunked_step_matches_within_bf16_tolerance():
    data = ToyData(num_videos=6)
    model = tiny_dgl(seed=5, shared_latent_space="transformer")
    other = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(data.ids, data.videos, data.masks)["loss"]
    loss.backward()
    ref = _grads(model)
    got_loss = gradcache_step(other, data.ids, data.videos, data.masks, 4,
                              autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    torch.testing.assert_close(got_loss, loss.detach().float(), rtol=2e-2, atol=2e-2)
    for n, g in _grads(other).items():  # bf16: compare directions and sizes, not digits
        cos = F.cosine_similarity(g.flatten(), ref[n].flatten(), dim=0)
        assert cos > 0.99, n
        assert g.norm() == pytest.approx(float(ref[n].norm()), rel=5e-2), n


class _DropoutDGL(DGL):
    """A DGL whose encoders draw random numbers (DGL's own draw none)."""

    def encode_text(self, ids, prompts=None):
        return F.dropout(super().encode_text(ids, prompts), 0.3, training=True)

    def encode_video(self, video, video_mask=None, prompts=None):
        return F.dropout(super().encode_video(video, video_mask, prompts), 0.3, training=True)


def test_random_encoders_are_replayed_with_the_same_random_numbers():
    data = ToyData(num_videos=7)
    base = tiny_dgl(seed=6)
    model = _DropoutDGL(base.clip, base.config)
    model.load_state_dict(base.state_dict())
    other = copy.deepcopy(model)
    chunks = [slice(0, 3), slice(3, 6), slice(6, 7)]

    # reference: the same chunks in the same order, one graph, plain backward
    torch.manual_seed(123)
    prompts = model.prompts()
    text, vid = [], []
    for s in chunks:
        text.append(model.encode_text(data.ids[s], prompts))
        vid.append(model.encode_video(data.videos[s], data.masks[s], prompts))
    ref_loss = contrastive_loss(model.similarity(torch.cat(text), torch.cat(vid)))
    ref_loss.backward()
    after = torch.rand(3)

    torch.manual_seed(123)
    loss = gradcache_step(other, data.ids, data.videos, data.masks, 3)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    _assert_same_grads(_grads(other), _grads(model))
    assert torch.equal(torch.rand(3), after)  # the random stream continues as after one plain pass


def test_bad_arguments_are_refused():
    data = ToyData(num_videos=4)
    model = tiny_dgl()
    with pytest.raises(ValueError, match="chunk_size"):
        gradcache_step(model, data.ids, data.videos, data.masks, 0)
    with pytest.raises(ValueError, match="videos"):
        gradcache_step(model, data.ids, data.videos[:3], data.masks[:3], 2)


# ------------------------------------------------------------------------------------------ 2 processes
def test_two_processes_chunked_equal_one_process_plain(tmp_path):
    """2 gloo processes x 4 samples, 3 at a time (DDP-wrapped as in main.py) = 1 process, 8 samples, plain."""
    import torch.multiprocessing as mp

    mp.spawn(_chunked_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    data = ToyData(num_videos=8)
    model = tiny_dgl(seed=1, shared_latent_space="transformer")
    ref_loss, ref = _plain(model, data.ids, data.videos, data.masks)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-5, atol=1e-6)
        _assert_same_grads(got["grads"], ref)


def _chunked_worker(rank, world, port, out):
    with gloo_member(rank, world, port):
        data = ToyData(num_videos=8)
        model = torch.nn.parallel.DistributedDataParallel(tiny_dgl(seed=1, shared_latent_space="transformer"),
                                                          find_unused_parameters=True)
        own = slice(rank * 4, rank * 4 + 4)
        loss = gradcache_step(model, data.ids[own], data.videos[own], data.masks[own], 3)
        torch.save({"loss": loss, "grads": _grads(model.module)}, os.path.join(out, f"rank{rank}.pt"))
        del model, loss  # DDP's reducer holds the process group: release it before destroying the group


# ------------------------------------------------------------------------------------------ main.py runs
@pytest.mark.parametrize("accumulation", [1, 2])
def test_training_run_with_chunks_equals_plain_run(tmp_path, accumulation):
    flags = dict(epochs=2, batch_size=8, gradient_accumulation_steps=accumulation,
                 data_kwargs={"num_videos": 16}, model_kwargs={"seed": 3}, **FIXED_KERNELS)
    plain = run_toy_flags(tmp_path / "plain", **flags)
    chunked = run_toy_flags(tmp_path / "chunked", contrastive_chunk_size=3, **flags)
    assert [s for s, _ in plain["step_losses"]] == [s for s, _ in chunked["step_losses"]] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(plain["step_losses"], chunked["step_losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    s1, s2 = plain["model"].state_dict(), chunked["model"].state_dict()
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-4, atol=1e-6, msg=k)
    assert "gradient caching" in (tmp_path / "chunked" / "log.txt").read_text()


@pytest.mark.slow  # bf16 start-up checks take minutes on CPUs without avx512_bf16
def test_bf16_run_with_chunks_and_bf16_backbone_storage_matches_plain_bf16_run(tmp_path):
    """--precision bf16 on CPU stores the frozen backbone in bf16 (runtime/cpu.py); gradient caching runs
    both encoder passes under the same bf16 autocast, so it trains like the plain bf16 step."""
    flags = dict(epochs=1, batch_size=8, precision="bf16", data_kwargs={"num_videos": 16}, model_kwargs={"seed": 3})
    plain = run_toy_flags(tmp_path / "plain", **flags)
    chunked = run_toy_flags(tmp_path / "chunked", contrastive_chunk_size=3, **flags)
    assert [s for s, _ in plain["step_losses"]] == [s for s, _ in chunked["step_losses"]] == [1, 2]
    for (_, a), (_, b) in zip(plain["step_losses"], chunked["step_losses"]):
        assert a == pytest.approx(b, rel=2e-2)  # bf16 tolerance
    for run in ("plain", "chunked"):
        assert "frozen backbone tensors stored in bf16" in (tmp_path / run / "log.txt").read_text()


def run_toy_flags(out, **flags):
    from tests.toy import run_toy

    return run_toy(str(out), **flags)


@pytest.mark.slow
def test_two_process_run_with_chunks_and_accumulation_equals_one_process_plain(tmp_path):
    """main.py under 2 gloo processes (batch 4 each as 2 micro-batches of 2, encoded 1 at a time) trains like
    1 process with batch 8 as 2 micro-batches of 4, plain: the same micro-batch losses and weights."""
    from tests.toy import one_and_two_process_runs

    s1, s2 = one_and_two_process_runs(tmp_path, [1, 2, 3, 4], epochs=2, gradient_accumulation_steps=2,
                                      data_kwargs={"num_videos": 16}, model_kwargs={"seed": 3})
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-4, atol=1e-6, msg=k)
