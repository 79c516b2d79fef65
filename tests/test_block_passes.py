"""The vision blocks' elementwise and layout work: QuickGELU as one fused pass (equal to x * sigmoid(1.702 x) to
float rounding, values and gradients), and the local attention's keys and values each copied once."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modules.clip import QuickGELU, ResidualAttentionBlock, feed_forward
from modules.dgl import global_local_block


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = [list(a.shape) if isinstance(a, torch.Tensor) else None for a in args]
        self.calls.append((f"aten::{func.__name__.split('.')[0]}", shapes))
        return func(*args, **(kwargs or {}))


def ops(fn) -> list:
    """(name, input shapes) of every operator ``fn`` runs."""
    with Recorder() as recorder:
        fn()
    return recorder.calls


def test_feed_forward_is_quick_gelu_in_one_pass():
    torch.manual_seed(0)
    block = ResidualAttentionBlock(64, 2)
    x = torch.randn(3, 5, 64) * 2
    plain = block.mlp(x)  # c_fc, QuickGELU (x * sigmoid(1.702 x)), c_proj
    with torch.no_grad():
        torch.testing.assert_close(feed_forward(block.mlp, x), plain.detach(), rtol=1e-5, atol=1e-6)
        names = [name for name, _ in ops(lambda: feed_forward(block.mlp, x))]
    assert "aten::silu_" in names and "aten::sigmoid" not in names and "aten::mul" not in names
    with torch.no_grad():  # the blocks of CLIP and of DGL's vision tower compute it so
        for names in ([n for n, _ in ops(lambda: block(x))], [n for n, _ in ops(lambda: global_local_block(block, x, 1, 2))]):
            assert "aten::silu_" in names and "aten::sigmoid" not in names
    # with gradients: the same values and the same gradients of the input and the weights
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(3, 5, 64)
    ga = torch.autograd.grad(block.mlp(xa), [xa, block.mlp.c_fc.weight, block.mlp.c_proj.bias], grad)
    gb = torch.autograd.grad(feed_forward(block.mlp, xb), [xb, block.mlp.c_fc.weight, block.mlp.c_proj.bias], grad)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert isinstance(block.mlp.gelu, QuickGELU)  # the parameters and their names stay CLIP's


def test_local_keys_and_values_are_copied_once():
    """Each frame's keys and values ([global tokens, the frame's tokens]) are built by one concatenation of
    strided views: no copy of the frame tokens' keys or values (only the queries' one) and none of the
    global tokens' before it."""
    torch.manual_seed(0)
    B, G, T, L, W, H = 2, 3, 4, 5, 64, 2
    block = ResidualAttentionBlock(W, H)
    x = torch.randn(B, G + T * L, W)
    with torch.no_grad():
        events = ops(lambda: global_local_block(block, x, G, T))
    # a reshape that cannot be a view copies (aten::clone); the concatenation itself is aten::cat
    frame_copies = [s for name, s in events if name == "aten::clone" and s[0] == [B, T, H, L, W // H]]
    global_copies = [s for name, s in events if name == "aten::clone" and s[0] == [B, T, H, G, W // H]]
    assert len(frame_copies) == 1 and not global_copies, (frame_copies, global_copies)
