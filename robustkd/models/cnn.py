"""The CIFAR CNNs (ResNet, MobileNetV2, WideResNet), registered in the model registry.

ResNet-18 with a 3x3 stride-1 stem and no max-pool (kuangliu/pytorch-cifar, RSLAD), MobileNetV2
for CIFAR, WRN-34-10 (TRADES; its unused ``sub_block1`` left out); small variants for CPU runs.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from .registry import register_model


# ---------------------------------------------------------------- ResNet (CIFAR)
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks=(2, 2, 2, 2), width=64, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for stage, n in enumerate(blocks):
            planes = width * 2**stage
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(in_planes, num_classes)

    def features(self, x):
        """Penultimate features: the globally pooled output of the last stage."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def head(self, features):
        return self.linear(features)

    def forward(self, x):
        return self.head(self.features(x))


# ---------------------------------------------------------------- MobileNetV2 (CIFAR)
class InvertedResidual(nn.Module):
    def __init__(self, in_planes, out_planes, expansion, stride):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False),
                                          nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    # (expansion, out_planes, num_blocks, stride); second stage stride 1 for CIFAR
    CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=10, width_mult=1.0):
        super().__init__()

        def w(c):
            return max(8, int(round(c * width_mult)))

        self.conv1 = nn.Conv2d(3, w(32), 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w(32))
        layers, in_planes = [], w(32)
        for expansion, out, n, stride in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(in_planes, w(out), expansion, stride if i == 0 else 1))
                in_planes = w(out)
        self.layers = nn.Sequential(*layers)
        self.conv2 = nn.Conv2d(in_planes, w(1280), 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w(1280))
        self.linear = nn.Linear(w(1280), num_classes)

    def features(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def head(self, features):
        return self.linear(features)

    def forward(self, x):
        return self.head(self.features(x))


# ---------------------------------------------------------------- WideResNet
class WideBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal = in_planes == out_planes
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.equal else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, depth=34, widen_factor=10, num_classes=10):
        super().__init__()
        if (depth - 4) % 6:
            raise InputError(f"WideResNet depth must be 6k+4, found {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        blocks = []
        for stage in range(3):
            for i in range(n):
                blocks.append(WideBlock(ch[stage] if i == 0 else ch[stage + 1], ch[stage + 1],
                                        (1 if stage == 0 else 2) if i == 0 else 1))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)

    def features(self, x):
        out = self.blocks(self.conv1(x))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def head(self, features):
        return self.fc(features)

    def forward(self, x):
        return self.head(self.features(x))



register_model("resnet18", lambda num_classes, width=64, blocks=(2, 2, 2, 2):
               ResNet(tuple(blocks), width, num_classes))
register_model("resnet10", lambda num_classes, width=64, blocks=(1, 1, 1, 1):
               ResNet(tuple(blocks), width, num_classes))
register_model("mobilenetv2", lambda num_classes, width_mult=1.0: MobileNetV2(num_classes, width_mult))
register_model("wrn34_10", lambda num_classes, depth=34, widen_factor=10:
               WideResNet(depth, widen_factor, num_classes))
# Small registered variants for CPU runs.
register_model("resnet10_w8", lambda num_classes: ResNet((1, 1, 1, 1), 8, num_classes))
register_model("resnet10_w16", lambda num_classes: ResNet((1, 1, 1, 1), 16, num_classes))
register_model("resnet18_w16", lambda num_classes: ResNet((2, 2, 2, 2), 16, num_classes))
register_model("wrn16_2", lambda num_classes: WideResNet(16, 2, num_classes))
