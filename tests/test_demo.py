"""The demo: its synthetic world (captions that need the whole video), the tiny CLIP's pre-training on
single frames, the order probe, a data folder per configuration, and scripts/demo.sh end to end
(scaled down, slow)."""
import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from demo.compare import order_probe, scores
from demo.pretrain import frame_caption_accuracy, pretrain_clip, save_clip
from demo.run import DEFAULTS, data_config, data_folder
from demo.run import main as demo_main
from modules.clip import CLIP, build_clip, load_clip_state_dict, tiny_clip_config
from modules.dgl import DGL, DGLConfig
from modules.tokenizer import get_tokenizer, write_bpe_vocab
from preprocess.make_synthetic_dataset import (
    MOTIONS,
    ClipSpec,
    frame_caption,
    make_specs,
    make_synthetic_dataset,
    render_clip,
    swapped_caption,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- captions
def test_test_captions_unique_and_each_has_its_swapped_twin(tmp_path):
    paths = make_synthetic_dataset(str(tmp_path / "d"), num_train=2, num_test=12, num_val=6, seed=1,
                                   min_frames=4, max_frames=4, motion="from_centre", workers=2)
    with open(paths["val_csv"]) as f:
        test = list(csv.DictReader(f))
    with open(paths["probe_csv"]) as f:
        probe = list(csv.DictReader(f))
    captions = [r["sentence"] for r in test]
    assert len(captions) == 12 and len(set(captions)) == 12
    queries = {r["swapped"] for r in probe if r["split"] == "test"}
    assert [r["caption"] for r in probe if r["split"] == "test"] == captions
    specs = {s.video_id: s for s in make_specs(2, 12, seed=1, min_frames=4, max_frames=4, num_val=6,
                                                motion="from_centre")}
    for r in test:
        spec = specs[r["video_id"]]
        twin = swapped_caption(spec)
        assert twin in set(captions) | queries
        assert twin != r["sentence"]
        # the twin names the same colour, shape and moves, in the other order
        assert twin == f"a {spec.colour} {spec.shape} moves {spec.second} then {spec.first}"
    with open(paths["heldout_csv"]) as f:
        val = list(csv.DictReader(f))
    assert len({r["sentence"] for r in val}) == 6
    assert not {r["video_id"] for r in val} & {r["video_id"] for r in test}


def test_from_centre_twins_show_the_same_frames_in_the_other_order():
    """Only the order of the frames tells a caption from its twin: no single frame, nor the set of them."""
    for first, second in MOTIONS:
        spec = ClipSpec("v", "red", "square", first, second, 8, 32, 16.3, 15.8, (20, 30, 40), "from_centre")
        twin = ClipSpec("v", "red", "square", second, first, 8, 32, 16.3, 15.8, (20, 30, 40), "from_centre")
        a, b = render_clip(spec), render_clip(twin)
        assert np.array_equal(a, np.concatenate([b[4:], b[:4]]))
        assert not np.array_equal(a, b)
        assert frame_caption(spec, 0).endswith("at the centre")   # 2.4 px out of 32
        assert frame_caption(spec, 1).endswith("shifted " + first)
        assert frame_caption(spec, 7).endswith("shifted " + second)


# ---------------------------------------------------------------------------------------------- probe
def test_order_probe_counts_the_true_caption_above_its_swapped_twin():
    e = torch.eye(3)
    videos = e.clone()
    true = torch.stack([e[0], e[1], 0.6 * e[2] + 0.8 * e[0]])
    swapped = torch.stack([0.8 * e[0] + 0.6 * e[1], 0.9 * e[1] + 0.1 * e[2], e[2]])
    r = scores(true, swapped, videos)
    assert r["order"] == pytest.approx(200 / 3)      # videos 0 and 1 right, video 2 wrong
    assert r["R1"] == pytest.approx(200 / 3)          # caption 2 ranks video 0 first
    assert r["R5"] == pytest.approx(100.0)
    # a scale on the features changes nothing (cosine similarity)
    assert scores(3 * true, 0.5 * swapped, 2 * videos)["order"] == pytest.approx(200 / 3)
    assert order_probe(torch.tensor([1.0, 0.2]), torch.tensor([0.5, 0.2])) == pytest.approx(75.0)
    assert order_probe(torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.3])) == 0.0


def _tiny_dgl(latent, frames):
    torch.manual_seed(0)
    clip = CLIP(tiny_clip_config(vocab_size=300, vision_width=64, transformer_width=64, transformer_heads=1,
                                 embed_dim=32))
    return DGL(clip, DGLConfig(shared_latent_space=latent, max_frames=frames, max_words=12,
                               unified_transformer_layers=2)).eval()


def test_linear_latent_space_cannot_see_frame_order_transformer_can():
    """What the demo's table shows, by construction: the linear space gives every frame the same
    prompts (a video's feature does not change when its frames are reordered); the transformer's
    frame prompts differ per frame."""
    video = torch.randn(2, 4, 3, 32, 32)
    reordered = video[:, [2, 3, 0, 1]]
    mask = torch.ones(2, 4)
    with torch.no_grad():
        lin = _tiny_dgl("linear", 4)
        assert torch.allclose(lin.encode_video(video, mask), lin.encode_video(reordered, mask), atol=1e-5)
        tr = _tiny_dgl("transformer", 4)
        assert tr.prompts().frames.shape[1] == 4
        assert not torch.allclose(tr.prompts().frames[:, 0], tr.prompts().frames[:, 2])
        assert (tr.encode_video(video, mask) - tr.encode_video(reordered, mask)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- pre-training
def _normalised(frames: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(frames).float().permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return (x - mean) / std


def test_pretraining_on_single_frames_improves_frame_caption_retrieval(tmp_path):
    specs = make_specs(16, 0, seed=2, min_frames=4, max_frames=4, motion="from_centre")
    images = torch.cat([_normalised(render_clip(s)) for s in specs])
    captions = [frame_caption(s, t) for s in specs for t in range(s.num_frames)]
    vocab = write_bpe_vocab(captions, str(tmp_path / "bpe.txt.gz"), num_merges=40)
    tok = get_tokenizer(bpe_path=vocab)
    torch.manual_seed(0)
    clip = CLIP(tiny_clip_config(vocab_size=tok.vocab_size, vision_width=64, transformer_width=64,
                                 transformer_heads=1, embed_dim=32, vision_layers=1, transformer_layers=1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = frame_caption_accuracy(clip, tok, images, captions)
        embedding_before = clip.token_embedding.weight.clone()
        losses = pretrain_clip(clip, tok, images, captions, steps=100, batch_size=32, lr=1e-3, seed=0)
        after = frame_caption_accuracy(clip, tok, images, captions)
    finally:
        torch.set_num_threads(threads)
    assert after > max(0.2, 4 * before), (before, after)   # 27 frame captions: chance is 3.7 %
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # the rows the captions use were trained and written back; the full vocabulary is kept
    assert clip.token_embedding.weight.shape == embedding_before.shape
    assert not torch.equal(clip.token_embedding.weight, embedding_before)
    path = str(tmp_path / "clip.pt")
    save_clip(clip, path)
    again = build_clip(load_clip_state_dict(path))   # OpenAI's state-dict format
    assert frame_caption_accuracy(again, tok, images, captions) == pytest.approx(after)


# ---------------------------------------------------------------------------------------------- data folders
def _prepare(out, *extra):
    return demo_main(["--prepare_only", "--out", str(out), "--own_vocab", "--pretrain_steps", "0",
                      "--num_val", "2", "--max_frames", "4", *extra])


def _snapshot(folder: Path) -> dict:
    """The dataset's files; the frame cache beside them records the videos' modification times."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "frame_cache" not in p.relative_to(folder).parts}


def test_each_data_configuration_has_its_own_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    assert _prepare(out, "--num_train", "4", "--num_test", "3") == 0
    first = Path(capsys.readouterr().out.strip().splitlines()[-1].split()[0].split("=", 1)[1])
    before = _snapshot(first)
    assert _prepare(out, "--num_train", "2", "--num_test", "2") == 0   # the smoke test's smaller request
    second = Path(capsys.readouterr().out.strip().splitlines()[-1].split()[0].split("=", 1)[1])
    assert second != first and _snapshot(first) == before
    assert len(os.listdir(second / "videos")) == 2 + 2 + 2
    # a rerun with the first configuration reuses its folder unchanged
    assert _prepare(out, "--num_train", "4", "--num_test", "3") == 0
    assert "using the synthetic dataset" in capsys.readouterr().out and _snapshot(first) == before
    # files that do not match the request are regenerated: a missing video, rows of another size
    os.remove(first / "videos" / "video1.mp4")
    assert _prepare(out, "--num_train", "4", "--num_test", "3") == 0
    assert "writing the synthetic dataset" in capsys.readouterr().out and _snapshot(first) == before
    (first / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\nret0,msr4,video4,x\n")
    assert _prepare(out, "--num_train", "4", "--num_test", "3") == 0
    assert "writing the synthetic dataset" in capsys.readouterr().out and _snapshot(first) == before


def test_default_configuration_keeps_the_data_folder_name(tmp_path):
    class Args:
        num_train, num_test, num_val, seed, max_frames = (DEFAULTS[k] for k in
                                                          ("num_train", "num_test", "num_val", "seed", "max_frames"))
    assert data_folder(str(tmp_path), data_config(Args)) == os.path.join(str(tmp_path), "data")
    Args.num_train = 16
    assert data_folder(str(tmp_path), data_config(Args)) != os.path.join(str(tmp_path), "data")


def test_a_folder_from_an_earlier_demo_version_is_regenerated(tmp_path, capsys):
    out = tmp_path / "demo"
    assert _prepare(out, "--num_train", "3", "--num_test", "2") == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1].split()[0].split("=", 1)[1])
    manifest = json.loads((folder / "demo_data.json").read_text())
    manifest["version"] = 1
    (folder / "demo_data.json").write_text(json.dumps(manifest))
    (folder / "videos" / "video99.mp4").write_bytes(b"stale")
    assert _prepare(out, "--num_train", "3", "--num_test", "2") == 0
    assert "writing the synthetic dataset" in capsys.readouterr().out
    assert not (folder / "videos" / "video99.mp4").exists()
    assert json.loads((folder / "demo_data.json").read_text())["version"] != 1


def test_a_rerun_reuses_a_run_trained_with_the_same_settings_only(tmp_path, capsys):
    """A finished demo run is reused when main.py's command, the data and the CLIP file are unchanged; any
    change, --retrain, or a run that failed trains again (a fake main.py that counts its runs)."""
    import sys

    from demo.run import RUN_RECORD, run_record, train_dgl

    root, folder, clip = tmp_path / "data", tmp_path / "run", tmp_path / "clip.pt"
    root.mkdir()
    (root / "demo_data.json").write_text("{}")
    clip.write_bytes(b"weights")
    counter, status = tmp_path / "count", tmp_path / "status"
    status.write_text("0")
    fake_main = ("import os, sys; f, c, s = sys.argv[1:4]; os.makedirs(f, exist_ok=True); "
                 "open(c, 'a').write('x'); [open(os.path.join(f, n), 'w').close() "
                 "for n in ('ckpt.pth.tar', 'results.json')]; sys.exit(int(open(s).read()))")
    cmd = [sys.executable, "-c", fake_main, str(folder), str(counter), str(status)]
    runs = lambda: len(counter.read_text()) if counter.exists() else 0  # noqa: E731

    def train(retrain=False, command=cmd):
        return train_dgl(command, str(folder), run_record(command, {"root": str(root)}, str(clip)), retrain)

    assert train() == 0 and runs() == 1 and (folder / RUN_RECORD).is_file()
    assert train() == 0 and runs() == 1                     # same settings: reused
    assert "already trained with these settings, reused" in capsys.readouterr().out
    assert train(command=cmd + ["--epochs", "3"]) == 0 and runs() == 2   # another command line
    assert train(command=cmd + ["--epochs", "3"]) == 0 and runs() == 2
    assert train(retrain=True, command=cmd + ["--epochs", "3"]) == 0 and runs() == 3
    os.utime(clip, ns=(1, 1))                                # the CLIP file was made again
    assert train(command=cmd + ["--epochs", "3"]) == 0 and runs() == 4
    status.write_text("3")                                  # a run that fails leaves no record behind
    assert train(retrain=True, command=cmd + ["--epochs", "3"]) == 3 and runs() == 5
    assert not (folder / RUN_RECORD).exists()
    status.write_text("0")
    assert train(command=cmd + ["--epochs", "3"]) == 0 and runs() == 6


def test_bad_demo_options_are_one_line_errors(capsys):
    for argv in (["--max_frames", "3"], ["--eval_on", "val", "--num_val", "0"], ["--num_test", "0"]):
        with pytest.raises(SystemExit) as e:
            demo_main(argv)
        assert e.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_demo_small(tmp_path):
    out = tmp_path / "demo"
    cmd = ["bash", str(REPO / "scripts" / "demo.sh"), "--out", str(out), "--epochs", "1",
           "--num_train", "16", "--num_test", "8", "--num_val", "4", "--batch_size", "8", "--max_frames", "4",
           "--pretrain_steps", "5", "--own_vocab", "--threads", "1", "--compare"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "after pre-training" in r.stdout
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model (8 test videos) | t2v R@1 | t2v R@5 | order probe | reversed video |")
    assert [line.split(" | ")[0] for line in table[1:]] == [
        "| chance", "| zero-shot: frozen CLIP, frames mean-pooled", "| DGL-Transformer, 1 epochs",
        "| DGL-Transformer + order negatives, 1 epochs", "| DGL-Linear, 1 epochs"]
    # frames mean-pooled and DGL-Linear do not change under reversal: exactly 50 %
    assert table[2].endswith("| 50.0 |") and table[5].endswith("| 50.0 |")
    assert "QB-norm on it after training: Best beta: " in r.stdout
    run = next(out.glob("run-16-8-4-*"))
    for name in ("ckpt.pth.tar", "ckpt.best.pth.tar", "results.json", "log.txt", "config.json"):
        assert (run / name).is_file(), name
    assert (next(out.glob("run_linear-16-8-4-*")) / "ckpt.pth.tar").is_file()
    assert (next(out.glob("run_plain-16-8-4-*")) / "ckpt.pth.tar").is_file()
    evals = json.loads((run / "results.json").read_text())["evaluations"]
    assert [e["epoch"] for e in evals] == [0, 1]
    assert evals[-1]["order"]["swapped_caption"]["count"] == 8  # the test table's order_twin column
    log = (run / "log.txt").read_text()
    assert "order negatives: every training video also reversed" in log and "--batch_groups:" in log
    assert "attention backend: math for training and evaluation (--attention_backend)" in log
    assert (out / "pretrained" / "bpe_simple_vocab_16e6.txt.gz").is_file()   # the demo's own vocabulary
    assert len(list((out / "pretrained").glob("tiny-clip-*-pt5-*.pt"))) == 1
    config = json.loads((run / "config.json").read_text())
    assert config["threads"] == 1   # --threads reaches main.py
    # every layer of the 3-layer tiny CLIP is prompted; main.py reads the frames from the demo's cache
    assert config["unified_transformer_layers"] == 3 and config["frame_cache"].endswith("frame_cache")
    assert len(list((out / "pretrained").glob("tiny-clip-*-l3-*-pt5-*.pt"))) == 1
    assert "cores: 1 compute thread(s)" in (run / "log.txt").read_text()
    # a rerun reuses the data and the pre-trained CLIP and prints the same table
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert again.returncode == 0 and "pre-training the tiny CLIP" not in again.stdout
    assert again.stdout.count("already trained with these settings, reused") == 3   # no run trained again
    assert [line for line in again.stdout.splitlines() if line.startswith("| ")] == table


# ---------------------------------------------------------------------------------------------- repeatability
def _timing_favours(monkeypatch, first_fast: bool):
    """Start-up timings that find the first candidate of every comparison faster (or slower) by far."""
    import modules.backends as backends

    def fake_compare(fns, repeats=3):
        names = list(fns)
        return {n: (1.0 if (i == 0) == first_fast else 10.0) for i, n in enumerate(names)}

    monkeypatch.setattr(backends, "_compare", fake_compare)  # the single-call checks
    monkeypatch.setattr(backends, "time_candidates", lambda runs, rounds: fake_compare(runs))  # the whole model
    backends._cached_fp32_check.cache_clear()
    backends._cached_attention_times.cache_clear()


def _kernels_chosen(argv, monkeypatch, first_fast: bool):
    """The kernels main.py computes with for ``argv``, under patched timings."""
    import torch

    from modules.backends import backend_name, restore
    from runtime.cpu import apply_cpu_settings
    from runtime.precision import Precision
    from tests.toy import tiny_dgl
    from training.config import build_parser, validate

    _timing_favours(monkeypatch, first_fast)
    parser = build_parser()
    args = validate(parser.parse_args(argv), parser)
    precision = Precision(args.precision, torch.device("cpu"), args.eval_precision)
    model = tiny_dgl(shared_latent_space="transformer", max_frames=4)
    try:
        apply_cpu_settings(args, torch.device("cpu"), model, precision)
        return (backend_name(precision.train_attention), backend_name(precision.eval_attention),
                torch.backends.mkldnn.matmul.fp32_precision)
    finally:
        restore()


def test_the_demo_computes_with_the_same_kernels_whatever_the_timings_say(tmp_path, monkeypatch):
    """main.py times attention backends and fp32 product paths at start-up; on a loaded machine a timing
    can come out the other way, and the rerun rounds differently. The demo passes fixed kernels: timings
    made to disagree leave its choices unchanged (and do change them for a run that times)."""
    from demo.run import build_parser as demo_parser, dataset_paths, main_py_command

    paths = dict(dataset_paths(str(tmp_path / "data")), frame_cache=str(tmp_path / "cache"))
    cmd = main_py_command(demo_parser().parse_args([]), "transformer", paths, paths["test_table"], str(tmp_path),
                          "clip.pt", "bpe.gz", str(tmp_path / "run"), "reverse")
    argv = cmd[2:]  # without the interpreter and main.py
    one = _kernels_chosen(argv, monkeypatch, first_fast=True)
    other = _kernels_chosen(argv, monkeypatch, first_fast=False)
    assert one == other and one[:2] == ("math", "math")
    timed = [a for a in argv]
    timed[timed.index("--attention_backend") + 1] = "auto"
    timed[timed.index("--fp32_path") + 1] = "auto"
    assert _kernels_chosen(timed, monkeypatch, True) != _kernels_chosen(timed, monkeypatch, False)
