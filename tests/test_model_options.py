"""--grad_checkpointing and --compile leave the results unchanged."""
import copy

import pytest
import torch

from training.gradcache import gradcache_step
from training.model_options import compile_encoders, compile_seconds
from tests.toy import ToyData, run_toy, tiny_dgl


def _step(model, data):
    loss = model(data.ids, data.videos, data.masks)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.trainable_parameters() if p.grad is not None}


def _assert_same(got, ref, rtol=1e-5):
    assert set(got) == set(ref) and any(g.abs().max() > 0 for g in ref.values())
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=rtol, atol=float(ref[n].abs().max()) * rtol, msg=n)


def _count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("latent,mask_padding", [("linear", False), ("transformer", True)])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(latent, mask_padding):
    data = ToyData(num_videos=6)
    data.masks[1, 1:] = 0  # a video with padding frames
    model = tiny_dgl(seed=1, shared_latent_space=latent, mask_padding_frames=mask_padding)
    other = copy.deepcopy(model).set_grad_checkpointing(True)
    ref_loss, ref = _step(model, data)
    calls = _count_calls(other.clip.visual.transformer.resblocks[0].ln_1)
    loss, got = _step(other, data)
    assert len(calls) == 2  # the block ran again in the backward pass: its activations were not kept
    torch.testing.assert_close(loss, ref_loss)
    _assert_same(got, ref)


def test_grad_checkpointing_is_off_without_grad_and_composes_with_gradient_caching():
    data = ToyData(num_videos=6)
    model = tiny_dgl(seed=2).set_grad_checkpointing(True)
    calls = _count_calls(model.clip.visual.transformer.resblocks[0].ln_1)
    with torch.no_grad():
        model.encode_video(data.videos, data.masks)
    assert len(calls) == 1
    plain = tiny_dgl(seed=2)
    _, ref = _step(plain, data)
    gradcache_step(model, data.ids, data.videos, data.masks, 4)
    _assert_same({n: p.grad for n, p in model.trainable_parameters() if p.grad is not None}, ref, rtol=1e-4)


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_grad_checkpointing_recomputes_under_the_forward_attention_backend(backend):
    """The backward pass runs outside the forward's sdpa_kernel block: the recomputation must still use the
    forward's kernel (another one saves other tensors: CheckpointError), plain and chunked, every time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from training.engine import forward_backward

    backends = [SDPBackend.MATH] if backend == "math" else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    data = ToyData(num_videos=6)
    for chunk in (0, 3, 0, 3):
        ref, other = tiny_dgl(seed=1).train(), tiny_dgl(seed=1).train()
        other.set_grad_checkpointing(True)
        got = {}
        for model in (ref, other):
            forward_backward(model, data.ids, data.videos, data.masks, autocast=lambda: sdpa_kernel(backends),
                             scale_loss=lambda loss: loss, contrastive_chunk_size=chunk)
            got[model is other] = {n: p.grad.clone() for n, p in model.trainable_parameters() if p.grad is not None}
        _assert_same(got[True], got[False], rtol=1e-6)


def test_training_run_with_grad_checkpointing_equals_plain_run(tmp_path):
    flags = dict(epochs=1, batch_size=8, data_kwargs={"num_videos": 16}, model_kwargs={"seed": 3})
    plain = run_toy(str(tmp_path / "plain"), **flags)
    ckpt = run_toy(str(tmp_path / "ckpt"), grad_checkpointing=1, **flags)
    assert ckpt["model"].grad_checkpointing and not plain["model"].grad_checkpointing
    for (_, a), (_, b) in zip(plain["step_losses"], ckpt["step_losses"]):
        assert a == pytest.approx(b, rel=1e-6)
    s1, s2 = plain["model"].state_dict(), ckpt["model"].state_dict()
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-5, atol=1e-7, msg=k)


def test_negative_chunk_size_is_refused():
    from training.config import build_parser, validate

    parser = build_parser()
    args = parser.parse_args(["--output_dir", "x", "--train_csv", "t", "--contrastive_chunk_size", "-1"])
    with pytest.raises(SystemExit):
        validate(args, parser)


@pytest.mark.slow
def test_compiled_encoders_give_the_same_features_and_gradients():
    data = ToyData(num_videos=6)
    model = tiny_dgl(seed=4, shared_latent_space="transformer")
    compiled = compile_encoders(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(compiled.encode_video(data.videos, data.masks),
                                   model.encode_video(data.videos, data.masks), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled.encode_text(data.ids), model.encode_text(data.ids),
                                   rtol=1e-4, atol=1e-5)
    ref_loss, ref = _step(model, data)
    loss, got = _step(compiled, data)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    _assert_same(got, ref, rtol=1e-4)
    assert compile_seconds(compiled) > 0
    assert set(compiled.state_dict()) == set(model.state_dict())  # checkpoints keep their layout


@pytest.mark.slow
def test_training_run_with_compile_equals_plain_run(tmp_path):
    flags = dict(epochs=1, batch_size=8, data_kwargs={"num_videos": 16}, model_kwargs={"seed": 3})
    plain = run_toy(str(tmp_path / "plain"), **flags)
    compiled = run_toy(str(tmp_path / "compiled"), compile=1, **flags)
    for (_, a), (_, b) in zip(plain["step_losses"], compiled["step_losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    assert compiled["last"]["t2v"]["R1"] == pytest.approx(plain["last"]["t2v"]["R1"])
    assert "torch.compile: encode_video" in (tmp_path / "compiled" / "log.txt").read_text()
