"""DGLConfig is the one source of the model's flags: main.py and search_videos.py have one flag per field, with
its default, choices and bounds, and a model that one program accepts the other accepts too."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

import pytest

from modules.dgl import VISUAL_OUTPUT_TYPES, DGLConfig
from retrieval import cli as search_cli
from training.config import build_parser, validate


def _actions(parser: argparse.ArgumentParser) -> dict:
    return {a.dest: a for a in parser._actions}


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _as_flag(value):
    return int(value) if isinstance(value, bool) else value


def test_every_field_is_a_main_py_flag_with_its_default_and_choices():
    actions = _actions(build_parser())
    for f in fields(DGLConfig):
        assert f.name in actions, f"DGLConfig.{f.name} is not a main.py flag"
        action = actions[f.name]
        assert action.default == _as_flag(f.default), f.name
        choices = f.metadata["choices"]
        if choices is not None:
            assert sorted(map(_as_flag, action.choices)) == sorted(map(_as_flag, choices)), f.name
        assert f.default is not MISSING and action.help, f.name


def test_search_videos_model_flags_are_main_pys():
    main_actions = _actions(build_parser())
    commands = _subparsers(search_cli.build_parser())
    with_model = [name for name, p in commands.items() if "shared_latent_space" in _actions(p)]
    assert {"index", "visualize"} <= set(with_model)
    for name in with_model:
        actions = _actions(commands[name])
        for f in fields(DGLConfig):
            action, main = actions[f.name], main_actions[f.name]
            assert action.default is None, (name, f.name)  # None: as the checkpoint records it
            assert action.option_strings == main.option_strings and action.type is main.type, (name, f.name)
            assert action.choices == main.choices, (name, f.name)


# model flags (besides a 2-layer model of 2 frames) and whether the model takes them
CASES = [
    ([], True),
    (["--text_prompt_length", "0", "--local_each_frame_prompt_length", "0", "--global_visual_prompt_length", "0",
      "--visual_output_type", "average_frame_cls_token"], True),   # no prompts at all: plain CLIP (an ablation)
    (["--text_prompt_length", "0"], True),
    (["--global_visual_prompt_length", "0"], False),                # global_prompt0 reads a global prompt
    (["--max_words", "2"], True),                                    # [SOT] [EOT]: what the tokenizer keeps
    (["--max_words", "1"], False),
    (["--max_frames", "0"], False),
    (["--text_prompt_length", "3"], False),
    (["--local_each_frame_prompt_length", "-1"], False),
    (["--shared_latent_space", "linear", "--text_prompt_length", "6"], False),
    (["--shared_latent_space", "linear", "--text_prompt_length", "4", "--local_each_frame_prompt_length", "2"], True),
    (["--shared_latent_space", "mlp"], False),
    (["--visual_output_type", "mean"], False),
    (["--mask_padding_frames", "1"], True),
    (["--mask_padding_frames", "2"], False),
    (["--unified_prompt_layers", "1"], True),
] + [(["--visual_output_type", kind], True) for kind in VISUAL_OUTPUT_TYPES]

BASE = ["--unified_transformer_layers", "2", "--max_frames", "2"]


def _main_py_accepts(flags: list[str], tmp_path) -> bool:
    parser = build_parser()
    try:
        validate(parser.parse_args(["--output_dir", str(tmp_path / "o"), "--do_eval", "1", *BASE, *flags]), parser)
    except SystemExit as stop:
        assert stop.code == 2
        return False
    return True


def _search_accepts(flags: list[str], clip: dict) -> bool:
    from retrieval.model_io import SearchError, load_model

    try:
        args = search_cli.build_parser().parse_args(["index", "v.mp4", "--index", "i", "--clip", clip["clip"],
                                                     *BASE, *flags])
    except SystemExit as stop:
        assert stop.code == 2
        return False
    try:
        load_model(clip["clip"], None, clip["bpe"], search_cli._model_flags(args))
    except SearchError:
        return False
    return True


@pytest.fixture(scope="module")
def tiny_clip_files(tmp_path_factory):
    from preprocess.make_tiny_clip import write_tiny_clip

    return write_tiny_clip(["a man is cooking", "a dog runs"], str(tmp_path_factory.mktemp("clip")), num_merges=10)


def test_main_py_and_search_videos_accept_the_same_models(tiny_clip_files, tmp_path, capsys):
    for flags, accepted in CASES:
        by_main = _main_py_accepts(flags, tmp_path)
        by_search = _search_accepts(flags, tiny_clip_files)
        assert (by_main, by_search) == (accepted, accepted), (flags, by_main, by_search)
    capsys.readouterr()


def test_one_check_spells_flags_for_the_command_lines():
    with pytest.raises(ValueError, match="^max_words must be >= 2, got 1$"):
        DGLConfig(max_words=1)
    with pytest.raises(ValueError, match="--text_prompt_length == 2 \\* --local_each_frame_prompt_length"):
        DGLConfig.check({"shared_latent_space": "linear", "text_prompt_length": 6}, spell=lambda n: "--" + n)
    assert DGLConfig(mask_padding_frames=1).mask_padding_frames is True  # a 0/1 flag records as a bool


def test_a_checkpoint_records_the_config_it_was_trained_with():
    config = DGLConfig(shared_latent_space="linear", text_prompt_length=4, local_each_frame_prompt_length=2,
                       mask_padding_frames=True)
    main_py_record = {**config.to_dict(), "mask_padding_frames": 1, "lr": 1e-3, "max_words": 32}
    assert DGLConfig(**DGLConfig.recorded_in({"config": main_py_record})) == config
    assert DGLConfig.recorded_in({"state_dict": {}}) == {}  # official checkpoints record nothing
