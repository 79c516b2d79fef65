"""OpenAI CLIP (ViT image tower + causal text tower), plain, with OpenAI's parameter names.

Nothing DGL-specific lives here: DGL (modules/dgl.py) reuses these blocks' weights for its prompted
text encoder and its global-local video attention.  Tensors are batch-first: (B, L, W).

Dimensions are read from the state dict, so ViT-B/32, ViT-B/16 and ViT-L/14 all build.
"""
from __future__ import annotations

import math
import os
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Keys OpenAI's TorchScript archives carry beside the weights; they are not parameters.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")

_MISSING_WEIGHTS_HELP = (
    "CLIP weights not found at '{path}'. DGL uses OpenAI's CLIP ViT-B/32 or ViT-B/16 TorchScript archive "
    "(ViT-B-32.pt / ViT-B-16.pt, from the OpenAI CLIP repository's model list) or a plain state dict saved "
    "with torch.save; put it in --pretrained_dir or pass its path."
)


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    image_resolution: int = 224
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 32
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12

    @property
    def vision_heads(self) -> int:
        return self.vision_width // 64

    @property
    def num_patches(self) -> int:
        return (self.image_resolution // self.vision_patch_size) ** 2

    @classmethod
    def from_state_dict(cls, state_dict: dict) -> "CLIPConfig":
        if "visual.proj" not in state_dict:
            raise ValueError("only ViT CLIP models are supported (the state dict has no 'visual.proj'; "
                             "ResNet CLIPs are not)")

        def count_blocks(prefix: str) -> int:
            return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})

        patch = state_dict["visual.conv1.weight"].shape[-1]
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        width = state_dict["ln_final.weight"].shape[0]
        return cls(
            embed_dim=state_dict["text_projection"].shape[1],
            image_resolution=patch * grid,
            vision_layers=count_blocks("visual.transformer.resblocks."),
            vision_width=state_dict["visual.conv1.weight"].shape[0],
            vision_patch_size=patch,
            context_length=state_dict["positional_embedding"].shape[0],
            vocab_size=state_dict["token_embedding.weight"].shape[0],
            transformer_width=width,
            transformer_heads=width // 64,
            transformer_layers=count_blocks("transformer.resblocks."),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def tiny_clip_config(**overrides) -> CLIPConfig:
    """A small CLIP (2+2 layers, 32 px, width 128, 2 heads) for tests and the CPU demo."""
    config = dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
                  context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
                  transformer_layers=2)
    config.update(overrides)
    return CLIPConfig(**config)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (CLIP's fp16 weights need it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


QUICK_GELU_SCALE = 1.702


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_SCALE * x)


def feed_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` of a block (c_fc, QuickGELU, c_proj) with fewer passes over its widest activations.

    x * sigmoid(1.702 x) = silu(1.702 x) / 1.702: c_fc's product applies the factor 1.702 (addmm's alpha
    and beta) and c_proj's the factor 1 / 1.702, so QuickGELU is one fused pass (SiLU, in place when no
    gradient is recorded) instead of three (a scaling, a sigmoid, a product) and their temporaries. Equal to
    the plain form to float rounding."""
    fc, proj = mlp.c_fc, mlp.c_proj
    shape = x.shape
    z = torch.addmm(fc.bias, x.reshape(-1, shape[-1]), fc.weight.t(), beta=QUICK_GELU_SCALE, alpha=QUICK_GELU_SCALE)
    z = F.silu(z, inplace=not torch.is_grad_enabled() and not torch.jit.is_tracing())  # a trace: one graph
    out = torch.addmm(proj.bias, z, proj.weight.t(), alpha=1 / QUICK_GELU_SCALE)
    return out.view(*shape[:-1], out.shape[-1])


class SelfAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names (in_proj_*, out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.width, self.heads = width, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's initialisation.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape  # (B, L, W) -> (B, H, L, W/H)
        return x.view(b, n, self.heads, self.width // self.heads).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = x.shape  # (B, H, L, W/H) -> (B, L, W)
        return x.transpose(1, 2).reshape(b, n, self.width)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of x (B, L, W), each (B, H, L, W/H)."""
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        q, k, v = self.qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(self.merge_heads(out))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + feed_forward(self.mlp, self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int):
        super().__init__()
        self.input_resolution, self.patch_size, self.width = input_resolution, patch_size, width
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> tokens (B, 1 + S, W): CLS + patches, positions added, ln_pre applied."""
        if images.shape[-1] != self.input_resolution or images.shape[-2] != self.input_resolution:
            raise ValueError(f"images are {tuple(images.shape[-2:])} px; this CLIP takes "
                             f"{self.input_resolution}x{self.input_resolution}")
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, S, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.embed(images))
        return self.ln_post(x[:, 0]) @ self.proj


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config.image_resolution, config.vision_patch_size, config.vision_width,
                                        config.vision_layers, config.vision_heads, config.embed_dim)
        self.transformer = Transformer(config.transformer_width, config.transformer_layers, config.transformer_heads)
        self.token_embedding = nn.Embedding(config.vocab_size, config.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.transformer_width))
        self.ln_final = LayerNorm(config.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(config.transformer_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation (used for random-weight models in tests and the demo)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.transformer, self.visual.transformer):
            proj_std = tower.width ** -0.5 * (2 * tower.layers) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=tower.width ** -0.5)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * tower.width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images.to(self.dtype))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) with L <= context_length; the feature is read at the EOT (largest) id."""
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]].to(self.dtype)
        x = self.ln_final(self.transformer(x, causal=True))
        return x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)] @ self.text_projection

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(ids), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def _is_torchscript_archive(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        # TorchScript archives carry the module's code; torch.save archives only data.
        return any("/code/" in name or name.endswith("constants.pkl") for name in archive.namelist())


def load_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """CLIP weights from an OpenAI TorchScript archive or a torch.save'd state dict, as fp32 tensors.

    Pickled files are read with ``weights_only=True``: no arbitrary objects are unpickled.
    """
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(_MISSING_WEIGHTS_HELP.format(path=path))
    if _is_torchscript_archive(path):
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is how OpenAI ships CLIP
            warnings.simplefilter("ignore", DeprecationWarning)
            state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"{path}: not a TorchScript archive nor a weights-only state dict ({err})") from err
        if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
            state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state_dict).__name__}")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()
            if k not in _NON_PARAMETER_KEYS}


def build_clip(state_dict: dict[str, torch.Tensor]) -> CLIP:
    """A CLIP whose dimensions are read from the state dict, with those weights loaded (strictly)."""
    state_dict = {k: v for k, v in state_dict.items() if k not in _NON_PARAMETER_KEYS}
    model = CLIP(CLIPConfig.from_state_dict(state_dict))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"CLIP state dict does not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    return model
