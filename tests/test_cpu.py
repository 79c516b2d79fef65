"""CPU settings chosen at start-up: the cores split, exact fp32 products through oneDNN, the attention
backend, bf16 storage of the frozen backbone, bf16 evaluation of videos."""
import contextlib

import numpy as np
import pytest
import torch

from modules import backends as cpu
from runtime import cpu as run_cpu
from runtime.precision import Precision
from tests.toy import ToyData, run_toy, tiny_dgl


@pytest.fixture(autouse=True)
def _restore_settings():
    yield
    cpu.restore()


def _inputs(model, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.clip.config
    video = torch.randn(batch, model.config.max_frames, 3, cfg.image_resolution, cfg.image_resolution, generator=g)
    ids = torch.randint(1, cfg.vocab_size - 1, (batch, model.config.max_words), generator=g)
    ids[:, -1] = cfg.vocab_size - 1  # EOT: the largest id
    return ids, video, torch.ones(batch, model.config.max_frames, dtype=torch.long)


def _features_and_grads(model, context=contextlib.nullcontext):
    ids, video, mask = _inputs(model)
    model.zero_grad(set_to_none=True)
    with context():
        out = model(ids, video, mask)
    out["loss"].backward()
    grads = torch.cat([p.grad.flatten() for _, p in model.trainable_parameters() if p.grad is not None])
    return out["text_features"].detach().float(), out["video_features"].detach().float(), grads


# ------------------------------------------------------------------------------------------ cores
@pytest.mark.parametrize("cuda", [False, True])
def test_default_split_never_exceeds_the_cores(cuda):
    for cores in range(1, 65):
        s = run_cpu.split_cores(cores, cuda=cuda)
        assert s.threads >= 1 and s.workers >= 0 and s.threads + s.workers <= cores, (cores, s)
        assert not s.oversubscribed
    assert (run_cpu.split_cores(2).threads, run_cpu.split_cores(2).workers) == (2, 0)  # a 2-core CPU: no worker
    assert (run_cpu.split_cores(8).threads, run_cpu.split_cores(8).workers) == (6, 2)
    assert (run_cpu.split_cores(16, cuda=True).threads, run_cpu.split_cores(16, cuda=True).workers) == (8, 8)


def test_given_values_are_kept_and_the_other_fitted():
    s = run_cpu.split_cores(8, workers=3)
    assert (s.threads, s.workers) == (5, 3)
    s = run_cpu.split_cores(8, threads=7)
    assert (s.threads, s.workers) == (7, 1)
    s = run_cpu.split_cores(2, workers=8)  # the published scripts' --num_thread_reader 8 on 2 cores
    assert (s.threads, s.workers) == (1, 8) and s.oversubscribed and "more than the cores" in s.note


def test_torchrun_processes_share_the_machine(monkeypatch):
    from training.config import parse_args

    monkeypatch.setattr(run_cpu, "available_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    a = parse_args(["--output_dir", "o", "--do_eval", "1", "--device", "cpu"])
    assert a.threads + a.num_thread_reader <= 4 and a.threads >= 1
    a = parse_args(["--output_dir", "o", "--do_eval", "1", "--device", "cpu", "--threads", "3"])
    assert (a.threads, a.num_thread_reader) == (3, 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", "8")  # another launcher: assume every process is on this machine
    assert run_cpu.processes_on_this_machine() == 8
    a = parse_args(["--output_dir", "o", "--do_eval", "1", "--device", "cpu"])
    assert (a.threads, a.num_thread_reader) == (2, 0)


# ------------------------------------------------------------------------------------------ fp32
def test_onednn_fp32_check_rejects_a_path_computing_in_bf16(monkeypatch):
    """Where oneDNN would compute fp32 products in bf16 (CPUs with AMX), the check keeps MKL."""
    @contextlib.contextmanager
    def bf16_products(enabled=True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            yield
    monkeypatch.setattr(cpu, "onednn_fp32", bf16_products)
    check = cpu.check_onednn_fp32()
    assert not check.exact and not check.use_onednn
    assert check.error_onednn > 100 * check.error_mkl
    assert "MKL" in check.describe() and "reduced precision" in check.describe()


def test_fp32_path_chosen_here_is_exact_for_the_whole_model():
    """Features and prompt gradients of the chosen fp32 path equal the default path's to 1e-5."""
    model = tiny_dgl(width=128, max_frames=3)
    before = torch.backends.mkldnn.matmul.fp32_precision
    reference = _features_and_grads(model)
    check = cpu.choose_fp32_path()
    assert check.error_mkl > 0
    if not check.exact:
        assert torch.backends.mkldnn.matmul.fp32_precision == before  # never a bf16 path
    with cpu.onednn_fp32(check.exact):  # the oneDNN path itself wherever it is exact
        chosen = _features_and_grads(model)
    for r, c in zip(reference, chosen):
        torch.testing.assert_close(c, r, atol=1e-5, rtol=1e-5)
    cpu.restore()
    assert torch.backends.mkldnn.matmul.fp32_precision == before


@pytest.mark.parametrize("backends", [[cpu.MATH], [cpu.FLASH, cpu.MATH]])
def test_attention_backends_give_the_same_results(backends):
    model = tiny_dgl(width=128, max_frames=3)
    reference = _features_and_grads(model)
    got = _features_and_grads(model, lambda: cpu.backends_context(backends))
    for r, c in zip(reference, got):
        torch.testing.assert_close(c, r, atol=1e-5, rtol=1e-5)


def test_attention_choice_is_measured_per_direction():
    model = tiny_dgl(width=128, max_frames=3)
    shape = cpu.local_attention_shape(model)
    assert shape == (3, 2, 1 + 2 + 16, 2 + 1 + 2 + 16, 64)  # frames, heads, L, G + L, head width
    eval_b, train_b, times = cpu.choose_attention(shape, torch.float32)
    assert set(times) == {(b, d) for b in ("math", "flash") for d in ("eval", "train")}
    assert all(t > 0 for t in times.values())


@pytest.mark.parametrize("flash_eval,flash_train,expected", [
    (1.0, 1.0, ("flash", "flash")),   # equal: PyTorch's own choice (flash) stays
    (1.4, 1.6, ("flash", "math")),    # math 1.4x faster is not enough; 1.6x is
    (1.6, 1.4, ("math", "flash")),    # each direction on its own times
    (0.5, 3.0, ("flash", "math")),
])
def test_attention_choice_follows_the_measured_times(monkeypatch, flash_eval, flash_train, expected):
    """The choice from given times (math at 1 s), with the answers written out: math must be at least 1.5x
    as fast as flash to replace it, separately for evaluation and training."""
    times = {("math", "eval"): 1.0, ("math", "train"): 1.0, ("flash", "eval"): flash_eval,
             ("flash", "train"): flash_train}
    monkeypatch.setattr(cpu, "_cached_attention_times", lambda shape, dtype, threads: times)
    eval_b, train_b, got = cpu.choose_attention((3, 2, 19, 21, 64), torch.float32)
    assert (cpu.backend_name(eval_b), cpu.backend_name(train_b)) == expected and got == times


# ------------------------------------------------------------------------------------------ bf16
def _weights_bf16_cannot_hold(model) -> None:
    """LayerNorm weights and biases that bf16 rounds (a random CLIP has exactly 1 and 0): a tensor stored in
    bf16 that autocast keeps in fp32 then changes the results."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                assert not torch.equal(m.weight.bfloat16().float(), m.weight)


def test_bf16_storage_gives_the_autocast_results_and_keeps_fp32_outside():
    model = tiny_dgl(width=128, max_frames=3)
    _weights_bf16_cannot_hold(model)
    fp32 = _features_and_grads(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    reference = _features_and_grads(model, autocast)
    stored = cpu.store_backbone_in_bf16(model)
    assert len(stored) > 0 and model.clip.visual.proj.dtype == torch.bfloat16
    assert model.clip.dtype == torch.float32  # conv1 (and so the residual stream) stays fp32 as under autocast
    assert all(p.dtype == torch.float32 for _, p in model.trainable_parameters())
    got = _features_and_grads(model, autocast)
    for r, g, f in zip(reference, got, fp32):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=0)  # what autocast computes, without the re-casts
        assert float((g - f).abs().max()) < 0.05 * float(f.abs().max())  # bf16 tolerance of fp32
    # the state dict (and so every checkpoint) holds the fp32 values, in the official layout
    saved = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in state)
    # AdamW's state of the prompts is fp32
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-3)
    opt.step()
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if v.is_floating_point())
    # loading weights (our layout or the official one) while stored in bf16 updates the kept fp32 values
    other = tiny_dgl(seed=5, width=128, max_frames=3)
    model.load_checkpoint({"state_dict": other.state_dict()})
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
    stored.restore()
    assert model.clip.visual.proj.dtype == torch.float32
    assert torch.equal(model.clip.visual.proj, other.clip.visual.proj)


def test_bf16_training_run_saves_fp32_checkpoints(tmp_path):
    data_model = tiny_dgl()
    clip_before = {k: v.clone() for k, v in data_model.clip.state_dict().items()}
    s = run_toy(str(tmp_path / "r"), epochs=1, precision="bf16")
    assert all(np.isfinite(loss) for _, loss in s["step_losses"])
    log = (tmp_path / "r" / "log.txt").read_text()
    assert "cores: " in log and "training step: fp32 matrix products" in log and "attention backend" in log
    assert "frozen backbone tensors stored in bf16" in log
    ckpt = torch.load(tmp_path / "r" / "ckpt.pth.tar", map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    # the frozen CLIP weights are saved exactly as they were (not rounded to bf16)
    w = "module.clip.visual.transformer.resblocks.0.attn.in_proj_weight"
    assert torch.equal(sd[w], clip_before["visual.transformer.resblocks.0.attn.in_proj_weight"])
    assert s["model"].clip.visual.proj.dtype == torch.float32  # the run restored the model


@pytest.mark.slow  # bf16 start-up checks take minutes on CPUs without avx512_bf16
@pytest.mark.parametrize("precision,eval_precision", [("bf16", "fp32"), ("amp", None), ("fp32", "bf16")])
def test_backbone_stays_fp32_unless_every_use_is_bf16(tmp_path, precision, eval_precision):
    flags = {"precision": precision} | ({"eval_precision": eval_precision} if eval_precision else {})
    s = run_toy(str(tmp_path / "r"), epochs=1, **flags)  # evaluates in fp32 (videos in bf16 for the last)
    assert all(np.isfinite(loss) for _, loss in s["step_losses"])
    assert "stored in bf16" not in (tmp_path / "r" / "log.txt").read_text()


def test_bf16_video_evaluation_matches_fp32(tmp_path):
    """--eval_precision bf16: the same retrieval metrics within bf16 tolerance."""
    from training.evaluation import evaluate

    model = tiny_dgl(width=128)
    data = ToyData(num_videos=16, frames=2)
    cpu_dev = torch.device("cpu")
    results = {}
    for name in ("fp32", "bf16"):
        precision = Precision("fp32", cpu_dev, eval_precision=name)
        results[name] = evaluate(model, data, batch_size=8, workers=0, device=cpu_dev, precision=precision,
                                 progress=False)
    assert results["bf16"]["video_features"].dtype == torch.float32
    f32, b16 = results["fp32"]["video_features"], results["bf16"]["video_features"]
    assert 0 < float((f32 - b16).abs().max()) < 0.05 * float(f32.abs().max())  # bf16 was used, within tolerance
    assert torch.equal(results["fp32"]["text_features"], results["bf16"]["text_features"])  # texts stay fp32
    sim32, sim16 = results["fp32"]["sim"], results["bf16"]["sim"]
    np.testing.assert_allclose(sim16, sim32, atol=0.05 * np.abs(sim32).max())


def test_inference_settings_for_encoding_tools():
    model = tiny_dgl(width=128, max_frames=3).eval()
    ids, video, mask = _inputs(model)
    with torch.no_grad():
        reference = model.encode_video(video, mask)
    precision = run_cpu.inference_settings(model, "cpu", threads=1)
    assert torch.get_num_threads() == 1 and set(precision.kernels) == {"eval"}  # an encoding tool never trains
    with torch.no_grad(), precision.eval_video_autocast():
        got = model.encode_video(video, mask)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ the library call
GLOBALS_SNAPSHOT = """
import json, torch
def snapshot():
    m = torch.backends.mkldnn
    return {"threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
            "mkldnn_matmul": m.matmul.fp32_precision, "mkldnn": m.enabled,
            "matmul_precision": torch.get_float32_matmul_precision(), "grad": torch.is_grad_enabled(),
            "dtype": str(torch.get_default_dtype()), "deterministic": torch.are_deterministic_algorithms_enabled(),
            "autocast": torch.is_autocast_enabled("cpu"), "flash": torch.backends.cuda.flash_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(), "mem": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cudnn.enabled}
"""


def test_importing_modules_changes_no_torch_setting():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    names = sorted(p.stem for p in (repo / "modules").glob("*.py") if p.stem != "__init__")
    code = GLOBALS_SNAPSHOT + (
        "before = snapshot()\nimport modules\n" + "".join(f"import modules.{n}\n" for n in names)
        + "after = snapshot()\nprint(json.dumps([before, after]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert before == after and len(names) >= 8


def test_tune_keeps_fp32_results_and_restores_every_setting():
    torch.manual_seed(0)
    model = tiny_dgl(width=128, max_frames=3)
    before = (torch.get_num_threads(), torch.backends.mkldnn.matmul.fp32_precision)
    t_ref, v_ref, g_ref = _features_and_grads(model)
    model.eval()
    ids, video, mask = _inputs(model)
    with torch.no_grad():
        e_ref = (model.encode_video(video, mask), model.encode_text(ids))
    with cpu.tune(model, "cpu", "fp32", threads=1) as tuning:
        assert torch.get_num_threads() == 1 and set(tuning.choices) == {"train", "eval"} and tuning.bf16_backbone is None
        assert tuning.train_dtype is None and tuning.eval_dtype is None
        with torch.no_grad(), tuning.inference():
            got = (model.encode_video(video, mask), model.encode_text(ids))
        model.train()
        t, v, g = _features_and_grads(model, tuning.autocast)
    for a, b in zip(got + (t, v, g), e_ref + (t_ref, v_ref, g_ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (torch.get_num_threads(), torch.backends.mkldnn.matmul.fp32_precision) == before


def test_tune_bf16_stores_the_backbone_like_main_and_restores_it():
    torch.manual_seed(0)
    model = tiny_dgl(width=128, max_frames=3).eval()
    ids, video, mask = _inputs(model)
    weights = {n: p.detach().clone() for n, p in model.clip.named_parameters()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model.encode_video(video, mask)
    tuning = cpu.tune(model, "cpu", "bf16")
    assert tuning.bf16_backbone is not None and len(tuning.bf16_backbone) > 0
    assert any(p.dtype == torch.bfloat16 for p in model.clip.parameters())
    with torch.no_grad(), tuning.inference():
        got = model.encode_video(video, mask)
    torch.testing.assert_close(got, reference, atol=2e-2, rtol=2e-2)
    assert all(torch.equal(weights[n], v) for n, v in model.clip.state_dict().items() if n in weights)
    tuning.restore()
    assert all(p.dtype == torch.float32 and torch.equal(weights[n], p) for n, p in model.clip.named_parameters())
    with pytest.raises(ValueError, match="precision"):
        cpu.tune(model, "cpu", "fp16")


def test_main_and_search_settings_come_from_tune(monkeypatch):
    calls = []
    real = run_cpu.tune_dtypes
    monkeypatch.setattr(run_cpu, "tune_dtypes", lambda *a, **k: calls.append((a[2:], k)) or real(*a, **k))
    model = tiny_dgl(width=128, max_frames=3).eval()
    precision = run_cpu.inference_settings(model, "cpu", threads=1, eval_precision="bf16")
    assert len(calls) == 1 and calls[0][0] == (None, torch.bfloat16, None)
    assert precision.kernels["eval"]["attention"] == cpu.backend_name(precision.eval_attention)
