"""Helpers shared by the pass tests: BN with non-trivial statistics, capture -> pipeline
-> compare with the eager model, and a conv whose output feeds a BN and something else."""
from __future__ import annotations

import torch
import torch.nn as nn

import graphopt
from graphopt.testing import assert_close, outputs_of


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm running stats (and affine parameters, some negative) far from identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
                n = bn.num_features
                bn.running_mean.copy_(torch.randn(n, generator=gen))
                bn.running_var.copy_(torch.rand(n, generator=gen) * 3 + 0.2)
                if bn.affine:
                    bn.weight.copy_(torch.randn(n, generator=gen) * 2)
                    bn.bias.copy_(torch.randn(n, generator=gen))
    return model.eval()


def optimize(model: nn.Module, inputs: tuple[torch.Tensor, ...], pipeline: str,
             registry: graphopt.Registry, **kwargs) -> graphopt.PipelineRun:
    """Capture ``model``, run ``pipeline``; assert the result matches the eager model (fp32 exact)."""
    run = graphopt.run_pipeline(graphopt.capture(model, inputs), pipeline, registry, **kwargs)
    assert_close(outputs_of(model, inputs), run.graph.run(), graphopt.Tolerance(max_rel=1e-5))
    return run


def module_types(gm: torch.fx.GraphModule) -> list[str]:
    """Type names of the modules the graph calls, in graph order."""
    return [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]


class Residual(nn.Module):
    """``bn(conv(x)) + conv(x)`` with one conv call: the conv output has a second user."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y
