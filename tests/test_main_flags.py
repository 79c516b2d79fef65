"""Every bad or contradictory flag stops main.py at start-up with ONE clear line and exit status 2."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(args, cwd=REPO, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


BAD = [
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--do_train", "0", "--do_eval", "0"], "nothing to do"),
    (["--freeze_clip", "0"], "--freeze_clip must be 1"),
    (["--precision", "fp16"], "--precision fp16"),
    (["--precision", "int8"], "--precision must be one of"),
    (["--batch_size", "10", "--gradient_accumulation_steps", "3"], "not divisible"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
    (["--shared_latent_space", "linear", "--text_prompt_length", "6", "--local_each_frame_prompt_length", "4"],
     "text_prompt_length == 2 * --local_each_frame_prompt_length"),
    (["--text_prompt_length", "7"], "must be even"),
    (["--resume", "/nonexistent/ckpt.pth.tar"], "--resume checkpoint not found"),
    (["--datatype", "kinetics"], "invalid choice: 'kinetics'"),
    (["--shared_latent_space", "mlp"], "invalid choice: 'mlp'"),
    (["--visual_output_type", "global-local-feature"], "invalid choice"),
    (["--optim", "BertAdam"], "--optim BertAdam is not implemented"),
    (["--dp"], "DataParallel"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "abc"], "invalid float value: 'abc'"),
    (["--warmup_proportion", "1.5"], "--warmup_proportion must be in [0, 1)"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--batch_size", "0"], "--batch_size and --batch_size_val must be >= 1"),
    (["--load_from_pretrained", "1"], "--load_from_pretrained 1 needs --resume"),
    (["--sim_header", "seqTransf"], "--sim_header seqTransf is not supported"),
    (["--lmdb_dataset", "x.lmdb"], "--lmdb_dataset is not supported"),
    (["--max_frames", "0"], "--max_frames must be >= 1"),
    (["--clip_grad_norm", "-1"], "--clip_grad_norm must be >= 0"),
    (["--do_eval", "2"], "invalid choice: 2"),
    (["--qb_norm_train_queries", "100"], "without --save_sim_matrix it does nothing"),
]


def _main_in_this_process(args, capsys) -> tuple[int, str]:
    """main.py's main() in this process: (exit status, stderr). The tests below that start main.py as a
    process of its own check what only a process shows (nothing else reaches stderr, its exit status)."""
    import main

    try:
        code = main.main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra,expected", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_flag_one_line(extra, expected, tmp_path, capsys):
    base = ["--output_dir", str(tmp_path / "o"), "--train_csv", "t.csv"]
    code, err = _main_in_this_process(base + extra, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("main.py: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_missing_output_dir_and_train_csv(tmp_path):
    r = _run([])
    assert r.returncode == 2 and "--output_dir" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _run(["--output_dir", str(tmp_path / "o")])
    assert r.returncode == 2 and "--train_csv" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_gpu(tmp_path):
    r = _run(["--output_dir", str(tmp_path / "o"), "--do_eval", "1", "--device", "cuda"])
    assert r.returncode == 2 and "no CUDA device" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_clip_weights_one_line(tmp_path):
    r = _run(["--output_dir", str(tmp_path / "o"), "--do_eval", "1", "--pretrained_dir", str(tmp_path / "none")])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "CLIP weights 'ViT-B/32' not found" in lines[0], r.stderr


def test_clip_too_shallow_for_prompt_layers(tmp_path):
    from modules.clip import CLIP, tiny_clip_config
    from modules.tokenizer import write_bpe_vocab

    torch.save(CLIP(tiny_clip_config(vocab_size=600)).state_dict(), tmp_path / "tiny.pt")
    bpe = write_bpe_vocab(["a red square moves left"] * 3, tmp_path / "bpe.txt.gz", num_merges=10)
    r = _run(["--output_dir", str(tmp_path / "o"), "--do_eval", "1", "--pretrained_dir", str(tmp_path),
              "--pretrained_clip_name", "tiny.pt", "--bpe_path", bpe, "--unified_transformer_layers", "12"])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unified_transformer_layers=12 exceeds the CLIP depth" in lines[0], r.stderr


def test_published_script_flags_are_accepted():
    """The flags the published scripts pass parse (paths aside)."""
    from training.config import build_parser, validate

    argv = ("--do_train 1 --do_eval 0 --num_thread_reader 8 --epochs 5 --batch_size 128 --n_display 50 "
            "--train_csv a.csv --val_csv b.csv --data_path c.json --features_path d --output_dir o "
            "--optim AdamW --lr 2e-3 --coef_lr 1e-3 --wd 0.2 --max_words 32 --max_frames 12 --batch_size_val 16 "
            "--datatype msrvtt --expand_msrvtt_sentences --feature_framerate 3 --freeze_layer_num 12 "
            "--slice_framepos 2 --loose_type --linear_patch 2d --sim_header meanP --pretrained_clip_name ViT-B/32 "
            "--precision amp --init_method tcp://127.0.0.1:6061 --pretrained_dir p --freeze_clip 1 "
            "--time_embedding 0 --resume None --load_from_pretrained 0 --shared_latent_space transformer "
            "--lmdb_dataset None --text_prompt_length 8 --local_each_frame_prompt_length 4 "
            "--global_visual_prompt_length 4 --unified_prompt_layers 12 --temperature_new 1.0 --camoe_dsl 0").split()
    p = build_parser()
    a = validate(p.parse_args(argv), p)
    assert a.resume is None and a.unified_transformer_layers == 12 and a.do_train == 1 and a.precision == "amp"
    a = validate(p.parse_args(["--output_dir", "o", "--do_eval", "1"]), p)
    assert a.do_train == 0  # --do_eval 1 alone evaluates only


@pytest.mark.parametrize("script", ["msrvtt.sh", "vatex.sh", "lsmdc.sh", "activitynet.sh", "custom.sh"])
def test_scripts_need_paths(script, tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "VIDEO_PATH", "PRETRAINED_DIR",
                                                            "DGL_PRETRAINED_DIR")}
    r = subprocess.run(["bash", str(REPO / "scripts" / script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "set DATA_PATH" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "videos").mkdir()
    env.update(DATA_PATH=str(tmp_path), PRETRAINED_DIR=str(tmp_path))
    r = subprocess.run(["bash", str(REPO / "scripts" / script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "CLIP weights" in r.stderr and len(r.stderr.strip().splitlines()) == 1


_TORCH_AFTER_MAIN = """
import json, sys
import main
try:
    code = main.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize("extra,expected_code", [(["--help"], 0), (["--text_prompt_length", "7"], 2),
                                                 (["--shared_latent_space", "mlp"], 2)])
def test_help_and_bad_flags_answer_without_importing_torch(extra, expected_code, tmp_path):
    """--help and a bad model flag stop main.py before anything imports torch (seconds of imports): the flags
    are made from, and checked by, DGLConfig's torch-free module."""
    import json

    r = subprocess.run([sys.executable, "-c", _TORCH_AFTER_MAIN, "--output_dir", str(tmp_path / "o"),
                        "--train_csv", "t.csv", *extra], cwd=REPO, capture_output=True, text=True, timeout=120)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {"code": expected_code, "torch": False}, r.stderr
