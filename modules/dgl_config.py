"""DGL's options (DGLConfig): the published model flags, their defaults, allowed values and the one check of
them. Free of torch, so that the command lines (main.py, search_videos.py) build and check their flags, and
answer --help or a bad flag, without importing it; ``modules.dgl`` builds the model from them."""
from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields

from .tokenizer import MIN_WORDS

LATENT_SPACES = ("linear", "transformer")
VISUAL_OUTPUT_TYPES = ("global_prompt0", "average_global_prompt", "average_frame_cls_token",
                       "average_global_prompt_and_frame_cls_token")


def _option(default, help: str, *, choices: tuple | None = None, minimum: int | None = None,
            aliases: tuple[str, ...] = ()):
    """A DGLConfig field. Its metadata is what the programs turn into a flag: the help text, the allowed
    values (``choices``) or the least one (``minimum``), and other published spellings of the flag."""
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum,
                                            "aliases": aliases})


@dataclass
class DGLConfig:
    """The model's options, under the published flag names: the one source of the model flags.

    main.py and search_videos.py add one flag per field (same default, choices and bounds; see
    ``runtime.model_flags``), checkpoints record them, and :meth:`check` is the one check of their values,
    so a model that one program accepts every program accepts.
    """

    # Where the prompts come from (section 1 of the spec): a learned table of K + P*T tokens per layer mixed
    # by one transformer block, or P learned vectors per layer with two linear maps to the text prompts.
    shared_latent_space: str = _option(
        "transformer", "where the prompts come from: transformer (the published default) or linear",
        choices=LATENT_SPACES)
    # Text length L_w in tokens, [SOT] and [EOT] included (captions are cut to max_words - 2 BPE tokens).
    max_words: int = _option(32, "caption length in tokens, [SOT] and [EOT] included", minimum=MIN_WORDS)
    # Frames T per video; the transformer latent space learns prompts for exactly this many frames.
    max_frames: int = _option(12, "frames per video (the transformer latent space is built for this many)",
                              minimum=1)
    # K: text prompts per layer, K/2 before the caption's tokens and K/2 after them. 0 is allowed (an
    # ablation: without prompts the towers are plain CLIP), as the published code's concatenations allow.
    text_prompt_length: int = _option(8, "K, text prompts per layer (even: half prefix, half postfix)",
                                      minimum=0)
    # P: local prompts per frame and layer, inserted after each frame's CLS token.
    local_each_frame_prompt_length: int = _option(4, "P, local prompts per frame and layer", minimum=0)
    # G: global prompts of a video, shared by its frames; they attend to every frame.
    global_visual_prompt_length: int = _option(4, "G, global prompts per video", minimum=0)
    # Ly: how many layers (from the first) get fresh prompts; at most the CLIP's depth.
    unified_transformer_layers: int = _option(12, "Ly, prompted layers (at most the CLIP depth)", minimum=1,
                                              aliases=("unified_prompt_layers",))
    # The video feature (section 3.5 of the spec); the ones with "global" read the global prompts.
    visual_output_type: str = _option("global_prompt0", "the video feature: the first global prompt "
                                      "(published), the mean of the global prompts, of the frames' CLS tokens, "
                                      "or of both", choices=VISUAL_OUTPUT_TYPES)
    # Opt-in, changes results: keep padding frames (video_mask == 0) out of the global prompts'
    # attention and out of frame averages. The published model lets them take part.
    mask_padding_frames: bool = _option(False, "opt-in (changes results): keep padding frames out of "
                                        "attention and averages", choices=(False, True))

    def __post_init__(self):
        for f in fields(self):  # a 0/1 flag value is the bool it means (and records as such)
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool) and getattr(self, f.name) in (0, 1):
                setattr(self, f.name, bool(getattr(self, f.name)))
        self.check(asdict(self))

    @classmethod
    def check(cls, values: Mapping, spell: Callable[[str], str] = str) -> None:
        """Raise ValueError, in one line, for the first of ``values`` (field name -> value; fields left out
        take their defaults) that the model cannot take. ``spell`` writes a field's name in the message
        (the command lines: ``--`` + name)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown DGL option(s) {', '.join(map(spell, unknown))}; known: "
                             f"{', '.join(map(spell, known))}")
        v = {**{name: f.default for name, f in known.items()}, **values}
        for name, f in known.items():
            value, choices, minimum = v[name], f.metadata["choices"], f.metadata["minimum"]
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{spell(name)} must be an integer, got {value!r}")
            if choices is not None and value not in choices:
                raise ValueError(f"{spell(name)} must be one of {', '.join(map(str, choices))}, got {value!r}")
            if minimum is not None and value < minimum:
                raise ValueError(f"{spell(name)} must be >= {minimum}, got {value}")
        if v["global_visual_prompt_length"] == 0 and "global" in v["visual_output_type"]:
            raise ValueError(f"{spell('visual_output_type')} {v['visual_output_type']} reads the global prompts, "
                             f"so {spell('global_visual_prompt_length')} must be at least 1")
        if v["text_prompt_length"] % 2:
            raise ValueError(f"{spell('text_prompt_length')} must be even (half prefix, half postfix), "
                             f"got {v['text_prompt_length']}")
        if v["shared_latent_space"] == "linear" and v["text_prompt_length"] != 2 * v["local_each_frame_prompt_length"]:
            raise ValueError(f"the linear latent space projects each of the P local prompts to one prefix and one "
                             f"postfix text prompt: {spell('shared_latent_space')} linear needs "
                             f"{spell('text_prompt_length')} == 2 * {spell('local_each_frame_prompt_length')} "
                             f"(got {v['text_prompt_length']} and {v['local_each_frame_prompt_length']})")

    @classmethod
    def from_options(cls, options) -> "DGLConfig":
        """The configuration of ``options`` (a mapping or a namespace of flags, e.g. main.py's arguments or a
        checkpoint's record); fields it lacks or holds as None take their defaults."""
        get = options.get if isinstance(options, Mapping) else (lambda name: getattr(options, name, None))
        return cls(**{f.name: get(f.name) for f in fields(cls) if get(f.name) is not None})

    @classmethod
    def recorded_in(cls, ckpt: dict) -> dict:
        """The options our checkpoints record (``ckpt["config"]``: main.py's resolved flags), 0/1 flags as
        bools; {} for a checkpoint that records none (the official ones)."""
        config = ckpt.get("config")
        if not isinstance(config, dict):
            return {}
        recorded = {f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None}
        for f in fields(cls):
            if f.type == "bool" and recorded.get(f.name) in (0, 1):
                recorded[f.name] = bool(recorded[f.name])
        return recorded

    def to_dict(self) -> dict:
        return asdict(self)
