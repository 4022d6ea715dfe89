"""Transformer-era models for tests, written the way ViT, Swin and ConvNeXt write them.

Every builder seeds torch and returns a fresh, fx-traceable model in eval mode, with LayerNorm
affines, layer scales, tokens and position biases far from their identity init, so every op
matters to the numbers. ``TRANSFORMER_ZOO`` maps a name to ``(builder, input_shape)`` for the
tiny models (1x3x32x32); ``TRANSFORMER_FULL`` does the same for full-size replicas of
torchvision's vit_b_16, swin_t and convnext_tiny (1x3x224x224, 1000 classes, torchvision's
parameter counts; build them on the meta device to count, they take seconds to run).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _init_weights(model: nn.Module) -> nn.Module:
    """Non-trivial LayerNorm affines and layer-scale/token/bias parameters; puts the model in eval."""
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, LayerNorm2d)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            nn.init.uniform_(p, 0.5, 1.5)
        elif name.endswith(("token", "pos_embed", "bias_table")):
            nn.init.normal_(p, std=0.5)
    return model.eval()


class Mlp(nn.Module):
    """Linear -> GELU (erf, the default) -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# -------------------------------------------------------------------------------- ViT

class MHABlock(nn.Module):
    """torchvision's ViT encoder block: pre-norm nn.MultiheadAttention, pre-norm MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class Attention(nn.Module):
    """timm's ViT attention: one qkv Linear, heads split by reshape/permute, then
    ``F.scaled_dot_product_attention`` (fused) or softmax(q @ k^T * scale) @ v."""

    def __init__(self, dim: int, heads: int, fused: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.fused = heads, dim // heads, fused
        self.scale = self.head_dim ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TimmBlock(nn.Module):
    def __init__(self, dim: int, heads: int, fused: bool):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, fused)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch-embed conv, cls token, position embedding, encoder blocks, LayerNorm, head on cls."""

    def __init__(self, blocks: list[nn.Module], dim: int, patch: int, tokens: int, num_classes: int,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(num_classes: int = 10, *, seed: int = 0) -> ViT:
    """ViT, dim 64, 4x4 patches (64 tokens + cls): an nn.MultiheadAttention block (torchvision)
    and a qkv-Linear block with F.scaled_dot_product_attention (timm)."""
    torch.manual_seed(seed)
    dim, heads = 64, 4
    blocks = [MHABlock(dim, heads), TimmBlock(dim, heads, fused=True)]
    return _init_weights(ViT(blocks, dim, 4, 64, num_classes))


def vit_b_16(num_classes: int = 1000, *, seed: int = 0) -> ViT:
    """torchvision's ViT-B/16: 16x16 patches (196 tokens + cls), 12 nn.MultiheadAttention blocks of dim 768,
    12 heads, MLP 3072, LayerNorms with eps 1e-6; 86,567,656 parameters."""
    torch.manual_seed(seed)
    dim, heads = 768, 12
    return _init_weights(ViT([MHABlock(dim, heads) for _ in range(12)], dim, 16, 196, num_classes, norm_eps=1e-6))


# ------------------------------------------------------------------------------- Swin

def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, ws, ws, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """(B * windows, ws, ws, C) -> (B, H, W, C)."""
    B = windows.shape[0] // (H * W // ws // ws)
    x = windows.view(B, H // ws, W // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


class WindowAttention(nn.Module):
    """Swin's window attention: softmax(q*scale @ k^T + relative position bias [+ shift mask]) @ v."""

    def __init__(self, dim: int, ws: int, heads: int):
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1])
        self.qkv, self.proj, self.softmax = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Softmax(-1)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        x = (self.softmax(attn) @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj(x)


def _shift_mask(H: int, W: int, ws: int, shift: int) -> torch.Tensor:
    """Swin's (windows, ws*ws, ws*ws) mask: -100 between tokens from different regions."""
    img = torch.zeros(1, H, W, 1)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for i, (h, w) in enumerate((h, w) for h in cuts for w in cuts):
        img[:, h, w, :] = i
    windows = window_partition(img, ws).view(-1, ws * ws)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0)


class SwinBlock(nn.Module):
    """(Shifted) window attention block on (B, H*W, C) tokens; torch.roll for the shift."""

    def __init__(self, dim: int, resolution: int, heads: int, ws: int, shift: int):
        super().__init__()
        self.resolution, self.ws, self.shift = resolution, ws, shift
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, ws, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)
        self.register_buffer("attn_mask", _shift_mask(resolution, resolution, ws, shift) if shift else None)

    def forward(self, x):
        H = W = self.resolution
        B, L, C = x.shape
        y = self.norm1(x).view(B, H, W, C)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(y, self.ws).view(-1, self.ws * self.ws, C)
        windows = self.attn(windows, mask=self.attn_mask).view(-1, self.ws, self.ws, C)
        y = window_reverse(windows, self.ws, H, W)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.view(B, H * W, C)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (strided slices), LayerNorm, Linear 4C -> 2C."""

    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        H = W = self.resolution
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :], x[:, 0::2, 1::2, :],
                       x[:, 1::2, 1::2, :]], -1).view(B, -1, 4 * C)
        return self.reduction(self.norm(x))


def _stage_names(stages: int, between: str) -> list[tuple[str, str | None]]:
    """(stage, module after it) names of a ``stages``-stage model: ``stage1, {between}, stage2, {between}2, ...,
    stageN, None`` (the first ``between`` unnumbered, as the two-stage models have always named it)."""
    return [(f"stage{i}", f"{between}{i if i > 1 else ''}" if i < stages else None) for i in range(1, stages + 1)]


class Swin(nn.Module):
    """``patch`` x ``patch`` conv embed + LayerNorm, stages of blocks (``heads[i]`` heads) alternating regular and
    shifted windows (no shift where one window covers the feature map, as torchvision) with patch merging between
    (dim doubles, resolution halves), LayerNorm, token mean, head. Stages are ``stage1, stage2, ...``, merges
    ``merge, merge2, ...``."""

    def __init__(self, dim: int, resolution: int, heads: tuple[int, ...], depths: tuple[int, ...],
                 ws: int, num_classes: int, patch: int = 2):
        super().__init__()
        self.patch_embed, self.patch_norm = nn.Conv2d(3, dim, patch, patch), nn.LayerNorm(dim)
        names = _stage_names(len(depths), "merge")
        self.order = [name for pair in names for name in pair if name]     # forward order
        for i, (stage, merge) in enumerate(names):
            shift = ws // 2 if resolution > ws else 0
            setattr(self, stage, nn.Sequential(*[SwinBlock(dim, resolution, heads[i], ws, j % 2 * shift)
                                                 for j in range(depths[i])]))
            if merge:
                setattr(self, merge, PatchMerging(dim, resolution))
                dim, resolution = 2 * dim, resolution // 2
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_norm(self.patch_embed(x).flatten(2).transpose(1, 2))
        for name in self.order:
            x = getattr(self, name)(x)
        return self.head(self.norm(x).mean(1))


def swin_tiny(num_classes: int = 10, *, seed: int = 0, depths: tuple[int, int] = (2, 1)) -> Swin:
    """Swin, dim 24 -> 48, 4x4 windows shifted by 2, tokens 16x16 -> 8x8."""
    torch.manual_seed(seed)
    return _init_weights(Swin(24, 16, (2, 4), depths, 4, num_classes))


def swin_t(num_classes: int = 1000, *, seed: int = 0) -> Swin:
    """torchvision's Swin-T: 4x4 patches, dims 96/192/384/768, depths 2/2/6/2, heads 3/6/12/24, 7x7 windows
    shifted by 3 on every second block (not in the last stage, whose 7x7 map is one window), tokens 56x56 -> 7x7;
    28,288,354 parameters."""
    torch.manual_seed(seed)
    return _init_weights(Swin(96, 56, (3, 6, 12, 24), (2, 2, 6, 2), 7, num_classes, patch=4))


# --------------------------------------------------------------------------- ConvNeXt

class LayerNorm2d(nn.Module):
    """ConvNeXt's channels_first LayerNorm: mean and variance over dim 1 of (N, C, H, W)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PermutedLayerNorm(nn.Module):
    """timm's channel LayerNorm: permute to NHWC, nn.LayerNorm, permute back."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, channels-last LayerNorm + Linear MLP (GELU), layer scale, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.mlp(y)
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """4x4 stem + LayerNorm2d, stages of blocks, downsampling by channel LayerNorm + 2x2 conv,
    global mean, LayerNorm, head. Stages are ``stage1, stage2, ...``, downsamplings ``downsample, downsample2, ...``."""

    def __init__(self, dims: tuple[int, ...], depths: tuple[int, ...], num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))
        names = _stage_names(len(depths), "downsample")
        self.order = [name for pair in names for name in pair if name]     # forward order
        for i, (stage, downsample) in enumerate(names):
            setattr(self, stage, nn.Sequential(*[ConvNeXtBlock(dims[i]) for _ in range(depths[i])]))
            if downsample:
                setattr(self, downsample, nn.Sequential(PermutedLayerNorm(dims[i]),
                                                        nn.Conv2d(dims[i], dims[i + 1], 2, 2)))
        self.norm, self.head = nn.LayerNorm(dims[-1], eps=1e-6), nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = self.stem(x)
        for name in self.order:
            x = getattr(self, name)(x)
        return self.head(self.norm(x.mean([-2, -1])))


def convnext_tiny(num_classes: int = 10, *, seed: int = 0, depths: tuple[int, int] = (1, 2)) -> ConvNeXt:
    """ConvNeXt, dims 32 -> 64, feature maps 8x8 -> 4x4."""
    torch.manual_seed(seed)
    return _init_weights(ConvNeXt((32, 64), depths, num_classes))


def convnext_t(num_classes: int = 1000, *, seed: int = 0) -> ConvNeXt:
    """torchvision's ConvNeXt-Tiny: dims 96/192/384/768, depths 3/3/9/3, feature maps 56x56 -> 7x7;
    28,589,128 parameters."""
    torch.manual_seed(seed)
    return _init_weights(ConvNeXt((96, 192, 384, 768), (3, 3, 9, 3), num_classes))


TRANSFORMER_ZOO = {
    "vit_tiny": (vit_tiny, (1, 3, 32, 32)),
    "swin_tiny": (swin_tiny, (1, 3, 32, 32)),
    "convnext_tiny": (convnext_tiny, (1, 3, 32, 32)),
}

TRANSFORMER_FULL = {
    "vit": (vit_b_16, (1, 3, 224, 224)),
    "swin": (swin_t, (1, 3, 224, 224)),
    "convnext": (convnext_t, (1, 3, 224, 224)),
}
