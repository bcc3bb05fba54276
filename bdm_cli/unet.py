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


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch)


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
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c/heads]
        return x + self.proj(a.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """``forward(z [B, C, H, W], t [B]) -> eps_hat [B, C, H, W]``; H and W divisible by 2^(levels-1)."""

    def __init__(self, in_channels: int, resolution: int, cfg: ModelConfig):
        super().__init__()
        ch, mult = cfg.channels, cfg.channel_mult
        if any(ch * m % cfg.num_heads for m in mult):
            raise ValueError(f"model.num_heads={cfg.num_heads} must divide every level's width")
        temb = 4 * ch
        self.ch, self.levels = ch, len(mult)
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
