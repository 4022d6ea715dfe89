"""torchvision segmentation heads on a MobileNetV3-Large backbone, full-size and small: plain nn.Modules, fx-traceable,
seeded, in eval mode, each returning an (N, num_classes, H, W) map at the input's resolution.

``deeplabv3_mobilenet_v3_large`` (ASPP: 1x1 conv, three atrous 3x3 convs, image pooling upsampled with bilinear
``F.interpolate``, concat, 1x1 projection; then 3x3 conv and 1x1 classifier) and ``lraspp_mobilenet_v3_large``
(high-level 1x1 conv gated by a pooled sigmoid scale, upsampled and added to a classifier of low-level features), as
torchvision builds them (dilated backbone of output stride 16, no aux head), for 1x3x224x224; ``tiny_deeplabv3`` and
``tiny_lraspp`` keep the heads and backbone blocks, narrow and shallow, for 1x3x64x64. ``SEGMENTATION`` and
``SMALL_SEGMENTATION`` map a family name to ``(builder, input_shape)``; ``families`` merges them into its dicts.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

if __package__:
    from .cnn import MBConv3, _bn_from_data, _conv_bn, _init_weights
else:   # loaded from its path (graphopt run tests/zoo/segmentation.py:tiny_lraspp), tests/zoo/ is on sys.path
    from cnn import MBConv3, _bn_from_data, _conv_bn, _init_weights

# MobileNetV3 rows: (kernel, expanded channels, out channels, SE, hardswish, stride)
_LARGE = [(3, 16, 16, False, False, 1), (3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1),
          (5, 72, 40, True, False, 2), (5, 120, 40, True, False, 1), (5, 120, 40, True, False, 1),
          (3, 240, 80, False, True, 2), (3, 200, 80, False, True, 1), (3, 184, 80, False, True, 1),
          (3, 184, 80, False, True, 1), (3, 480, 112, True, True, 1), (3, 672, 112, True, True, 1),
          (5, 672, 160, True, True, 2), (5, 960, 160, True, True, 1), (5, 960, 160, True, True, 1)]
_SMALL = [(3, 16, 16, True, False, 2), (3, 48, 16, False, False, 2), (3, 48, 16, False, True, 1),
          (5, 64, 24, True, True, 2), (5, 72, 24, True, True, 1), (5, 72, 16, True, True, 2),
          (5, 64, 16, True, True, 1)]


def mobilenet_v3_features(setting) -> nn.Sequential:
    """MobileNetV3 ``features`` as torchvision's segmentation models build them (``dilated=True``): stem, one module
    per block, 1x1 conv to 6x channels, BN eps 1e-3; the last stage (from its strided block on) has stride 1 and
    depthwise dilation 2, so the output stride is 16."""
    last_stage = max(i for i, row in enumerate(setting) if row[-1] > 1)
    units, cin = [nn.Sequential(*_conv_bn(3, 16, 3, 2), nn.Hardswish())], 16
    for i, (k, hidden, cout, se, hs, stride) in enumerate(setting):
        units.append(MBConv3(cin, k, hidden, cout, se, hs, 1 if i >= last_stage else stride))
        for m in units[-1].modules():
            if i >= last_stage and isinstance(m, nn.Conv2d) and m.groups > 1:
                m.dilation, m.padding = (2, 2), (k - 1, k - 1)
        cin = cout
    features = nn.Sequential(*units, nn.Sequential(*_conv_bn(cin, 6 * cin, 1), nn.Hardswish()))
    for m in features.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-3
    return features


def _low_level_index(setting) -> int:
    """torchvision's ``low_pos``: the stage boundaries are the stem, the strided blocks and the last conv; the
    low-level features are the output of the fourth boundary from the end (output stride 8)."""
    stages = [0] + [i + 1 for i, row in enumerate(setting) if row[-1] > 1] + [len(setting) + 1]
    return stages[-4]


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU()]


class ASPP(nn.Module):
    """1x1 conv, atrous 3x3 convs at ``rates`` and image pooling (avgpool, 1x1 conv, bilinear upsample), each
    BN + ReLU, concatenated, projected by 1x1 conv + BN + ReLU + Dropout(0.5)."""

    def __init__(self, cin: int, rates, out: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Sequential(*_conv_bn_relu(cin, out))] +
                                   [nn.Sequential(*_conv_bn_relu(cin, out, 3, r)) for r in rates])
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(cin, out))
        self.project = nn.Sequential(*_conv_bn_relu((len(rates) + 2) * out, out), nn.Dropout(0.5))

    def forward(self, x):
        res = [conv(x) for conv in self.convs]
        res.append(F.interpolate(self.pooling(x), size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.project(torch.cat(res, dim=1))


class DeepLabV3(nn.Module):
    """Backbone, DeepLabHead (ASPP, 3x3 conv + BN + ReLU, 1x1 classifier), bilinear upsample to the input size."""

    def __init__(self, setting, num_classes: int, rates, width: int):
        super().__init__()
        self.backbone = mobilenet_v3_features(setting)
        cin = 6 * setting[-1][2]
        self.classifier = nn.Sequential(ASPP(cin, rates, width), *_conv_bn_relu(width, width, 3),
                                        nn.Conv2d(width, num_classes, 1))

    def forward(self, x):
        out = self.classifier(self.backbone(x))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


class LRASPP(nn.Module):
    """Backbone split at the low-level features; LRASPPHead: ``cbr(high) * scale(high)`` (1x1 conv + BN + ReLU,
    gated by avgpool + 1x1 conv + sigmoid), bilinear upsample to the low-level size, plus a 1x1 classifier of the
    low-level features; bilinear upsample to the input size."""

    def __init__(self, setting, num_classes: int, inter: int):
        super().__init__()
        features, low = mobilenet_v3_features(setting), _low_level_index(setting)
        self.low_features, self.high_features = features[:low + 1], features[low + 1:]
        low_channels, high_channels = setting[low - 1][2], 6 * setting[-1][2]
        self.cbr = nn.Sequential(*_conv_bn_relu(high_channels, inter))
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(high_channels, inter, 1, bias=False),
                                   nn.Sigmoid())
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter, num_classes, 1)

    def forward(self, x):
        low = self.low_features(x)
        high = self.high_features(low)
        y = self.cbr(high) * self.scale(high)
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.low_classifier(low) + self.high_classifier(y)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def deeplabv3_mobilenet_v3_large(num_classes: int = 21, *, seed: int = 0) -> DeepLabV3:
    """torchvision's deeplabv3_mobilenet_v3_large without the aux head (ASPP rates 12/24/36, 256 wide), for
    1x3x224x224; returns 1 x num_classes x 224 x 224."""
    torch.manual_seed(seed)
    return _bn_from_data(_init_weights(DeepLabV3(_LARGE, num_classes, (12, 24, 36), 256)), (1, 3, 224, 224))


def tiny_deeplabv3(num_classes: int = 6, *, seed: int = 0) -> DeepLabV3:
    """deeplabv3_mobilenet_v3_large's blocks and ops (ASPP rates 2/4/6, 16 wide), for 1x3x64x64."""
    torch.manual_seed(seed)
    return _init_weights(DeepLabV3(_SMALL, num_classes, (2, 4, 6), 16))


def lraspp_mobilenet_v3_large(num_classes: int = 21, *, seed: int = 0) -> LRASPP:
    """torchvision's lraspp_mobilenet_v3_large (low-level features 40 ch at stride 8, 128 inter), for 1x3x224x224;
    returns 1 x num_classes x 224 x 224."""
    torch.manual_seed(seed)
    return _bn_from_data(_init_weights(LRASPP(_LARGE, num_classes, 128)), (1, 3, 224, 224))


def tiny_lraspp(num_classes: int = 6, *, seed: int = 0) -> LRASPP:
    """lraspp_mobilenet_v3_large's blocks and ops (16 inter channels), for 1x3x64x64."""
    torch.manual_seed(seed)
    return _init_weights(LRASPP(_SMALL, num_classes, 16))


SEGMENTATION = {
    "deeplabv3": (deeplabv3_mobilenet_v3_large, (1, 3, 224, 224)),
    "lraspp": (lraspp_mobilenet_v3_large, (1, 3, 224, 224)),
}
SMALL_SEGMENTATION = {
    "deeplabv3": (tiny_deeplabv3, (1, 3, 64, 64)),
    "lraspp": (tiny_lraspp, (1, 3, 64, 64)),
}
