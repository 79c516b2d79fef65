"""--grad_checkpointing and --compile leave the results unchanged."""
import copy

import pytest
import torch

from training.gradcache import gradcache_step
from training.model_options import compile_encoders, compile_seconds
from tests.toy import FIXED_KERNELS, ToyData, run_toy, tiny_dgl


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

    from training.step import forward_backward

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
    flags = dict(epochs=1, batch_size=8, data_kwargs={"num_videos": 16}, model_kwargs={"seed": 3}, **FIXED_KERNELS)
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


def test_compile_auto_stays_eager_for_short_runs_and_compiles_long_ones(tmp_path, monkeypatch):
    from runtime import compilation
    from training.model_options import _CompiledEncoder

    assert compilation.auto_compile(0)[0] is False and compilation.auto_compile(499)[0] is False
    on, why = compilation.auto_compile(500)
    assert on and why.startswith("--compile auto: compiling")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))  # restored after the test
    short = run_toy(str(tmp_path / "short"), compile="auto", epochs=1, batch_size=8,
                    data_kwargs={"num_videos": 16}, model_kwargs={"seed": 3})
    assert not isinstance(short["model"].encode_video, _CompiledEncoder)
    assert "--compile auto: eager (2 training steps < 500" in (tmp_path / "short" / "log.txt").read_text()
    # the same run counted as long compiles (compilation itself happens at the first call: not made here)
    monkeypatch.setattr(compilation, "AUTO_COMPILE_MIN_STEPS", 2)
    from training.model_options import apply_auto_compile
    import argparse

    model = tiny_dgl()
    assert apply_auto_compile(model, argparse.Namespace(compile="auto"), 2)
    assert isinstance(model.encode_video, _CompiledEncoder)


def test_compile_cache_goes_under_the_users_cache_folder(tmp_path, monkeypatch):
    from runtime.compilation import use_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = use_compile_cache()
    assert folder == str(tmp_path / "xdg" / "dgl" / "torch-compile") and (tmp_path / "xdg").is_dir()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == folder
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "given"))
    assert use_compile_cache() == str(tmp_path / "given")


COMPILE_TWICE = """
import json, sys, time, torch
sys.path.insert(0, {repo!r})
from runtime.compilation import use_compile_cache
from training.model_options import compile_encoders
from tests.toy import ToyData, tiny_dgl
use_compile_cache({cache!r})
data = ToyData(num_videos=4)
model = compile_encoders(tiny_dgl(seed=4))
start = time.perf_counter()
with torch.no_grad():
    model.encode_video(data.videos, data.masks)
seconds = time.perf_counter() - start
from torch._dynamo.utils import counters
print(json.dumps({{"seconds": seconds, "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"]}}))
"""


@pytest.mark.slow
def test_second_run_of_a_shape_loads_the_compiled_graph_from_the_cache(tmp_path):
    """Two processes compile the same encoder at the same shape with one cache folder: the first compiles
    (misses), the second loads every graph from the folder (hits, no miss)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = COMPILE_TWICE.format(repo=str(repo), cache=str(tmp_path / "cache"))
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["misses"] > 0 and runs[0]["hits"] == 0
    assert runs[1]["hits"] > 0 and runs[1]["misses"] == 0
    assert any((tmp_path / "cache").iterdir())
