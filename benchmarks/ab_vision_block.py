"""Interleaved A/B of the vision block's elementwise and layout variants (docs/library-speed.md), fp32, at the
bench_model.py shape: every variant's block is written here (old: the code before the changes) and patched
in turn over one model; each variant's results are checked against the first's.

    python benchmarks/ab_vision_block.py --mode eval --rounds 7 --variants old,kv,kv+out,kv+fold,kv+resid
    python benchmarks/ab_vision_block.py --mode train --rounds 5 --variants old,kv,kv+fold,kv+resid
"""
import sys, os, argparse, statistics, time
import torch
import torch.nn.functional as F
sys.path.insert(0, os.getcwd())
from benchmarks.bench_model import build, inputs
import modules.dgl as dgl


def linear_plus(x, lin, h):
    """x + lin(h): the residual as addmm's accumulator (bias added to x first, no copy of the bias)."""
    W = x.shape[-1]
    acc = x + lin.bias
    return acc.view(-1, W).addmm_(h.reshape(-1, h.shape[-1]), lin.weight.t()).view(x.shape)


SCALE = 1.702
import modules.clip as clip


def orig_block_forward(self, x, causal=False):  # the plain block: x + mlp(ln_2(x)) with QuickGELU's three passes
    x = x + self.attn(self.ln_1(x), causal=causal)
    return x + self.mlp(self.ln_2(x))


def feed_forward(mlp, h):
    fc, proj = mlp.c_fc, mlp.c_proj
    shape = h.shape
    z = torch.addmm(fc.bias, h.reshape(-1, shape[-1]), fc.weight.t(), beta=SCALE, alpha=SCALE)
    z = F.silu(z, inplace=not torch.is_grad_enabled())
    return torch.addmm(proj.bias, z, proj.weight.t(), alpha=1 / SCALE).view(*shape[:-1], -1)


def block_forward_fold(self, x, causal=False):
    x = x + self.attn(self.ln_1(x), causal=causal)
    return x + feed_forward(self.mlp, self.ln_2(x))


def make(kv: bool, out_once: bool, resid: bool, fold: bool = False):
    clip.ResidualAttentionBlock.forward = block_forward_fold if fold else orig_block_forward

    def gl(block, x, num_global, num_frames, key_padding_mask=None):
        attn = block.attn
        B, length, W = x.shape
        G, T = num_global, num_frames
        L = (length - G) // T
        H, d = attn.heads, W // attn.heads
        q, k, v = attn.qkv(block.ln_1(x))
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        out_global = (F.scaled_dot_product_attention(q[:, :, :G], k, v, attn_mask=mask) if G else q[:, :, :0])

        def frames5(t):
            return t[:, :, G:].unflatten(2, (T, L)).transpose(1, 2)
        if kv:
            def with_globals(t):
                return torch.cat([t[:, :, :G].unsqueeze(1).expand(B, T, H, G, d), frames5(t)], dim=3).view(B * T, H, G + L, d)
        else:
            def with_globals(t):
                glob = t[:, :, :G].unsqueeze(1).expand(B, T, H, G, d).reshape(B * T, H, G, d)
                return torch.cat([glob, frames5(t).reshape(B * T, H, L, d)], dim=2)
        out_local = F.scaled_dot_product_attention(frames5(q).reshape(B * T, H, L, d), with_globals(k), with_globals(v))
        out_local = out_local.view(B, T, H, L, d)
        if out_once and not torch.is_grad_enabled():
            out = x.new_empty(B, length, H, d)
            out[:, :G] = out_global.transpose(1, 2)
            out[:, G:].view(B, T, L, H, d).copy_(out_local.permute(0, 1, 3, 2, 4))
            out = out.view(B, length, W)
        else:
            out = torch.cat([out_global.transpose(1, 2), out_local.permute(0, 1, 3, 2, 4).reshape(B, T * L, H, d)],
                            dim=1).reshape(B, length, W)
        if resid:
            x = linear_plus(x, attn.out_proj, out)
            mlp = block.mlp
            return linear_plus(x, mlp.c_proj, mlp.gelu(mlp.c_fc(block.ln_2(x))))
        x = x + attn.out_proj(out)
        h = block.ln_2(x)
        return x + (feed_forward(block.mlp, h) if fold else block.mlp(h))
    return gl


VARIANTS = {"old": (False, False, False), "kv": (True, False, False), "kv+out": (True, True, False),
            "kv+resid": (True, False, True), "kv+fold": (True, False, False, True)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--mode", default="eval")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="old,kv,kv+out,kv+resid")
    a = p.parse_args()
    args = argparse.Namespace(layers=a.layers, batch=2, frames=12, resolution=224, patch=32, latent="linear",
                              device="cpu", precision="fp32")
    torch.set_num_threads(a.threads)
    model = build(args)
    ids, video, mask = inputs(args)
    params = [q for _, q in model.trainable_parameters()]
    names = a.variants.split(",")

    def run():
        if a.mode == "eval":
            model.eval()
            with torch.no_grad():
                return model.encode_video(video, mask)
        model.train()
        return torch.autograd.grad(model(ids, video, mask)["loss"], params)

    ref = None
    for n in names:
        dgl.global_local_block = make(*VARIANTS[n])
        out = run()
        out = out if isinstance(out, torch.Tensor) else torch.cat([g.flatten() for g in out])
        ref = out if ref is None else ref
        print(f"{n}: max relative difference to {names[0]} {((out - ref).abs().max() / ref.abs().max()).item():.2e}", flush=True)
    times = {n: [] for n in names}
    for r in range(a.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            dgl.global_local_block = make(*VARIANTS[n])
            t = time.perf_counter(); run(); times[n].append(time.perf_counter() - t)
        print("round", r, {n: round(times[n][-1], 3) for n in names}, flush=True)
    base = statistics.median(times[names[0]])
    for n in names:
        ratios = [b / x for b, x in zip(times[names[0]], times[n])]
        print(f"{a.mode} {n}: median {statistics.median(times[n]):.3f} s, {names[0]}/{n} = {base / statistics.median(times[n]):.3f} "
              f"(per-round ratios: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
