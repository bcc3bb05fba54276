"""A DDPM/ADM-style UNet that maps ``(z_t, t) -> eps_hat``.

It knows nothing of the DCT or the schedule (the engine does): residual blocks with
GroupNorm + SiLU and a time embedding, dropout, self-attention at chosen resolutions,
a sinusoidal embedding of continuous ``t`` in [0, 1] (Ho et al. 2020; Dhariwal & Nichol 2021).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

__all__ = ["UNet", "build_model", "count_parameters"]


def group_norm_nhwc(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.group_norm`` in float32 that keeps a channels_last ``x`` channels_last (views, no layout copy).

    PyTorch's CUDA group norm makes its input NCHW-contiguous and returns NCHW, so in a channels_last network every
    norm costs layout copies forward and backward, and the next convolution copies back: on an H200 these copies
    were 30% of the cifar10 preset's training step (docs/benchmarks.md, GPU). An N, C, H, W tensor with channels_last
    strides views as N, G, C/G, H, W (the channel stride is 1), so statistics and the affine map run in place."""
    n, c, h, w = x.shape
    xg = x.float().view(n, groups, c // groups, h, w)
    var, mean = torch.var_mean(xg, dim=(2, 3, 4), correction=0, keepdim=True)
    scale = torch.rsqrt(var + eps) * weight.float().view(1, groups, c // groups, 1, 1)
    return torch.addcmul(bias.float().view(1, groups, c // groups, 1, 1) - mean * scale, xg, scale).view(n, c, h, w)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, float32 statistics as under autocast) that, compiled on CUDA with a
    channels_last input, runs :func:`group_norm_nhwc`, which inductor fuses into a few kernels without layout copies.
    Eager, PyTorch's own kernel stays: the form's extra launches cost more than the copies when the host is the
    bottleneck (H200, 2026-11-27: 1,253 img/s eager with it, 1,633 without; 5,516 compiled with CUDA graphs).
    The CPU kernel keeps channels_last by itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.compiler.is_compiling() and x.is_cuda and self.affine and x.dim() == 4
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
            return group_norm_nhwc(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def _norm(ch: int) -> GroupNorm:
    return GroupNorm(math.gcd(32, ch), ch)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialised output layers make every residual block start as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of continuous t in [0, 1], scaled by 1000 to match DDPM's integer steps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2, self.dropout = _norm(cout), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm, self.qkv, self.proj = _norm(ch), nn.Conv2d(ch, 3 * ch, 1), _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Tokens as [b, hw, 3c]: a view of a channels_last tensor (a copy of an NCHW one); channels split (3, heads, d)
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).reshape(b, h * w, 3, self.heads, c // self.heads)
        a = F.scaled_dot_product_attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0))  # [b, heads, hw, c/heads]
        # back to [b, c, h, w] with channels_last strides (a view of [b, hw, c])
        return x + self.proj(a.transpose(1, 2).reshape(b, h * w, c).transpose(1, 2).unflatten(2, (h, w)))


class UNet(nn.Module):
    """``forward(z [B, C, H, W], t [B]) -> eps_hat [B, C, H, W]``; H and W divisible by 2^(levels-1)."""

    def __init__(self, in_channels: int, resolution: int, cfg: ModelConfig):
        super().__init__()
        ch, mult = cfg.channels, cfg.channel_mult
        if any(ch * m % cfg.num_heads for m in mult):
            raise ValueError(f"model.num_heads={cfg.num_heads} must divide every level's width")
        temb = 4 * ch
        self.ch, self.levels = ch, len(mult)
        self.resolutions = tuple(resolution >> level for level in range(len(mult)))  # each level's feature map size
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        def block(cin: int, cout: int, res: int) -> nn.ModuleList:
            layers = [ResBlock(cin, cout, temb, cfg.dropout)]
            if res in cfg.attn_resolutions:
                layers.append(AttnBlock(cout, cfg.num_heads))
            return nn.ModuleList(layers)

        self.down, skips, cur, res = nn.ModuleList(), [ch], ch, resolution
        for level, m in enumerate(mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(cur, ch * m, res))
                cur = ch * m
                skips.append(cur)
            if level < len(mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(cur, cur, temb, cfg.dropout), AttnBlock(cur, cfg.num_heads), ResBlock(cur, cur, temb, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(block(cur + skips.pop(), ch * m, res))
                cur = ch * m
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cur, cur, 3, padding=1)]))
                res *= 2
        self.out = nn.Sequential(_norm(cur), nn.SiLU(), _zero(nn.Conv2d(cur, in_channels, 3, padding=1)))

    @staticmethod
    def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.temb(timestep_embedding(t, self.ch).to(z.dtype if z.is_floating_point() else torch.float32))
        h = self.conv_in(z)
        hs = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for layers in self.up:
            if isinstance(layers[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(layers, h, emb)
        return self.out(h)


def build_model(cfg, in_channels: int | None = None) -> UNet:
    """The UNet of a full :class:`~bdm_cli.config.Config`."""
    return UNet(in_channels or cfg.data.channels, cfg.data.resolution, cfg.model)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
