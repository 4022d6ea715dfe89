"""fp16 graphs as the fp16 pass leaves them, written by hand so that the emitter tests need no pass:
fp16 weights upcast at use (``fp16(mode=weights)``), and half compute between casts (``fp16``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HalfStorage(nn.Module):
    """A conv whose weights are stored fp16, upcast to fp32 where the conv reads them
    (parameters, which torch.fx reads through get_attr; it would fold a buffer's upcast)."""

    def __init__(self, cin: int = 32, cout: int = 64):
        super().__init__()
        conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.weight = nn.Parameter(conv.weight.detach().half(), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().half(), requires_grad=False)

    def forward(self, x):
        return F.conv2d(x, self.weight.to(torch.float32), self.bias.to(torch.float32), padding=1)

    def fp32(self) -> nn.Module:
        """The same conv with its (fp16-rounded) weights in fp32."""
        conv = nn.Conv2d(self.weight.shape[1], self.weight.shape[0], 3, padding=1)
        conv.weight.data, conv.bias.data = self.weight.float(), self.bias.float()
        return conv.eval()


class HalfCompute(nn.Module):
    """fp32 in, a half conv and linear, LayerNorm in fp32, fp32 out."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3).half(), nn.Linear(8, 6).half()
        self.norm = nn.LayerNorm(6)

    def forward(self, x):
        y = self.fc(torch.relu(self.conv(x.to(torch.float16))).mean(dim=(2, 3)))
        return self.norm(y.to(torch.float32))
