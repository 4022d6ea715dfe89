"""Tiny models for the channel-pruning pass, one channel-coupling pattern each.

Each model is written the way the codebase it copies writes it (torchvision, timm, the
ShuffleNet and DenseNet papers' reference code), so the dependency analysis meets the real
idioms: ``x.size()`` unpacking, ``chunk``/``split`` unpacking, hard-coded view sizes,
permutes around LayerNorm, and so on. Every builder takes ``seed``, returns a fresh
fx-traceable model in eval mode with non-trivial BatchNorm statistics and norm affines,
and runs in milliseconds. ``PRUNE_ZOO`` maps a name to ``(builder, input_shape)``;
``example_input(name)`` builds the matching input.
"""
from __future__ import annotations

import torch
from torch import nn

if __package__:
    from .cnn import InvertedResidual, ResNet, _conv_bn, _init_weights
    from .transformers import Attention, ConvNeXtBlock, MHABlock, TimmBlock
    from .transformers import _init_weights as _init_layer_norms
else:   # loaded from its path (graphopt run tests/zoo/prune.py:residual), which puts tests/zoo/ on sys.path
    from cnn import InvertedResidual, ResNet, _conv_bn, _init_weights
    from transformers import Attention, ConvNeXtBlock, MHABlock, TimmBlock
    from transformers import _init_weights as _init_layer_norms

NUM_CLASSES = 10
VOCAB = 100


def _init(model: nn.Module) -> nn.Module:
    """Conv/Linear/BN init, then non-trivial LayerNorm, GroupNorm and layer-scale params; eval."""
    _init_layer_norms(_init_weights(model))
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(*_conv_bn(cin, cout, k, stride), nn.ReLU())


def _head(cin: int) -> nn.Sequential:
    """Global average pool, flatten, ``Linear(cin, 10)``."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, NUM_CLASSES))


# --------------------------------------------------------------------------- residual

def residual(*, seed: int = 0) -> ResNet:
    """``add`` couples the residual stream: a torchvision BasicBlock with an identity shortcut
    (16 ch), then one with a strided 1x1-conv+BN downsample shortcut (16 -> 32 ch)."""
    torch.manual_seed(seed)
    return _init(ResNet([(16, 1, 1), (32, 1, 2)], NUM_CLASSES, 16, imagenet_stem=False))


# ---------------------------------------------------------------- depthwise separable

def depthwise_separable(*, seed: int = 0) -> nn.Sequential:
    """Depthwise convs tie their input and output channels: torchvision's InvertedResidual
    (1x1 expand, 3x3 depthwise, 1x1 project) with and without the residual add, then a
    depthwise conv with channel multiplier 2 (groups=24, 24 -> 48 ch)."""
    torch.manual_seed(seed)
    return _init(nn.Sequential(
        *_conv_bn(3, 16, 3), nn.ReLU6(),
        InvertedResidual(16, 16, stride=1, expand=4),
        InvertedResidual(16, 24, stride=2, expand=4),
        *_conv_bn(24, 48, 3, groups=24), nn.ReLU6(),
        _head(48)))


# ----------------------------------------------------------------- squeeze-excitation

class SqueezeExcitation(nn.Module):
    """torchvision's SE: avgpool, 1x1 reduce, ReLU, 1x1 expand, gate, ``scale * input``."""

    def __init__(self, channels: int, squeeze: int, gate: type[nn.Module] = nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = nn.ReLU(), gate()

    def forward(self, x):
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


def squeeze_excitation(*, seed: int = 0) -> nn.Sequential:
    """The SE multiply couples the gate's channels to the trunk's: two conv+BN+ReLU layers
    (32 ch), each followed by SE (reduce to 8), one gated by sigmoid, one by hardsigmoid."""
    torch.manual_seed(seed)
    return _init(nn.Sequential(
        _conv_bn_relu(3, 32, 3), SqueezeExcitation(32, 8, nn.Sigmoid),
        _conv_bn_relu(32, 32, 3), SqueezeExcitation(32, 8, nn.Hardsigmoid),
        _head(32)))


# -------------------------------------------------------------------- channel shuffle

def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's shuffle, sizes read from ``x.size()``."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit. Stride 1: ``x.chunk(2, dim=1)``, convolve one half, ``torch.cat``.
    Stride 2: both branches convolve the whole input. Then a 2-group channel shuffle, from
    ``x.size()``, or with the hard-coded NCHW ``static_shape`` when given."""

    def __init__(self, cin: int, cout: int, stride: int,
                 static_shape: tuple[int, int, int, int] | None = None):
        super().__init__()
        self.stride, self.static_shape = stride, static_shape
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(*_conv_bn(cin, cin, 3, stride, groups=cin),
                                         _conv_bn_relu(cin, half, 1))
        self.branch2 = nn.Sequential(_conv_bn_relu(cin if stride > 1 else half, half, 1),
                                     *_conv_bn(half, half, 3, stride, groups=half),
                                     _conv_bn_relu(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        if self.static_shape is None:
            return channel_shuffle(out, 2)
        n, c, h, w = self.static_shape
        out = out.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous()
        return out.view(n, c, h, w)


def channel_shuffle_net(*, seed: int = 0) -> nn.Sequential:
    """Split, cat and shuffle permute channels across branches: a strided unit (16 -> 32 ch,
    16x16 -> 8x8) and a chunk unit shuffling from ``x.size()``, then a chunk unit shuffling
    with hard-coded sizes ``view(1, 2, 16, 8, 8)`` / ``view(1, 32, 8, 8)``."""
    torch.manual_seed(seed)
    return _init(nn.Sequential(
        _conv_bn_relu(3, 16, 3),
        ShuffleUnit(16, 32, stride=2), ShuffleUnit(32, 32, stride=1),
        ShuffleUnit(32, 32, stride=1, static_shape=(1, 32, 8, 8)),
        _head(32)))


# ----------------------------------------------------------------------- dense concat

class DenseBlock(nn.Module):
    """DenseNet block of pre-activation bottleneck layers (BN, ReLU, 1x1, BN, ReLU, 3x3);
    each layer's ``growth`` new channels are appended with ``torch.cat([x, new], 1)``."""

    def __init__(self, cin: int, layers: int, growth: int, bottleneck: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(
            nn.BatchNorm2d(cin + i * growth), nn.ReLU(),
            nn.Conv2d(cin + i * growth, bottleneck, 1, bias=False),
            nn.BatchNorm2d(bottleneck), nn.ReLU(),
            nn.Conv2d(bottleneck, growth, 3, padding=1, bias=False)) for i in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


def dense_concat(*, seed: int = 0) -> nn.Sequential:
    """Concat makes every layer's channels a slice of every later layer's input: stem
    (16 ch), dense block of 3 layers growing by 8 (-> 40 ch), transition BN+ReLU+1x1
    (40 -> 24) + 2x2 avgpool, final BN+ReLU."""
    torch.manual_seed(seed)
    return _init(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        DenseBlock(16, layers=3, growth=8, bottleneck=16),
        nn.BatchNorm2d(40), nn.ReLU(), nn.Conv2d(40, 24, 1, bias=False), nn.AvgPool2d(2),
        nn.BatchNorm2d(24), nn.ReLU(),
        _head(24)))


# -------------------------------------------------------------------------- inception

class Inception(nn.Module):
    """GoogLeNet block: 1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 maxpool -> 1x1; concatenated."""

    def __init__(self, cin: int, ch1x1: int, ch3x3: tuple[int, int], ch5x5: tuple[int, int],
                 pool_proj: int):
        super().__init__()
        self.branch1 = _conv_bn_relu(cin, ch1x1, 1)
        self.branch2 = nn.Sequential(_conv_bn_relu(cin, ch3x3[0], 1),
                                     _conv_bn_relu(ch3x3[0], ch3x3[1], 3))
        self.branch3 = nn.Sequential(_conv_bn_relu(cin, ch5x5[0], 1),
                                     _conv_bn_relu(ch5x5[0], ch5x5[1], 5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
                                     _conv_bn_relu(cin, pool_proj, 1))

    def forward(self, x):
        outputs = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(outputs, 1)


def inception(*, seed: int = 0) -> nn.Sequential:
    """Four branches of one input concatenated (8 + 16 + 8 + 8 = 40 ch), then a 3x3 conv
    consuming the concat (40 -> 32)."""
    torch.manual_seed(seed)
    return _init(nn.Sequential(_conv_bn_relu(3, 16, 3), Inception(16, 8, (8, 16), (8, 8), 8),
                               _conv_bn_relu(40, 32, 3), _head(32)))


# ------------------------------------------------------------------------- group conv

def group_conv(*, seed: int = 0) -> nn.Sequential:
    """Groups tie channels in blocks of 8: ResNeXt's 1x1 (16 -> 32), grouped 3x3 (groups=4,
    32 -> 32) normalised by GroupNorm(4, 32), 1x1 (32 -> 32)."""
    torch.manual_seed(seed)
    return _init(nn.Sequential(
        _conv_bn_relu(3, 16, 3), _conv_bn_relu(16, 32, 1),
        nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False), nn.GroupNorm(4, 32), nn.ReLU(),
        _conv_bn_relu(32, 32, 1),
        _head(32)))


# ------------------------------------------------------------------ layernorm permute

def layernorm_permute(*, seed: int = 0) -> nn.Sequential:
    """Channels move to the last dim and back: a 2x2 patchify conv (3 -> 32), then the
    ConvNeXt block (7x7 depthwise, permute(0, 2, 3, 1), LayerNorm(32), Linear(32, 128),
    GELU, Linear(128, 32), layer scale, permute(0, 3, 1, 2), residual add)."""
    torch.manual_seed(seed)
    return _init(nn.Sequential(nn.Conv2d(3, 32, 2, 2), ConvNeXtBlock(32), _head(32)))


# -------------------------------------------------------------------------- attention

class IndexedQkvAttention(Attention):
    """Older timm ViT attention: ``q, k, v = qkv[0], qkv[1], qkv[2]``, softmax((q * scale)
    @ k^T) @ v, heads merged by transpose(1, 2).reshape(B, N, C)."""

    def __init__(self, dim: int, heads: int):
        super().__init__(dim, heads, fused=False)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Transformer(nn.Module):
    """Pre-norm blocks on (N, T, C) tokens, final LayerNorm, mean over tokens, Linear head."""

    def __init__(self, blocks: list[nn.Module], dim: int):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.norm(self.blocks(x)).mean(1))


def attention(*, seed: int = 0) -> Transformer:
    """Heads split the embedding into coupled slices: a timm block (qkv Linear(32, 96),
    4 heads of 8, indexed q/k/v) and a torchvision block (nn.MultiheadAttention,
    batch_first), each with a residual Linear-GELU-Linear MLP, on 1x8x32 tokens."""
    torch.manual_seed(seed)
    timm_block = TimmBlock(32, 4, fused=False)
    timm_block.attn = IndexedQkvAttention(32, 4)
    return _init(Transformer([timm_block, MHABlock(32, 4)], 32))


class ShapeScaledAttention(nn.Module):
    """Attention written out by hand: width, head size and scale all read from the input's shape,
    ``(C // heads) ** -0.5``; no residual, so C itself is prunable."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        scale = (C // self.heads) ** -0.5
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class TokenMeanHead(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(16, dim), ShapeScaledAttention(dim, 4), nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.attn(self.embed(x)).mean(1))


def shape_scaled_attention(*, seed: int = 0) -> TokenMeanHead:
    """Linear(16, 32) embedding -> hand-written 4-head attention -> mean over tokens -> head, on 1x8x16."""
    torch.manual_seed(seed)
    return _init(TokenMeanHead(32))


# --------------------------------------------------------------------- flatten linear

class FlattenLinear(nn.Module):
    """VGG-style classifier: features, ``torch.flatten(x, 1)``, Linear, ReLU, Linear."""

    def __init__(self, channels: int, hw: int, hidden: int):
        super().__init__()
        self.features = nn.Sequential(_conv_bn_relu(3, channels, 3), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(channels * hw * hw, hidden), nn.ReLU(),
                                        nn.Linear(hidden, NUM_CLASSES))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def flatten_linear(*, seed: int = 0) -> FlattenLinear:
    """Flatten turns each conv channel into 64 consecutive Linear inputs: conv+BN+ReLU
    (3 -> 16), 2x2 maxpool to 8x8, Linear(16*8*8, 32), ReLU, Linear(32, 10)."""
    torch.manual_seed(seed)
    return _init(FlattenLinear(16, 8, 32))


# -------------------------------------------------------------------- hardcoded split

class HardcodedSplit(nn.Module):
    """Channel counts written as literals: ``torch.split(x, [16, 32], dim=1)``, a branch per
    piece, ``torch.cat``, then ``x.view(x.size(0), 48, -1).mean(2)`` and a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn_relu(3, 48, 3)
        self.branch_a, self.branch_b = _conv_bn_relu(16, 16, 3), _conv_bn_relu(32, 32, 1)
        self.fc = nn.Linear(48, NUM_CLASSES)

    def forward(self, x):
        a, b = torch.split(self.stem(x), [16, 32], dim=1)
        x = torch.cat([self.branch_a(a), self.branch_b(b)], 1)
        return self.fc(x.view(x.size(0), 48, -1).mean(2))


def hardcoded_split(*, seed: int = 0) -> HardcodedSplit:
    """Split sizes and a view's channel count are constants a pruner must rewrite (48 ch)."""
    torch.manual_seed(seed)
    return _init(HardcodedSplit())


# -------------------------------------------------------------------------- embedding

class TokenClassifier(nn.Module):
    """Embedding of int64 ids, Linear, ReLU, mean over tokens, Linear head."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc, self.act, self.head = nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, NUM_CLASSES)

    def forward(self, ids):
        return self.head(self.act(self.fc(self.embed(ids))).mean(1))


def embedding(*, seed: int = 0) -> TokenClassifier:
    """An embedding table's columns are output channels (Embedding(100, 32)); input 1x8 int64."""
    torch.manual_seed(seed)
    return _init(TokenClassifier(VOCAB, 32))


# --------------------------------------------------------------------- conv transpose

def conv_transpose(*, seed: int = 0) -> nn.Sequential:
    """ConvTranspose2d weights are (in, out, kH, kW), transposed from Conv2d: a strided conv
    (3 -> 16, 16x16 -> 8x8), ReLU, ConvTranspose2d(16, 16, 2, stride 2) back to 16x16, BN,
    ReLU, 3x3 conv head (16 -> 3); output 1x3x16x16."""
    torch.manual_seed(seed)
    return _init(nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(16, 16, 2, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 3, 3, padding=1)))


# ------------------------------------------------------------------------- unknown op

class ChannelRoll(nn.Module):
    """``torch.roll(x, 1, dims=1)``: a channel permutation that looks element-wise."""

    def forward(self, x):
        return torch.roll(x, 1, dims=1)


class ChannelCumsum(nn.Module):
    """``torch.cumsum(x, dim=1)``: mixes every channel into the ones after it."""

    def forward(self, x):
        return torch.cumsum(x, dim=1)


def unknown_op(*, seed: int = 0) -> nn.Sequential:
    """Channel-mixing ops between convs: conv (3 -> 16), roll over channels, conv (16 -> 16),
    cumsum over channels (an op with no channel rule), conv (16 -> 32). Only the last conv's
    output is safe to prune; a naive pruner that passes channels through them gets wrong
    numbers."""
    torch.manual_seed(seed)
    return _init(nn.Sequential(
        _conv_bn_relu(3, 16, 3), ChannelRoll(), _conv_bn_relu(16, 16, 3), ChannelCumsum(),
        _conv_bn_relu(16, 32, 3), _head(32)))


# -------------------------------------------------------------------------- big graph

class MBConvSE(nn.Module):
    """MobileNetV3 block: 1x1 expand, 3x3 depthwise, SE (hardsigmoid), 1x1 project,
    residual add when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            *_conv_bn(cin, hidden, 1), nn.Hardswish(),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.Hardswish(),
            SqueezeExcitation(hidden, 8, nn.Hardsigmoid),
            *_conv_bn(hidden, cout, 1))

    def forward(self, x):
        return x + self.block(x) if self.use_residual else self.block(x)


def big_graph(*, seed: int = 0) -> nn.Sequential:
    """About 500 fx nodes for timing the dependency analysis: stem (3 -> 16, stride 2), then
    34 MBConvSE blocks with expansion 2 in three stages (16 ch x 11, 24 ch x 12 at 8x8,
    32 ch x 11 at 4x4), head; input 1x3x32x32."""
    torch.manual_seed(seed)
    layers, cin = [*_conv_bn(3, 16, 3, 2), nn.Hardswish()], 16
    for width, blocks, stride in [(16, 11, 1), (24, 12, 2), (32, 11, 2)]:
        for i in range(blocks):
            layers.append(MBConvSE(cin, width, stride if i == 0 else 1, expand=2))
            cin = width
    return _init(nn.Sequential(*layers, _head(cin)))


PRUNE_ZOO = {
    "residual": (residual, (1, 3, 16, 16)),
    "depthwise_separable": (depthwise_separable, (1, 3, 16, 16)),
    "squeeze_excitation": (squeeze_excitation, (1, 3, 16, 16)),
    "channel_shuffle": (channel_shuffle_net, (1, 3, 16, 16)),
    "dense_concat": (dense_concat, (1, 3, 16, 16)),
    "inception": (inception, (1, 3, 16, 16)),
    "group_conv": (group_conv, (1, 3, 16, 16)),
    "layernorm_permute": (layernorm_permute, (1, 3, 16, 16)),
    "attention": (attention, (1, 8, 32)),
    "shape_scaled_attention": (shape_scaled_attention, (1, 8, 16)),
    "flatten_linear": (flatten_linear, (1, 3, 16, 16)),
    "hardcoded_split": (hardcoded_split, (1, 3, 16, 16)),
    "embedding": (embedding, (1, 8)),
    "conv_transpose": (conv_transpose, (1, 3, 16, 16)),
    "unknown_op": (unknown_op, (1, 3, 16, 16)),
    "big_graph": (big_graph, (1, 3, 32, 32)),
}


def example_input(name: str, *, seed: int = 0) -> torch.Tensor:
    """Seeded input for ``PRUNE_ZOO[name]``: int64 token ids for ``embedding``, else randn."""
    shape = PRUNE_ZOO[name][1]
    generator = torch.Generator().manual_seed(seed)
    if name == "embedding":
        return torch.randint(0, VOCAB, shape, generator=generator)
    return torch.randn(shape, generator=generator)
