"""main.py --config RUN/config.json: a new run with exactly that run's settings (flags given after it win);
a record that names unknown settings, or paths that are gone, is refused in one line before anything starts."""
from __future__ import annotations

import json

import pytest
import torch

from tests.toy import ToyData, tiny_dgl
from training.config import parse_args

TOY = ["--datatype", "msrvtt", "--epochs", "1", "--batch_size", "4", "--batch_size_val", "8", "--lr", "1e-2",
       "--num_thread_reader", "0", "--threads", "1", "--n_display", "1", "--max_words", "8", "--max_frames", "2",
       "--text_prompt_length", "4", "--local_each_frame_prompt_length", "2", "--global_visual_prompt_length", "2",
       "--unified_transformer_layers", "2", "--shared_latent_space", "linear", "--no_progress", "--device", "cpu",
       "--seed", "3", "--cpu_tuning", "0", "--no_tensorboard", "--warmup_proportion", "0.2"]


def _run(args) -> dict:
    from training.runner import run

    data = ToyData(num_videos=8)
    return run(args, model=tiny_dgl(), train_dataset=data.train(augment=True), test_dataset=data)


def _settings(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("output_dir", "config")}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    train_csv = root / "train.csv"
    train_csv.write_text("video_id,sentence\n")  # named by the run; the toy data stands in for it
    args = parse_args([*TOY, "--train_csv", str(train_csv), "--output_dir", str(root / "a")])
    settings = _settings(args)
    return root, settings, _run(args)


def test_replay_gives_the_same_run(first_run):
    root, settings, first = first_run
    args = parse_args(["--config", str(root / "a" / "config.json"), "--output_dir", str(root / "b")])
    assert _settings(args) == settings and args.output_dir == str(root / "b")
    again = _run(args)
    assert again["step_losses"] == first["step_losses"] and len(first["step_losses"]) == 2
    strip = [{k: e[k] for k in ("epoch", "global_step", "t2v", "v2t")} for e in first["results"]["evaluations"]]
    assert [{k: e[k] for k in ("epoch", "global_step", "t2v", "v2t")} for e in again["results"]["evaluations"]] == strip
    a, b = first["model"].state_dict(), again["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    recorded = json.loads((root / "b" / "config.json").read_text())
    assert recorded["config"] == str(root / "a" / "config.json")  # where the replay came from
    ckpt = torch.load(root / "b" / "ckpt.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["config"]["lr"] == 1e-2 and ckpt["config"]["seed"] == 3


def test_flags_after_config_override_it(first_run):
    root, settings, _ = first_run
    args = parse_args(["--config", str(root / "a" / "config.json"), "--output_dir", str(root / "c"), "--lr", "0.5",
                       "--shared_latent_space", "transformer", "--text_prompt_length", "8"])
    changed = {k for k, v in _settings(args).items() if settings.get(k) != v}
    assert changed == {"lr", "shared_latent_space", "text_prompt_length"} and args.lr == 0.5


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        parse_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("main.py: error: "), err
    return err[0]


def test_unknown_keys_bad_values_and_gone_paths_are_named_before_anything_starts(first_run, tmp_path, capsys):
    root, _, _ = first_run
    record = json.loads((root / "a" / "config.json").read_text())
    out = tmp_path / "new"

    def write(**changes):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**record, **changes}))
        return str(path)

    line = _refused(["--config", write(sim_header_v2=1, old_flag="x"), "--output_dir", str(out)], capsys)
    assert "unknown or removed settings: old_flag, sim_header_v2" in line
    line = _refused(["--config", write(lr="fast", max_frames=2.5), "--output_dir", str(out)], capsys)
    assert 'lr "fast" (a number)' in line and "max_frames 2.5 (an integer)" in line
    line = _refused(["--config", write(shared_latent_space="mlp"), "--output_dir", str(out)], capsys)
    assert "shared_latent_space" in line and "one of" in line
    gone = str(tmp_path / "gone.csv")
    line = _refused(["--config", write(train_csv=gone, val_csv=str(tmp_path / "gone_test.csv")), "--output_dir",
                     str(out)], capsys)
    assert f"these paths no longer exist: --train_csv {gone}, --val_csv {tmp_path / 'gone_test.csv'}" in line
    # a path given anew is not the record's
    args = parse_args(["--config", write(train_csv=gone), "--output_dir", str(out), "--train_csv", record["train_csv"]])
    assert args.train_csv == record["train_csv"]
    line = _refused(["--config", write(), "--lr", "1"], capsys)
    assert "give --output_dir" in line
    line = _refused(["--config", str(tmp_path / "none.json"), "--output_dir", str(out)], capsys)
    assert "cannot read it" in line
    assert not out.exists()  # nothing written


def test_a_replay_never_writes_over_a_run(first_run, capsys):
    root, _, _ = first_run
    record = json.loads((root / "a" / "config.json").read_text())
    assert record["overwrite_output_dir"] is False
    args = parse_args(["--config", str(root / "a" / "config.json"), "--output_dir", str(root / "a")])
    assert args.overwrite_output_dir is False
    with pytest.raises(SystemExit):
        _run(args)  # the output folder rule: a folder that holds a run is refused
    assert "holds" in capsys.readouterr().err
    assert json.loads((root / "a" / "config.json").read_text()) == record
