"""The test-model zoo: plain nn.Modules, fx-traceable, seeded, in eval mode.

``cnn`` (ResNet-, MobileNet- and MLP-style, ``ZOO``), ``transformers`` (ViT-, Swin- and
ConvNeXt-style: tiny in ``TRANSFORMER_ZOO``, full-size replicas of torchvision's vit_b_16, swin_t and
convnext_tiny in ``TRANSFORMER_FULL``), ``prune`` (one channel-coupling pattern each,
``PRUNE_ZOO`` and ``example_input``), ``families`` and ``segmentation`` (torchvision's
ResNeXt, EfficientNet, MNASNet, ShuffleNetV2, SqueezeNet, DenseNet, GoogLeNet, RegNet,
AlexNet, VGG, DeepLabV3 and LR-ASPP: full-size in ``FAMILIES``, with BatchNorm statistics from
data as a trained net's, small in ``SMALL_FAMILIES``),
``fold`` (BatchNorm randomizer, the capture -> pipeline -> compare helper and a conv with two
users) and ``half`` (fp16 graphs as the fp16 pass leaves them).
Each ``*ZOO``/``*FAMILIES``/``TRANSFORMER_FULL`` maps a name to ``(builder, input_shape)``. A module is also a
CLI model spec: ``graphopt run tests/zoo/cnn.py:tiny_resnet --input-shape 1x3x32x32``.
"""
from .cnn import ZOO
from .families import FAMILIES, SMALL_FAMILIES
from .prune import PRUNE_ZOO, example_input
from .transformers import TRANSFORMER_FULL, TRANSFORMER_ZOO

__all__ = ["FAMILIES", "PRUNE_ZOO", "SMALL_FAMILIES", "TRANSFORMER_FULL", "TRANSFORMER_ZOO", "ZOO",
           "example_input"]
