"""Order negatives (--order_negatives): the reordered copies, the weighted loss against a direct
computation, and exactness under gradient caching, accumulation and several processes."""
import copy
import math
import os

import pytest
import torch

from modules.order import (
    OrderNegatives,
    frame_orders,
    order_column_bias,
    order_contrastive_loss,
    order_win_rate,
    reorder_frames,
    sample_seeds,
)
from training.gradcache import gradcache_step
from tests.toy import ToyData, free_port, gloo_member, tiny_dgl
from tests.toy import assert_same_grads as _assert_same_grads
from tests.toy import trainable_grads as _grads

FRAMES = 4


def _data(num_videos=8) -> ToyData:
    """4-frame toy videos; video 1 has 3 valid frames, video 2 has 1 (no other order exists)."""
    data = ToyData(num_videos=num_videos, frames=FRAMES)
    data.masks[1, 3:] = 0
    data.masks[2, 1:] = 0
    return data


# ------------------------------------------------------------------------------------------ the copies
def test_reverse_reorders_the_valid_frames_only():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]])
    order = frame_orders(mask, "reverse")
    assert order.tolist() == [[3, 2, 1, 0], [2, 1, 0, 3], [0, 1, 2, 3]]
    video = torch.arange(3 * 4).view(3, 4, 1).float()
    assert reorder_frames(video, order)[1, :, 0].tolist() == [6.0, 5.0, 4.0, 7.0]


@pytest.mark.parametrize("valid", [2, 3, 4, 6])
def test_a_shuffle_is_never_the_identity_and_repeats_per_seed(valid):
    mask = torch.zeros(200, 6, dtype=torch.long)
    mask[:, :valid] = 1
    seeds = sample_seeds(7, 3, range(200))
    order = frame_orders(mask, "shuffle", seeds)
    identity = torch.arange(6)
    for row in order:
        assert sorted(row[:valid].tolist()) == list(range(valid))  # a permutation of the valid frames
        assert row[valid:].tolist() == identity[valid:].tolist()   # padding stays
        assert not torch.equal(row, identity)
    assert torch.equal(order, frame_orders(mask, "shuffle", seeds))
    if valid > 2:  # more than one non-identity permutation exists: the seeds give several
        assert len({tuple(r.tolist()) for r in order}) > 1
    # another epoch draws other permutations
    assert not torch.equal(order, frame_orders(mask, "shuffle", sample_seeds(7, 4, range(200)))) or valid == 2


def test_a_video_without_another_order_is_left_out_of_the_loss():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    bias = order_column_bias(frame_orders(mask, "reverse"), 0.5)
    assert bias[0].item() == pytest.approx(math.log(0.5))
    assert bias[1].item() == float("-inf")
    with pytest.raises(ValueError, match="> 0"):
        order_column_bias(frame_orders(mask, "reverse"), 0.0)


# ------------------------------------------------------------------------------------------ the loss
def _direct_loss(model, data, alpha: float, order: torch.Tensor) -> torch.Tensor:
    """The loss written out: -log(e^s_ii / (sum_j e^s_ij + alpha sum_j e^o_ij)) per caption (o_ij: caption i
    against video j's reordered copy; copies equal to their video left out), plus the plain v2t term."""
    prompts = model.prompts()
    t = model.encode_text(data.ids, prompts)
    v = model.encode_video(data.videos, data.masks, prompts)
    r = model.encode_video(reorder_frames(data.videos, order), data.masks, prompts)
    s, o = model.similarity(t, v).double(), model.similarity(t, r).double()
    usable = torch.tensor([not torch.equal(row, torch.arange(FRAMES)) for row in order]).double()
    denominator = s.exp().sum(1) + alpha * (o.exp() * usable[None, :]).sum(1)
    t2v = -(s.diagonal().exp() / denominator).log().mean()
    v2t = -(s.diagonal().exp() / s.exp().sum(0)).log().mean()
    return (t2v + v2t) / 2


@pytest.mark.parametrize("kind,alpha", [("reverse", 1.0), ("reverse", 0.25), ("shuffle", 3.0)])
def test_weighted_loss_equals_a_direct_computation(kind, alpha):
    data = _data()
    model = tiny_dgl(seed=1, shared_latent_space="transformer", max_frames=FRAMES)
    order = frame_orders(data.masks, kind, sample_seeds(0, 0, range(8)) if kind == "shuffle" else None)
    loss = model(data.ids, data.videos, data.masks, frame_order=order, order_weight=alpha)["loss"]
    torch.testing.assert_close(loss.double(), _direct_loss(model, data, alpha, order), rtol=1e-5, atol=1e-6)
    plain = model(data.ids, data.videos, data.masks)["loss"]
    assert loss > plain  # more negatives, a larger loss


def test_without_frame_order_the_loss_is_the_published_one_bit_for_bit():
    from modules.dgl import contrastive_loss

    data = _data()
    model = tiny_dgl(seed=1, shared_latent_space="transformer", max_frames=FRAMES)
    out = model(data.ids, data.videos, data.masks)
    prompts = model.prompts()
    sim = model.similarity(model.encode_text(data.ids, prompts), model.encode_video(data.videos, data.masks, prompts))
    assert torch.equal(out["loss"], contrastive_loss(sim))
    assert "order_sim" not in out


def _plain(model, data, order, alpha=0.5, rows=slice(None)):
    loss = model(data.ids[rows], data.videos[rows], data.masks[rows], frame_order=order[rows],
                 order_weight=alpha)["loss"]
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("latent", ["linear", "transformer"])
@pytest.mark.parametrize("chunk_size", [1, 3])
def test_chunked_step_with_order_negatives_equals_plain_step(latent, chunk_size):
    data = _data()
    model = tiny_dgl(seed=1, shared_latent_space=latent, max_frames=FRAMES).train()
    other = copy.deepcopy(model)
    order = frame_orders(data.masks, "shuffle", sample_seeds(5, 1, range(8)))
    ref_loss, ref = _plain(model, data, order)
    loss = gradcache_step(other, data.ids, data.videos, data.masks, chunk_size, frame_order=order, order_weight=0.5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    _assert_same_grads(_grads(other), ref)


def test_order_negatives_of_a_batch_do_not_depend_on_how_it_is_split():
    """The shuffles of a sample depend on the seed, the epoch and its dataset index, not on its batch."""
    mask = torch.ones(8, 5, dtype=torch.long)
    neg = OrderNegatives("shuffle", 1.0, seed=3)
    whole = neg.frame_order({"video_mask": mask, "index": torch.arange(8)}, epoch=2)
    parts = torch.cat([neg.frame_order({"video_mask": mask[s], "index": torch.arange(8)[s]}, epoch=2)
                       for s in (slice(0, 3), slice(3, 8))])
    assert torch.equal(whole, parts)


# ------------------------------------------------------------------------------------------ 2 processes
@pytest.mark.parametrize("chunk_size", [0, 3])
def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path, chunk_size):
    """2 gloo processes x 4 samples (DDP as in main.py; plain or cached gradients) = 1 process, 8 samples."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), chunk_size), nprocs=2, join=True)
    data = _data()
    model = tiny_dgl(seed=1, shared_latent_space="transformer", max_frames=FRAMES)
    order = OrderNegatives("shuffle", 0.5, seed=1).frame_order({"video_mask": data.masks, "index": torch.arange(8)}, 0)
    ref_loss, ref = _plain(model, data, order)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-5, atol=1e-6)
        _assert_same_grads(got["grads"], ref)


def _worker(rank, world, port, out, chunk_size):
    from training.step import forward_backward

    with gloo_member(rank, world, port):
        data = _data()
        model = torch.nn.parallel.DistributedDataParallel(
            tiny_dgl(seed=1, shared_latent_space="transformer", max_frames=FRAMES), find_unused_parameters=True)
        own = torch.arange(rank * 4, rank * 4 + 4)
        neg = OrderNegatives("shuffle", 0.5, seed=1)
        order = neg.frame_order({"video_mask": data.masks[own], "index": own}, 0)
        loss = forward_backward(model, data.ids[own], data.videos[own], data.masks[own],
                                autocast=_nothing,
                                scale_loss=lambda x: x, contrastive_chunk_size=chunk_size, frame_order=order,
                                order_weight=neg.weight)
        torch.save({"loss": loss.detach(), "grads": _grads(model.module)}, os.path.join(out, f"rank{rank}.pt"))
        del model, loss  # DDP's reducer holds the process group: release it before destroying the group


def _nothing():
    import contextlib

    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------ main.py runs
def _toy_run(out, **flags):
    from tests.toy import FIXED_KERNELS, run_toy

    return run_toy(str(out), data_kwargs={"num_videos": 16, "frames": FRAMES},
                   model_kwargs={"seed": 3, "shared_latent_space": "transformer", "max_frames": FRAMES},
                   max_frames=FRAMES, shared_latent_space="transformer", epochs=2, batch_size=8, **FIXED_KERNELS,
                   **flags)


@pytest.mark.parametrize("accumulation", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_training_run_with_order_negatives_and_chunks_equals_plain_run(tmp_path, accumulation):
    flags = dict(order_negatives="shuffle", order_negative_weight=0.5, gradient_accumulation_steps=accumulation)
    plain = _toy_run(tmp_path / "plain", **flags)
    chunked = _toy_run(tmp_path / "chunked", contrastive_chunk_size=3, **flags)
    without = _toy_run(tmp_path / "without", gradient_accumulation_steps=accumulation)
    assert [s for s, _ in plain["step_losses"]] == [s for s, _ in chunked["step_losses"]] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(plain["step_losses"], chunked["step_losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    s1, s2 = plain["model"].state_dict(), chunked["model"].state_dict()
    for k in s1:
        if k.endswith("in_proj_bias"):  # its key third has a zero gradient but for rounding, which AdamW amplifies
            s1[k], s2[k] = (torch.cat([s[k][:64], s[k][128:]]) for s in (s1, s2))
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-4, atol=1e-6, msg=k)
    # the option is live: the losses differ from the published loss's
    assert all(a > b for (_, a), (_, b) in zip(plain["step_losses"], without["step_losses"]))
    assert "order negatives: every training video also shuffled" in (tmp_path / "plain" / "log.txt").read_text()


@pytest.mark.slow
def test_bf16_run_with_order_negatives_and_chunks_matches_plain_bf16_run(tmp_path):
    flags = dict(order_negatives="reverse", precision="bf16")
    plain = _toy_run(tmp_path / "plain", **flags)
    chunked = _toy_run(tmp_path / "chunked", contrastive_chunk_size=3, **flags)
    for (_, a), (_, b) in zip(plain["step_losses"], chunked["step_losses"]):
        assert a == pytest.approx(b, rel=2e-2)


# ------------------------------------------------------------------------------------------ metric helper
def test_win_rate_counts_ties_as_one_half():
    r = order_win_rate(torch.tensor([2.0, 1.0, 3.0, 5.0]), torch.tensor([1.0, 2.0, 3.0, 5.0 + 1e-7]))
    assert r == {"percent": 50.0, "ties": 2, "count": 4}
    assert order_win_rate(torch.tensor([3.0, 3.0]), torch.tensor([1.0, 2.0]))["percent"] == 100.0
    assert order_win_rate(torch.tensor([]), torch.tensor([]))["percent"] is None


def test_grad_checkpointing_with_order_negatives_gives_the_same_gradients():
    data = _data()
    model = tiny_dgl(seed=1, shared_latent_space="transformer", max_frames=FRAMES).train()
    other = copy.deepcopy(model).set_grad_checkpointing(True)
    order = frame_orders(data.masks, "reverse")
    ref_loss, ref = _plain(model, data, order)
    loss, got = _plain(other, data, order)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    _assert_same_grads(got, ref)


@pytest.mark.slow
def test_two_process_run_with_order_negatives_equals_one_process(tmp_path):
    """main.py under 2 gloo processes (batch 4 each as 2 micro-batches of 2, encoded 1 at a time) with shuffled
    order negatives trains like 1 process with batch 8 as 2 micro-batches of 4: the same losses and weights."""
    from tests.toy import one_and_two_process_runs

    s1, s2 = one_and_two_process_runs(
        tmp_path, [1, 2, 3, 4], epochs=2, gradient_accumulation_steps=2, order_negatives="shuffle",
        order_negative_weight=0.5, max_frames=FRAMES, shared_latent_space="transformer",
        data_kwargs={"num_videos": 16, "frames": FRAMES},
        model_kwargs={"seed": 3, "shared_latent_space": "transformer", "max_frames": FRAMES})
    for k in s1:
        if k.endswith("in_proj_bias"):  # its key third has a zero gradient but for rounding, which AdamW amplifies
            s1[k], s2[k] = (torch.cat([s[k][:64], s[k][128:]]) for s in (s1, s2))
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-4, atol=1e-6, msg=k)


def test_kill_and_resume_with_shuffled_order_negatives_is_exact(tmp_path):
    """A shuffle depends on the seed, the epoch and the sample: a run resumed after epoch 1 draws the same
    permutations as the uninterrupted run and ends with the same weights, bit for bit."""
    from tests.toy import FIXED_KERNELS, run_toy

    flags = dict(epochs=2, batch_size=8, order_negatives="shuffle", max_frames=FRAMES,
                 shared_latent_space="transformer", data_kwargs={"num_videos": 16, "frames": FRAMES}, **FIXED_KERNELS)
    model = {"seed": 3, "shared_latent_space": "transformer", "max_frames": FRAMES}
    a = run_toy(str(tmp_path / "a"), model_kwargs=model, **flags)
    run_toy(str(tmp_path / "b"), model_kwargs=model, max_epochs_this_run=1, **flags)
    b = run_toy(str(tmp_path / "b"), resume=str(tmp_path / "b" / "ckpt.pth.tar"), model_kwargs=dict(model, seed=9),
                **flags)
    assert a["step_losses"][2:] == b["step_losses"]
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
