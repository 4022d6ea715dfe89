"""Every family of the zoo's small variants through every stage: fp32 to each format, fp16, prune,
int8 to each format, the xnnpack partition (bench/sweep.py runs the same matrix at full size).
Marked ``heavy`` (about half a minute a family): ``pytest -m "not heavy"`` leaves them out, CI runs them."""
from __future__ import annotations

import pytest
import torch

import graphopt
from zoo import SMALL_FAMILIES, TRANSFORMER_ZOO

pytestmark = pytest.mark.heavy
FAMILIES = SMALL_FAMILIES | TRANSFORMER_ZOO      # vit_tiny, swin_tiny, convnext_tiny beside the CNN families

# (pipeline, formats): one run per pipeline, every format it feeds verified on the example, shuffles
# of it and calibration samples (graphopt.optimize's default)
STAGES = [
    ("cleanup,fold-bn,fuse", "onnx,ptl,tflite"),
    ("cleanup,fold-bn,fuse,partition(backend=xnnpack)", "pte"),
    ("cleanup,fold-bn,fuse,fp16", "onnx,tflite"),
    ("cleanup,prune(ratio=0.3),fold-bn,fuse", "onnx"),
    ("cleanup,fold-bn,fuse,quantize(prefer=size)", "onnx,ptl,tflite"),
    ("cleanup,fold-bn,fuse,quantize(prefer=size),partition(backend=xnnpack)", "pte"),
]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_stage(family, registry, tmp_path):
    build, shape = FAMILIES[family]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    data = {"calibration": [torch.randn(*shape, generator=gen) for _ in range(16)]}
    failed = []
    for i, (pipeline, formats) in enumerate(STAGES):
        try:
            result = graphopt.optimize(build(), (x,), registry, pipeline=pipeline, formats=formats,
                                       out_dir=tmp_path / str(i), data=data)
        except graphopt.GraphoptError as exc:
            failed.append(f"{pipeline} -> {formats}: {exc}")
            continue
        failed += [f"{pipeline} -> {c.artifact.format}: {c.problems}" for c in result.artifacts if not c.verified]
        assert sorted(c.artifact.format for c in result.artifacts) == sorted(formats.split(","))
    assert not failed, "\n".join(failed)
