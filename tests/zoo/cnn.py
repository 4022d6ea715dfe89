"""Tiny model zoo for tests: plain nn.Modules, traceable by torch.fx.symbolic_trace.

Every builder seeds torch, returns a fresh model in eval mode, and gives every BatchNorm
non-trivial running statistics and affine parameters, so BN folding is really exercised.
``ZOO`` maps a name to ``(builder, input_shape)`` for the traceable models.
"""
from __future__ import annotations

import torch
from torch import nn


def _init_weights(model: nn.Module) -> nn.Module:
    """Variance-preserving conv/linear init and random BN stats; puts the model in eval."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.uniform_(m.bias, -0.1, 0.1)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            nn.init.uniform_(m.bias, -0.1, 0.1)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _bn_from_data(model: nn.Module, shape: tuple[int, ...], batches: int = 2) -> nn.Module:
    """BatchNorm running statistics averaged over ``batches`` random batches of 4 (``shape`` with its
    batch size replaced), then jittered (variance x U(0.8, 1.25), mean +- 0.1 std): statistics that
    normalize, as a trained net's do. At full depth, fixed random statistics let activations grow
    (EfficientNetV2-S reached 1.5e6, where its fp32 and float64 outputs differ by 88 %). Puts the
    model in eval; a model on the meta device (built to count parameters) is left as it is."""
    if any(p.is_meta for p in model.parameters()):
        return model.eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None          # a cumulative average over the batches
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.train()
        for _ in range(batches):
            model(torch.randn(4, *shape[1:], generator=gen))
        for m in norms:
            m.momentum = 0.1
            m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.8, 1.25))
            m.running_mean.add_(torch.empty_like(m.running_mean).uniform_(-0.1, 0.1) * m.running_var.sqrt())
    return model.eval()


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


# ----------------------------------------------------------------------------- ResNet

class BasicBlock(nn.Module):
    """Two 3x3 conv+BN; identity shortcut, or 1x1 conv+BN when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.relu = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.downsample = (nn.Sequential(*_conv_bn(cin, cout, 1, stride))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet of BasicBlocks; ``stages`` lists (width, blocks, stride) per stage."""

    def __init__(self, stages, num_classes: int, stem_width: int, imagenet_stem: bool):
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(*_conv_bn(3, stem_width, 7, 2), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(*_conv_bn(3, stem_width, 3), nn.ReLU())
        layers, cin = [], stem_width
        for width, blocks, stride in stages:
            blocks = [BasicBlock(cin, width, stride)] + [BasicBlock(width, width)
                                                         for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*blocks))
            cin = width
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.avgpool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def resnet18(num_classes: int = 1000, *, seed: int = 0) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) for 1x3x224x224 inputs."""
    torch.manual_seed(seed)
    stages = [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)]
    return _init_weights(ResNet(stages, num_classes, 64, imagenet_stem=True))


def tiny_resnet(num_classes: int = 10, *, seed: int = 0) -> ResNet:
    """Narrow three-stage ResNet for 1x3x32x32 inputs."""
    torch.manual_seed(seed)
    stages = [(8, 2, 1), (16, 1, 2), (32, 1, 2)]
    return _init_weights(ResNet(stages, num_classes, 8, imagenet_stem=False))


# ----------------------------------------------------------------------- MobileNetV2

def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t == 1), 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers = [] if expand == 1 else [*_conv_bn(cin, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(),
                   *_conv_bn(hidden, cout, 1)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2; ``setting`` rows are (expansion t, channels c, repeats n, stride s)."""

    def __init__(self, setting, num_classes: int, width: float, stem: int, last: int,
                 stem_stride: int):
        super().__init__()
        cin = _make_divisible(stem * width)
        last = _make_divisible(last * max(1.0, width))
        layers = [*_conv_bn(3, cin, 3, stem_stride), nn.ReLU6()]
        for t, c, n, s in setting:
            cout = _make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers += [*_conv_bn(cin, last, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


_MOBILENET_V2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2(num_classes: int = 1000, width: float = 1.0, *, seed: int = 0) -> MobileNetV2:
    """MobileNetV2 with the standard setting table, for 1x3x224x224 inputs."""
    torch.manual_seed(seed)
    return _init_weights(MobileNetV2(_MOBILENET_V2_SETTING, num_classes, width,
                                     stem=32, last=1280, stem_stride=2))


def tiny_mobilenet(num_classes: int = 10, *, seed: int = 0) -> MobileNetV2:
    """Narrow MobileNetV2 (t=1 block, strided and residual blocks) for 1x3x32x32 inputs."""
    torch.manual_seed(seed)
    setting = [(1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 2, 2)]
    return _init_weights(MobileNetV2(setting, num_classes, 1.0, stem=8, last=64,
                                     stem_stride=1))


# ----------------------------------------------------------------------- MobileNetV3

class SqueezeExcite(nn.Module):
    """MobileNetV3's SE: avgpool, 1x1 reduce, ReLU, 1x1 expand, hardsigmoid, scale."""

    def __init__(self, channels: int):
        super().__init__()
        squeeze = _make_divisible(channels // 4)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        s = nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))
        return x * s


class MBConv3(nn.Module):
    """1x1 expand, kxk depthwise, optional SE, 1x1 projection; hardswish or ReLU."""

    def __init__(self, cin: int, k: int, hidden: int, cout: int, se: bool, hs: bool, stride: int):
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        layers = [] if hidden == cin else [*_conv_bn(cin, hidden, 1), act()]
        layers += [*_conv_bn(hidden, hidden, k, stride, groups=hidden), act()]
        layers += [SqueezeExcite(hidden)] if se else []
        layers += _conv_bn(hidden, cout, 1)
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.use_residual else self.block(x)


_MOBILENET_V3_SMALL = [(3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
                       (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
                       (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
                       (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1)]


class MobileNetV3(nn.Module):
    """MobileNetV3-Small; ``setting`` rows are (kernel, expanded, out, SE, hardswish, stride)."""

    def __init__(self, setting, num_classes: int, stem_stride: int = 2):
        super().__init__()
        layers, cin = [*_conv_bn(3, 16, 3, stem_stride), nn.Hardswish()], 16
        for k, hidden, cout, se, hs, stride in setting:
            layers.append(MBConv3(cin, k, hidden, cout, se, hs, stride))
            cin = cout
        layers += [*_conv_bn(cin, 6 * cin, 1), nn.Hardswish()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(6 * cin, 1024), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(1024, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v3(num_classes: int = 1000, *, seed: int = 0) -> MobileNetV3:
    """MobileNetV3-Small (hardswish, squeeze-excitation, depthwise), for 1x3x224x224 inputs."""
    torch.manual_seed(seed)
    return _init_weights(MobileNetV3(_MOBILENET_V3_SMALL, num_classes))


def tiny_mobilenet_v3(num_classes: int = 10, *, seed: int = 0) -> MobileNetV3:
    """Three MobileNetV3 blocks (SE, hardswish, a residual), for 1x3x32x32 inputs."""
    torch.manual_seed(seed)
    return _init_weights(MobileNetV3([(3, 16, 16, True, False, 1), (3, 48, 24, False, True, 2),
                                      (5, 72, 24, True, True, 1)], num_classes, stem_stride=1))


# ------------------------------------------------------------------------------- MLP

def mlp(in_features: int = 16, num_classes: int = 4, *, seed: int = 0) -> nn.Sequential:
    """Two hidden layers of Linear + BatchNorm1d + ReLU + Dropout, for 1 x in_features."""
    torch.manual_seed(seed)
    return _init_weights(nn.Sequential(
        nn.Linear(in_features, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(32, num_classes)))


class SmallConvNet(nn.Module):
    """conv-ReLU, strided conv-ReLU, global pool, Linear: the smallest int8 classifier (3x16x16 in, 10 out)
    with torch's default init, for the tests that corrupt int8 files and outputs."""

    def __init__(self, *, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x))


# ------------------------------------------------------------------------ untraceable

class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace ``if x.sum() > 0``."""

    def forward(self, x):
        if x.sum() > 0:
            return torch.relu(x)
        return -x


class UntraceableNet(nn.Module):
    """Small CNN for 1x3x32x32 whose nested ``body.gate`` defeats symbolic_trace."""

    def __init__(self, num_classes: int = 10, *, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential()
        self.body.add_module("conv", nn.Conv2d(3, 8, 3, padding=1))
        self.body.add_module("gate", Gate())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, num_classes))
        _init_weights(self)

    def forward(self, x):
        return self.head(self.body(x))


ZOO = {
    "resnet18": (resnet18, (1, 3, 224, 224)),
    "mobilenet_v2": (mobilenet_v2, (1, 3, 224, 224)),
    "tiny_resnet": (tiny_resnet, (1, 3, 32, 32)),
    "tiny_mobilenet": (tiny_mobilenet, (1, 3, 32, 32)),
    "mobilenet_v3": (mobilenet_v3, (1, 3, 224, 224)),
    "tiny_mobilenet_v3": (tiny_mobilenet_v3, (1, 3, 32, 32)),
    "mlp": (mlp, (1, 16)),
}
