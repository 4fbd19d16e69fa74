"""The PyTorch twin of our `cifar_resnet{depth}` (needs the optional ``torch`` extra).

Same architecture and torchvision's layout (conv1, bn1, layer1..3 of torchvision
BasicBlocks with a 1x1 conv + BN projection where the shape changes, fc), so a state dict of
it converts 1:1 with `torch_import.torch_state_dict_to_nnx(sd, "cifar_resnet{depth}", ...)`.
Used as the import target of PyTorch-trained CIFAR teachers, by the import tests, and as the
reference model of the benchmarks (benchmarks/kd_step.py, benchmarks/grand.py).
"""

from __future__ import annotations


def torch_cifar_resnet(depth: int, num_classes: int, width: float = 1.0):
    """A ``torch.nn.Module`` CIFAR ResNet of depth 6n+2 with 16/32/64 * width channels.

    Input NCHW float32; output logits [B, num_classes]. Default PyTorch initialization.
    """
    import torch
    from torch import nn
    from torchvision.models.resnet import BasicBlock

    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 >= 8, got {depth}")
    n = (depth - 2) // 6
    widths = [max(1, int(round(c * width))) for c in (16, 32, 64)]

    class CifarResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            cin = widths[0]
            for s, (planes, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
                blocks = []
                for i in range(n):
                    st = stride if i == 0 else 1
                    down = None
                    if st != 1 or cin != planes:
                        down = nn.Sequential(nn.Conv2d(cin, planes, 1, st, bias=False),
                                             nn.BatchNorm2d(planes))
                    blocks.append(BasicBlock(cin, planes, st, down))
                    cin = planes
                setattr(self, f"layer{s}", nn.Sequential(*blocks))
            self.fc = nn.Linear(cin, num_classes)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(x.mean(dim=(2, 3)))

    return CifarResNet()
