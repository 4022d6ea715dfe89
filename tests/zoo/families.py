"""torchvision classification families as plain fx-traceable nn.Modules: ResNeXt, EfficientNet-B0/-V2-S, MNASNet,
ShuffleNetV2, SqueezeNet 1.1, DenseNet-121, GoogLeNet, RegNetY/X-400MF, AlexNet, VGG-11. Full-size builders have the
real configuration (torchvision's parameter count), for 1x3x224x224; small ``tiny_*`` ones keep the blocks and the
distinctive ops, narrow and shallow, for 1x3x32x32 or 1x3x64x64. Builders are seeded and return eval-mode models.
``FAMILIES``/``SMALL_FAMILIES`` map a family to ``(builder, input_shape)``, ``segmentation``'s two heads included."""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

if __package__:
    from .cnn import _bn_from_data, _init_weights
    from .prune import ShuffleUnit
    from .segmentation import SEGMENTATION, SMALL_SEGMENTATION
else:   # loaded from its path (graphopt run tests/zoo/families.py:tiny_resnext), tests/zoo/ is on sys.path
    from cnn import _bn_from_data, _init_weights
    from prune import ShuffleUnit
    from segmentation import SEGMENTATION, SMALL_SEGMENTATION


def _cbn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act=None, eps: float = 1e-5) -> list:
    """Conv (no bias, 'same' padding) + BatchNorm, then ``act()`` if given."""
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=eps)]
    return layers + ([act()] if act else [])


def _builder(name: str, doc: str, num_classes: int, make, *args, full: bool = False):
    """A zoo builder ``name(num_classes=..., *, seed=0)``: seeds torch, builds ``make(*args, num_classes=...)``,
    gives it variance-preserving weights and non-trivial BatchNorm statistics (``full``: from data,
    ``_bn_from_data``), returns it in eval mode."""
    def build(num_classes: int = num_classes, *, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = _init_weights(make(*args, num_classes=num_classes))
        return _bn_from_data(model, _224) if full else model
    build.__name__, build.__qualname__, build.__doc__ = name, name, doc
    return build


class Net(nn.Module):
    """``features``, ``AdaptiveAvgPool2d(pool)`` + flatten (``x.mean([2, 3])`` if ``pool`` is None), ``classifier``."""

    def __init__(self, features: nn.Module, classifier: nn.Module, pool: int | None = 1):
        super().__init__()
        self.features, self.classifier = features, classifier
        self.avgpool = None if pool is None else nn.AdaptiveAvgPool2d(pool)

    def forward(self, x):
        x = self.features(x)
        x = x.mean([2, 3]) if self.avgpool is None else torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


class SqueezeExcitation(nn.Module):
    """torchvision's SE: avgpool, 1x1 conv reduce, ``act``, 1x1 conv expand, sigmoid, ``scale * x``."""

    def __init__(self, channels: int, squeeze: int, act=nn.ReLU):
        super().__init__()
        self.avgpool, self.activation, self.scale_activation = nn.AdaptiveAvgPool2d(1), act(), nn.Sigmoid()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


class Bottleneck(nn.Module):
    """ResNeXt Bottleneck / RegNet ResBottleneckBlock: 1x1, grouped 3x3, [SE], 1x1, + shortcut (projected), ReLU."""

    def __init__(self, cin: int, width: int, cout: int, stride: int, groups: int, se_squeeze: int = 0):
        super().__init__()
        layers = [*_cbn(cin, width, 1, act=nn.ReLU), *_cbn(width, width, 3, stride, groups, act=nn.ReLU)]
        layers += [SqueezeExcitation(width, se_squeeze)] if se_squeeze else []
        self.body = nn.Sequential(*layers, *_cbn(width, cout, 1))
        self.downsample = nn.Sequential(*_cbn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.body(x) + identity)


def _resnext(stages, groups: int, width_per_group: int, stem: int, num_classes: int) -> Net:
    """``stages``: (planes, blocks, stride); 7x7/2 stem + maxpool; block width int(planes * wpg / 64) * groups."""
    layers, cin = [*_cbn(3, stem, 7, 2, act=nn.ReLU), nn.MaxPool2d(3, 2, 1)], stem
    for planes, blocks, stride in stages:
        width = int(planes * (width_per_group / 64)) * groups
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, planes * 4, stride if i == 0 else 1, groups))
            cin = planes * 4
    return Net(nn.Sequential(*layers), nn.Linear(cin, num_classes))


def _regnet(stages, group_width: int, se: bool, stem: int, num_classes: int) -> Net:
    """``stages``: (width, depth); 3x3/2 stem; SE squeezes to a quarter of the block's input width."""
    layers, cin = _cbn(3, stem, 3, 2, act=nn.ReLU), stem
    for width, depth in stages:
        for i in range(depth):
            se_squeeze = int(round(0.25 * cin)) if se else 0
            layers.append(Bottleneck(cin, width, width, 2 if i == 0 else 1, width // group_width, se_squeeze))
            cin = width
    return Net(nn.Sequential(*layers), nn.Linear(cin, num_classes))


class MBConv(nn.Module):
    """MBConv: 1x1 expand (none when ``expand == 1``), kxk depthwise, optional SE, 1x1 projection. Fused-MBConv:
    kxk expand conv + 1x1 projection, or one kxk conv when ``expand == 1``. Residual add when the shape is kept
    (torchvision's stochastic depth is the identity in eval, so it is left out)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, act=nn.SiLU, se: bool = True,
                 fused: bool = False, eps: float = 1e-3):
        super().__init__()
        hidden = cin * expand
        if fused:
            layers = _cbn(cin, cout if expand == 1 else hidden, k, stride, act=act, eps=eps)
            layers += [] if expand == 1 else _cbn(hidden, cout, 1, eps=eps)
        else:
            layers = [] if expand == 1 else _cbn(cin, hidden, 1, act=act, eps=eps)
            layers += _cbn(hidden, hidden, k, stride, hidden, act=act, eps=eps)
            layers += [SqueezeExcitation(hidden, max(1, cin // 4), act)] if se else []
            layers += _cbn(hidden, cout, 1, eps=eps)
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x):
        return self.block(x) + x if self.use_res_connect else self.block(x)


def _mbnet(stages, stem: int, last: int, num_classes: int, act=nn.SiLU, se: bool = True, eps: float = 1e-3,
           pool: int | None = 1) -> Net:
    """EfficientNet: ``stages`` rows are (fused, expand, kernel, stride, out channels, repeats)."""
    layers, cin = _cbn(3, stem, 3, 2, act=act, eps=eps), stem
    for fused, expand, k, stride, cout, repeats in stages:
        for i in range(repeats):
            layers.append(MBConv(cin, cout, k, stride if i == 0 else 1, expand, act, se, fused, eps))
            cin = cout
    layers += _cbn(cin, last, 1, act=act, eps=eps)
    return Net(nn.Sequential(*layers), nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes)), pool)


# MNASNet: ReLU, no SE, BN eps 1e-5, x.mean([2, 3]); its depthwise-separable first block is an MBConv with t=1.
_mnasnet = partial(_mbnet, act=nn.ReLU, se=False, eps=1e-5, pool=None)


def _shufflenet(widths, repeats, num_classes: int) -> Net:
    """Stem conv + maxpool, stages of ShuffleUnits (strided, then chunk/concat/shuffle units), 1x1 conv."""
    layers, cin = [*_cbn(3, widths[0], 3, 2, act=nn.ReLU), nn.MaxPool2d(3, 2, 1)], widths[0]
    for cout, n in zip(widths[1:-1], repeats):
        layers += [ShuffleUnit(cin, cout, 2)] + [ShuffleUnit(cout, cout, 1) for _ in range(n - 1)]
        cin = cout
    layers += _cbn(cin, widths[-1], 1, act=nn.ReLU)
    return Net(nn.Sequential(*layers), nn.Linear(widths[-1], num_classes), pool=None)


class Fire(nn.Module):
    """SqueezeNet Fire: 1x1 squeeze + ReLU, then the concat of ReLU'd 1x1 and 3x3 expands (convs with bias)."""

    def __init__(self, cin: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze, self.relu = nn.Conv2d(cin, squeeze, 1), nn.ReLU()
        self.expand1x1, self.expand3x3 = nn.Conv2d(squeeze, expand1x1, 1), nn.Conv2d(squeeze, expand3x3, 3, padding=1)

    def forward(self, x):
        x = self.relu(self.squeeze(x))
        return torch.cat([self.relu(self.expand1x1(x)), self.relu(self.expand3x3(x))], 1)


def _squeezenet(stem: int, fires, num_classes: int) -> Net:
    """``fires``: "M" (3x3/2 ceil-mode maxpool) or (squeeze, expand); classifier: dropout, 1x1 conv, ReLU, pool."""
    layers, cin = [nn.Conv2d(3, stem, 3, 2), nn.ReLU()], stem
    for f in fires:
        layers.append(nn.MaxPool2d(3, 2, ceil_mode=True) if f == "M" else Fire(cin, f[0], f[1], f[1]))
        cin = cin if f == "M" else 2 * f[1]
    layers += [nn.Dropout(0.5), nn.Conv2d(cin, num_classes, 1), nn.ReLU()]
    return Net(nn.Sequential(*layers), nn.Sequential())


class DenseBlock(nn.Module):
    """Each layer (BN, ReLU, 1x1, BN, ReLU, 3x3) reads ``torch.cat`` of the input and earlier outputs; returns all."""

    def __init__(self, cin: int, n: int, growth: int, bn_size: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, bn_size * growth, 1, bias=False),
            nn.BatchNorm2d(bn_size * growth), nn.ReLU(), nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False))
            for c in range(cin, cin + n * growth, growth))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


def _densenet(stem: int, blocks, growth: int, bn_size: int, num_classes: int) -> Net:
    """Dense blocks joined by transitions (BN, ReLU, 1x1 conv halving the channels, 2x2 avgpool)."""
    layers, c = [nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], stem
    for i, n in enumerate(blocks):
        layers.append(DenseBlock(c, n, growth, bn_size))
        c += n * growth
        if i < len(blocks) - 1:
            layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2)]
            c //= 2
    return Net(nn.Sequential(*layers, nn.BatchNorm2d(c), nn.ReLU()), nn.Linear(c, num_classes))


def _basic(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    """GoogLeNet's BasicConv2d: conv (no bias), BN (eps 1e-3), ReLU."""
    return nn.Sequential(*_cbn(cin, cout, k, stride, act=nn.ReLU, eps=1e-3))


class Inception(nn.Module):
    """Concat of 1x1; 1x1 -> 3x3; 1x1 -> 3x3 (torchvision's "5x5" branch); 3x3/1 ceil maxpool -> 1x1."""

    def __init__(self, cin: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int, pool_proj: int):
        super().__init__()
        self.branch1 = _basic(cin, ch1x1, 1)
        self.branch2 = nn.Sequential(_basic(cin, ch3x3red, 1), _basic(ch3x3red, ch3x3, 3))
        self.branch3 = nn.Sequential(_basic(cin, ch5x5red, 1), _basic(ch5x5red, ch5x5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), _basic(cin, pool_proj, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


def _googlenet(c1: int, c2: int, blocks, num_classes: int) -> Net:
    """``blocks``: an int k (kxk/2 ceil-mode maxpool) or an Inception configuration; aux heads omitted (eval)."""
    layers, cin = [_basic(3, c1, 7, 2), nn.MaxPool2d(3, 2, ceil_mode=True), _basic(c1, c1, 1), _basic(c1, c2, 3),
                   nn.MaxPool2d(3, 2, ceil_mode=True)], c2
    for b in blocks:
        layers.append(nn.MaxPool2d(b, 2, ceil_mode=True) if isinstance(b, int) else Inception(cin, *b))
        cin = cin if isinstance(b, int) else b[0] + b[2] + b[4] + b[5]
    return Net(nn.Sequential(*layers), nn.Sequential(nn.Dropout(0.2), nn.Linear(cin, num_classes)))


def _classic(cfg, pool_k: int, pool_out: int, hidden: int, alexnet: bool, num_classes: int) -> Net:
    """``cfg``: "M" (maxpool pool_k/2), an int (3x3 conv + ReLU) or (out, k, stride, pad); adaptive avgpool,
    flatten, two Linear + ReLU with Dropout (before each for AlexNet, after each for VGG), Linear."""
    layers, cin = [], 3
    for c in cfg:
        c = c if c == "M" or isinstance(c, tuple) else (c, 3, 1, 1)
        layers += [nn.MaxPool2d(pool_k, 2)] if c == "M" else [nn.Conv2d(cin, *c), nn.ReLU()]
        cin = cin if c == "M" else c[0]
    fc1, fc2 = [nn.Linear(cin * pool_out ** 2, hidden), nn.ReLU()], [nn.Linear(hidden, hidden), nn.ReLU()]
    head = [nn.Dropout(0.5), *fc1, nn.Dropout(0.5), *fc2] if alexnet else [*fc1, nn.Dropout(0.5), *fc2, nn.Dropout(0.5)]
    return Net(nn.Sequential(*layers), nn.Sequential(*head, nn.Linear(hidden, num_classes)), pool_out)


_224, _32, _64 = (1, 3, 224, 224), (1, 3, 32, 32), (1, 3, 64, 64)
_REGISTRY: dict[str, tuple] = {}   # family: (full-size builder, small builder, small input shape)


def _family(family: str, model: str, what: str, make, full: tuple, small: tuple, small_shape: tuple):
    """Builders for torchvision's ``model`` (``make(*full)``) and ``tiny_<family>`` (``make(*small)``)."""
    builders = (_builder(model, f"torchvision's {model} ({what}), for 1x3x224x224.", 1000, make, *full, full=True),
                _builder(f"tiny_{family}", f"{model}'s blocks and ops, narrow and shallow, for "
                         f"{'x'.join(map(str, small_shape))}.", 10, make, *small))
    _REGISTRY[family] = (*builders, small_shape)
    return builders


_B0 = [(False, 1, 3, 1, 16, 1), (False, 6, 3, 2, 24, 2), (False, 6, 5, 2, 40, 2), (False, 6, 3, 2, 80, 3),
       (False, 6, 5, 1, 112, 3), (False, 6, 5, 2, 192, 4), (False, 6, 3, 1, 320, 1)]
_V2_S = [(True, 1, 3, 1, 24, 2), (True, 4, 3, 2, 48, 4), (True, 4, 3, 2, 64, 4), (False, 4, 3, 2, 128, 6),
         (False, 6, 3, 1, 160, 9), (False, 6, 3, 2, 256, 15)]
_MNAS = [(False, 1, 3, 1, 16, 1), (False, 3, 3, 2, 24, 3), (False, 3, 5, 2, 40, 3), (False, 6, 5, 2, 80, 3),
         (False, 6, 3, 1, 96, 2), (False, 6, 5, 2, 192, 4), (False, 6, 3, 1, 320, 1)]
_GOOGLENET = [(64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), 3, (192, 96, 208, 16, 48, 64),
              (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64), (112, 144, 288, 32, 64, 64),
              (256, 160, 320, 32, 128, 128), 2, (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128)]

resnext50_32x4d, tiny_resnext = _family("resnext", "resnext50_32x4d", "32 groups x 4 wide", _resnext,
    ([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], 32, 4, 64), ([(8, 1, 1), (16, 2, 2)], 4, 16, 16), _32)
efficientnet_b0, tiny_efficientnet_b0 = _family("efficientnet_b0", "efficientnet_b0", "MBConv + SE, SiLU", _mbnet,
    (_B0, 32, 1280), ([(False, 1, 3, 1, 8, 1), (False, 4, 3, 2, 16, 2), (False, 4, 5, 2, 24, 1)], 16, 64), _32)
efficientnet_v2_s, tiny_efficientnet_v2 = _family("efficientnet_v2", "efficientnet_v2_s", "Fused-MBConv, MBConv",
    _mbnet, (_V2_S, 24, 1280), ([(True, 1, 3, 1, 16, 1), (True, 4, 3, 2, 24, 2), (False, 4, 3, 2, 32, 2)], 16, 64), _32)
mnasnet1_0, tiny_mnasnet = _family("mnasnet", "mnasnet1_0", "ReLU inverted residuals", _mnasnet, (_MNAS, 32, 1280),
    ([(False, 1, 3, 1, 8, 1), (False, 3, 3, 2, 16, 2), (False, 6, 5, 2, 24, 1)], 16, 64), _32)
shufflenet_v2_x1_0, tiny_shufflenet_v2 = _family("shufflenet_v2", "shufflenet_v2_x1_0", "stages [4, 8, 4]",
    _shufflenet, ([24, 116, 232, 464, 1024], [4, 8, 4]), ([16, 32, 64, 128], [2, 2]), _32)
squeezenet1_1, tiny_squeezenet = _family("squeezenet", "squeezenet1_1", "8 Fire modules", _squeezenet,
    (64, ["M", (16, 64), (16, 64), "M", (32, 128), (32, 128), "M", (48, 192), (48, 192), (64, 256), (64, 256)]),
    (16, ["M", (4, 16), (4, 16), "M", (8, 32), (8, 32)]), _32)
densenet121, tiny_densenet = _family("densenet", "densenet121", "growth 32, blocks (6, 12, 24, 16)", _densenet,
    (64, (6, 12, 24, 16), 32, 4), (16, (2, 2, 2), 8, 2), _32)
googlenet, tiny_googlenet = _family("googlenet", "googlenet", "no aux heads", _googlenet, (64, 192, _GOOGLENET),
    (8, 16, [(8, 8, 12, 4, 4, 4), 3, (12, 8, 16, 4, 8, 8), 2, (16, 8, 16, 4, 8, 8)]), _64)
regnet_y_400mf, tiny_regnet_y = _family("regnet_y", "regnet_y_400mf", "group width 8, SE", _regnet,
    ([(48, 1), (104, 3), (208, 6), (440, 6)], 8, True, 32), ([(16, 1), (32, 2), (64, 1)], 8, True, 16), _32)
regnet_x_400mf, tiny_regnet_x = _family("regnet_x", "regnet_x_400mf", "group width 16, no SE", _regnet,
    ([(32, 1), (64, 2), (160, 7), (400, 12)], 16, False, 32), ([(16, 1), (32, 2), (64, 1)], 16, False, 16), _32)
alexnet, tiny_alexnet = _family("alexnet", "alexnet", "5 convs, 3 Linear", _classic,
    ([(64, 11, 4, 2), "M", (192, 5, 1, 2), "M", 384, 256, 256, "M"], 3, 6, 4096, True),
    ([(16, 11, 2, 2), "M", (32, 5, 1, 2), "M", 48, 32, 32, "M"], 3, 2, 64, True), _64)
vgg11, tiny_vgg = _family("vgg", "vgg11", "configuration A, no BatchNorm", _classic,
    ([64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"], 2, 7, 4096, False),
    ([8, "M", 16, "M", 32, 32, "M"], 2, 2, 64, False), _32)

FAMILIES = {f: (full, _224) for f, (full, _, _) in _REGISTRY.items()} | SEGMENTATION
SMALL_FAMILIES = {f: (small, shape) for f, (_, small, shape) in _REGISTRY.items()} | SMALL_SEGMENTATION
