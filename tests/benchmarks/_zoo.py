"""The zoo of bench_zoo.py: networks, training recipes, data, evaluation and the checkpoint cache.

Nine MNIST networks and a character-level transformer, each trained once with a recipe of
the kind their authors publish (SGD with momentum, Adam, AdamW; weight decay, L1 or
neither; random affine augmentation or none) and cached outside the repository as a plain
state dict (``NAME.pt``, ``torch.save``) next to ``NAME.json`` (the recipe, the parameter
count, the fp32 test metric, the training time).

Nothing here imports qpack: the networks and the evaluation are plain torch, so a state
dict from any source can be scored with :func:`evaluate`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "DEFAULT_CACHE",
    "ZOO",
    "Entry",
    "Recipe",
    "build",
    "cache_dir",
    "evaluate",
    "load_checkpoint",
    "load_mnist",
    "load_text",
    "train_entry",
]

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
DEFAULT_CACHE = Path("/work/zoo-cache")
DEFAULT_MNIST = REPO.parent / "shared" / "data" / "mnist"
Log = Callable[[str], None]

# ---------------------------------------------------------------------------------- networks

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class MLP(nn.Module):
    """784-512-256-10 with ReLU (and dropout 0.2 in training), inputs standardised."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 512), nn.Linear(512, 256), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x - MNIST_MEAN) / MNIST_STD).flatten(1)
        x = F.dropout(F.relu(self.fc1(x)), 0.2, self.training)
        x = F.dropout(F.relu(self.fc2(x)), 0.2, self.training)
        return self.fc3(x)


class LeNet300(nn.Module):
    """LeNet-300-100: 784-300-100-10, ReLU, raw [0, 1] inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 300), nn.Linear(300, 100), nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class LeNet5Classic(nn.Module):
    """LeCun 1998 layout on 32x32 (28x28 zero-padded by 2): C1 6@5x5, S2 avg-pool, C3 16@5x5,
    S4 avg-pool, C5 120@5x5 (a conv: 48 k weights), F6 84, output 10; tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c3, self.c5 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5), nn.Conv2d(16, 120, 5)
        self.f6, self.out = nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad((x - MNIST_MEAN) / MNIST_STD, (2, 2, 2, 2), value=-MNIST_MEAN / MNIST_STD)
        x = F.avg_pool2d(torch.tanh(self.c1(x)), 2)
        x = F.avg_pool2d(torch.tanh(self.c3(x)), 2)
        x = torch.tanh(self.c5(x)).flatten(1)
        return self.out(torch.tanh(self.f6(x)))


class LeNet5Pad(nn.Module):
    """The PyTorch-tutorial LeNet-5 on 28x28: conv1 6@5x5 padding 2 (padded-28), ReLU, max-pool,
    conv2 16@5x5, max-pool, fc1 400-120, fc2 120-84, fc3 84-10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet5Valid(nn.Module):
    """LeNet-5 on unpadded 28x28 (a 16x4x4 = 256-wide fc1), ReLU, max-pool, dropout before fc3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(256, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - MNIST_MEAN) / MNIST_STD
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
        x = F.dropout(F.relu(self.fc2(F.relu(self.fc1(x)))), 0.25, self.training)
        return self.fc3(x)


class CaffeLeNet(nn.Module):
    """Caffe's ``lenet_train_test.prototxt``: conv1 20@5x5, pool, conv2 50@5x5, pool, ip1 800-500,
    ReLU, ip2 500-10 (no activation on the convolutions), inputs scaled by 1/256 as Caffe does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.ip1, self.ip2 = nn.Linear(800, 500), nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x * (255.0 / 256.0)), 2)
        x = F.max_pool2d(self.conv2(x), 2).flatten(1)
        return self.ip2(F.relu(self.ip1(x)))


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution without bias, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyBN(nn.Module):
    """A BN CNN under 30 k parameters: 16@28, pool, 32@14, pool, 32@7, 48@7, global average, fc 48-10."""

    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2, self.b3, self.b4 = conv_bn(1, 16), conv_bn(16, 32), conv_bn(32, 32), conv_bn(32, 48)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.b1((x - MNIST_MEAN) / MNIST_STD), 2)
        x = F.max_pool2d(self.b2(x), 2)
        x = self.b4(self.b3(x))
        return self.fc(x.mean((2, 3)))


class BNNet(nn.Module):
    """A Keras-example style BN CNN: 16@28, pool, 32@14, pool, fc 1568-128 with BatchNorm1d, fc 128-10."""

    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2 = conv_bn(1, 16), conv_bn(16, 32)
        self.fc1, self.bn_fc = nn.Linear(32 * 7 * 7, 128, bias=False), nn.BatchNorm1d(128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.b1((x - MNIST_MEAN) / MNIST_STD), 2)
        x = F.max_pool2d(self.b2(x), 2).flatten(1)
        x = F.dropout(F.relu(self.bn_fc(self.fc1(x))), 0.3, self.training)
        return self.fc2(x)


class Block(nn.Module):
    """A ResNet basic block: two 3x3 conv-BN, identity or 1x1-conv-BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet14(nn.Module):
    """A small ResNet (14 weight layers): stem 16@28 + max-pool, three stages of two blocks
    (16@14, 32@7, 64@4), global average, fc 64-10."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16)
        self.layer1 = nn.Sequential(Block(16, 16, 1), Block(16, 16, 1))
        self.layer2 = nn.Sequential(Block(16, 32, 2), Block(32, 32, 1))
        self.layer3 = nn.Sequential(Block(32, 64, 2), Block(64, 64, 1))
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.stem((x - MNIST_MEAN) / MNIST_STD), 2)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20 on MNIST: a 3x3 stem at 16, three stages of three basic
    blocks (16@28, 32@14, 64@7; 1x1-conv shortcuts where the shape changes), global average,
    fc 64-10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        stages, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            stages.append(nn.Sequential(Block(cin, cout, stride), Block(cout, cout, 1), Block(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1((x - MNIST_MEAN) / MNIST_STD)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(x.mean((2, 3)))


class MobileNetDW(nn.Module):
    """A MobileNet-v1 style CNN: a 3x3 stem, four depthwise-separable blocks (3x3 depthwise
    conv-BN-ReLU6, 1x1 pointwise conv-BN-ReLU6; 16-32-64-64-128, two of stride 2), global
    average, fc 128-10. Depthwise filters have 9 weights per channel, of very different
    ranges: the known hard case for one grid per tensor."""

    def __init__(self) -> None:
        super().__init__()

        def unit(cin: int, cout: int, kernel: int, stride: int, groups: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU6())

        widths = ((16, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2))
        self.stem = unit(1, 16, 3, 1, 1)
        self.blocks = nn.Sequential(*(nn.Sequential(unit(cin, cin, 3, stride, cin), unit(cin, cout, 1, 1, 1))
                                      for cin, cout, stride in widths))
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem((x - MNIST_MEAN) / MNIST_STD))
        return self.fc(x.mean((2, 3)))


class ExamplesNet(nn.Module):
    """pytorch/examples' MNIST network (mnist/main.py): conv 32@3x3, conv 64@3x3, max-pool,
    dropout 0.25, fc 9216-128 (1.18 M of its 1.2 M weights), dropout 0.5, fc 128-10, ReLU,
    inputs standardised."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1((x - MNIST_MEAN) / MNIST_STD))))
        x = F.dropout(F.max_pool2d(x, 2), 0.25, self.training).flatten(1)
        return self.fc2(F.dropout(F.relu(self.fc1(x)), 0.5, self.training))


class VGGBN(nn.Module):
    """A VGG-style BN CNN: two 3x3 conv-BN-ReLU at 32, max-pool, two at 64, max-pool, fc
    3136-256 with dropout 0.5, fc 256-10 (a flattened head, 0.87 M parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(1, 32), conv_bn(32, 32), nn.MaxPool2d(2),
                                      conv_bn(32, 64), conv_bn(64, 64), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(64 * 49, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features((x - MNIST_MEAN) / MNIST_STD).flatten(1))


class TinyBN15k(nn.Module):
    """A narrower BN CNN (15 k parameters): 8@28, pool, 16@14, pool, 32@7, 32@7, global
    average, fc 32-10."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3, self.c4 = conv_bn(1, 8), conv_bn(8, 16), conv_bn(16, 32), conv_bn(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.c1((x - MNIST_MEAN) / MNIST_STD), 2)
        x = F.max_pool2d(self.c2(x), 2)
        return self.head(self.c4(self.c3(x)).mean((2, 3)))


class GNNet(nn.Module):
    """5x5 convs 32 and 64 with GroupNorm (8 groups) and max-pools, fc 3136-128-10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(1, 32, 5, padding=2), nn.GroupNorm(8, 32)
        self.conv2, self.gn2 = nn.Conv2d(32, 64, 5, padding=2), nn.GroupNorm(8, 64)
        self.fc1, self.fc2 = nn.Linear(64 * 49, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.gn1(self.conv1((x - MNIST_MEAN) / MNIST_STD))), 2)
        x = F.max_pool2d(F.relu(self.gn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class TutorialNet(nn.Module):
    """The older pytorch/examples MNIST network (21 k parameters): conv 10@5x5, conv 20@5x5
    with Dropout2d, max-pools, fc 320-50 with dropout, fc 50-10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 10, 5), nn.Conv2d(10, 20, 5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1, self.fc2 = nn.Linear(320, 50), nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1((x - MNIST_MEAN) / MNIST_STD), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        return self.fc2(F.dropout(F.relu(self.fc1(x.flatten(1))), training=self.training))


class DeepBN(nn.Module):
    """Six 3x3 conv-BN-ReLU (24, 24/2, 48, 48/2, 64, 64/2: strided, no pooling), a flattened
    fc 1024-10."""

    def __init__(self) -> None:
        super().__init__()
        chans = [(1, 24, 1), (24, 24, 2), (24, 48, 1), (48, 48, 2), (48, 64, 1), (64, 64, 2)]
        self.body = nn.Sequential(*[conv_bn(a, b, stride) for a, b, stride in chans])
        self.out = nn.Linear(64 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body((x - MNIST_MEAN) / MNIST_STD).flatten(1))


class CharTransformer(nn.Module):
    """A GPT-style character model: token and position embeddings, pre-norm blocks (causal
    self-attention, GELU MLP), a final LayerNorm and an untied output layer."""

    def __init__(self, vocab: int = 96, d_model: int = 128, layers: int = 3, heads: int = 4, context: int = 128) -> None:
        super().__init__()
        self.context, self.heads = context, heads
        self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "ln1": nn.LayerNorm(d_model), "qkv": nn.Linear(d_model, 3 * d_model), "proj": nn.Linear(d_model, d_model),
                "ln2": nn.LayerNorm(d_model), "fc": nn.Linear(d_model, 4 * d_model), "out": nn.Linear(4 * d_model, d_model),
            }))
        self.ln_f, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk["proj"](y.transpose(1, 2).reshape(b, t, -1))
            x = x + blk["out"](F.gelu(blk["fc"](blk["ln2"](x))))
        return self.head(self.ln_f(x))


ARCHS: dict[str, tuple[type[nn.Module], str]] = {
    "mlp": (MLP, "MLP 784-512-256-10, dropout 0.2"),
    "lenet300": (LeNet300, "LeNet-300-100"),
    "lenet5_classic": (LeNet5Classic, "LeNet-5 (LeCun 1998) on 32x32 (28 padded by 2), tanh, avg-pool, C5 conv"),
    "lenet5_pad": (LeNet5Pad, "LeNet-5 on padded 28x28 (conv1 padding 2), ReLU, max-pool, fc 400-120-84-10"),
    "lenet5_valid": (LeNet5Valid, "LeNet-5 on unpadded 28x28, fc 256-120-84-10, dropout"),
    "caffe_lenet": (CaffeLeNet, "Caffe LeNet-5 (20-50-500)"),
    "tiny_bn": (TinyBN, "BN CNN 16-32-32-48, global average pool (< 30 k parameters)"),
    "bn_cnn": (BNNet, "BN CNN 16-32, fc 1568-128 with BatchNorm1d, dropout"),
    "resnet14": (ResNet14, "ResNet-14 (3 stages x 2 basic blocks, 16-32-64), BN, skip connections"),
    "mobilenet_dw": (MobileNetDW, "MobileNet-v1 style: depthwise-separable blocks 16-32-64-64-128, BN, ReLU6"),
    "examples_net": (ExamplesNet, "pytorch/examples MNIST net: conv 32-64, fc 9216-128-10, dropout"),
    "vgg_bn": (VGGBN, "VGG-style BN CNN 32-32-64-64, fc 3136-256-10 with dropout"),
    "tiny_bn15k": (TinyBN15k, "BN CNN 8-16-32-32, global average pool (15 k parameters)"),
    "gn_net": (GNNet, "5x5 CNN 32-64 with GroupNorm, fc 3136-128-10"),
    "tutorial_net": (TutorialNet, "older pytorch/examples MNIST net: conv 10-20 (5x5), fc 320-50-10, dropout"),
    "deep_bn": (DeepBN, "six strided conv-BN layers 24-24-48-48-64-64, flattened fc 1024-10"),
    "resnet20": (ResNet20, "CIFAR-style ResNet-20 (3 stages x 3 basic blocks, 16-32-64), 1x1 shortcuts"),
    "char_transformer": (CharTransformer, "char transformer: 3 pre-norm layers, d_model 128, 4 heads, context 128"),
}


def build(arch: str) -> nn.Module:
    """A fresh network of architecture ``arch`` (a key of :data:`ARCHS`)."""
    return ARCHS[arch][0]()


# ---------------------------------------------------------------------------------- recipes

@dataclass(frozen=True)
class Recipe:
    """How one network is trained.

    Attributes:
        optimizer: ``sgd`` (momentum), ``adam``, ``adamw`` or ``adadelta``.
        lr: peak learning rate.
        epochs: passes over the 60 k training images (the transformer: ``steps`` instead).
        batch: batch size.
        momentum: SGD momentum; ``nesterov``.
        weight_decay: L2 (SGD, Adam) or decoupled (AdamW).
        l1: weight of ``sum |w|`` over the weight tensors (>= 2 dims) added to the loss.
        augment: random affine per image (rotation, scale, shift), via ``affine_grid``.
        schedule: ``onecycle``, ``cosine``, ``step`` (x0.1 at 2/3), ``epoch0.7`` (x0.7 each
            epoch, pytorch/examples' StepLR) or ``const``.
        label_smoothing: cross-entropy label smoothing.
        steps: transformer training steps; ``seed``: torch seed.
    """

    optimizer: str
    lr: float
    epochs: int = 3
    batch: int = 128
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    l1: float = 0.0
    augment: bool = False
    schedule: str = "onecycle"
    label_smoothing: float = 0.0
    steps: int = 0
    seed: int = 0


@dataclass(frozen=True)
class Entry:
    """One network of the zoo: its cache name, architecture, recipe and metric."""

    name: str
    arch: str
    recipe: Recipe
    metric: str = "accuracy"  # or "loss" (nats per character)
    notes: str = ""

    @property
    def title(self) -> str:
        return ARCHS[self.arch][1]


ZOO: tuple[Entry, ...] = (
    Entry("mlp_sgd", "mlp", Recipe("sgd", 0.05, epochs=4, nesterov=True, weight_decay=5e-4, schedule="cosine")),
    Entry("lenet300_adam", "lenet300", Recipe("adam", 1e-3, epochs=3, batch=100, schedule="const")),
    Entry("lenet5_classic_sgd_aug", "lenet5_classic",
          Recipe("sgd", 0.05, epochs=2, weight_decay=1e-4, augment=True, schedule="step")),
    Entry("lenet5_pad_adam_l1", "lenet5_pad", Recipe("adam", 2e-3, epochs=2, l1=2e-5, schedule="cosine")),
    Entry("lenet5_valid_sgd", "lenet5_valid", Recipe("sgd", 0.02, epochs=2, batch=64, schedule="const")),
    Entry("caffe_lenet_sgd", "caffe_lenet", Recipe("sgd", 0.01, epochs=1, batch=64, weight_decay=5e-4, schedule="step"),
          notes="Caffe's solver: lr 0.01, momentum 0.9, weight decay 5e-4, batch 64"),
    Entry("tiny_bn_adamw_aug", "tiny_bn", Recipe("adamw", 3e-3, epochs=1, weight_decay=1e-2, augment=True)),
    Entry("bn_cnn_adam_ls", "bn_cnn", Recipe("adam", 2e-3, epochs=1, weight_decay=1e-4, label_smoothing=0.1)),
    Entry("resnet14_sgd", "resnet14", Recipe("sgd", 0.1, epochs=1, nesterov=True, weight_decay=5e-4)),
    Entry("examples_net_adadelta", "examples_net", Recipe("adadelta", 1.0, epochs=3, batch=64, schedule="epoch0.7"),
          notes="pytorch/examples' recipe (Adadelta lr 1.0, x0.7 a epoch, batch 64), 3 of its 14 epochs"),
    Entry("mobilenet_dw_sgd_aug", "mobilenet_dw",
          Recipe("sgd", 0.1, epochs=2, nesterov=True, weight_decay=4e-5, augment=True, schedule="cosine"),
          notes="MobileNet's small weight decay (4e-5)"),
    # added in the fourteenth session, trained first as a held-out check of the allocation
    Entry("vgg_bn_sgd", "vgg_bn", Recipe("sgd", 0.05, epochs=2, weight_decay=5e-4, schedule="cosine")),
    Entry("tiny_bn15k_sgd", "tiny_bn15k", Recipe("sgd", 0.1, epochs=3, nesterov=True, weight_decay=5e-4)),
    Entry("gn_net_adamw", "gn_net", Recipe("adamw", 1e-3, epochs=2, weight_decay=0.05, augment=True, schedule="cosine")),
    Entry("tutorial_net_sgd", "tutorial_net", Recipe("sgd", 0.01, epochs=5, batch=64, momentum=0.5, schedule="const"),
          notes="the older pytorch/examples recipe: SGD lr 0.01, momentum 0.5, batch 64"),
    Entry("deep_bn_adam", "deep_bn",
          Recipe("adam", 1e-3, epochs=2, batch=256, weight_decay=1e-4, augment=True, schedule="step")),
    Entry("resnet20_sgd", "resnet20", Recipe("sgd", 0.1, epochs=1, weight_decay=1e-4),
          notes="trained after the pooled-conv weight was chosen, as a check"),
    Entry("char_transformer_adamw", "char_transformer",
          Recipe("adamw", 2e-3, batch=16, weight_decay=0.1, schedule="cosine", steps=700), metric="loss",
          notes="Python 3.11 standard-library sources; last 10 % of the text held out"),
)


def find(name: str) -> Entry:
    """The :data:`ZOO` entry called ``name``."""
    for entry in ZOO:
        if entry.name == name:
            return entry
    raise KeyError(f"no zoo network {name!r}; choose from {', '.join(e.name for e in ZOO)}")


# ---------------------------------------------------------------------------------- data

def load_mnist(folder: str | os.PathLike[str] = DEFAULT_MNIST) -> tuple[torch.Tensor, ...]:
    """The full MNIST sets via ``qpack.demo.mnist``: ``(train_x, train_y, test_x, test_y)``, 60 k and 10 k."""
    from qpack.demo.mnist import load_mnist_folder

    data = load_mnist_folder(folder)
    if len(data.train_y) != 60000 or len(data.eval_y) != 10000:
        raise SystemExit(f"{folder}: expected the 60,000 training and 10,000 test images ({data.info['description']})")
    return data.train_x, data.train_y, data.eval_x, data.eval_y


#: characters the transformer sees: printable ASCII plus newline; the rest are dropped
TEXT_VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
TEXT_CHARS = 2_000_000
TEXT_TEST_SHARE = 0.1


def load_text() -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Python's own standard library sources (sorted ``*.py`` in its top folder), ASCII only, the
    first :data:`TEXT_CHARS` characters; split by position: the last 10 % is the test text.

    Returns:
        ``(train_ids, test_ids, info)``: int64 tensors of character ids and a description.
    """
    import sysconfig

    folder = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(folder.glob("*.py"))
    table = np.full(256, -1, dtype=np.int64)
    for i, ch in enumerate(TEXT_VOCAB):
        table[ord(ch)] = i
    parts, total, used = [], 0, []
    for path in files:
        raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        ids = table[raw]
        ids = ids[ids >= 0]
        parts.append(ids)
        used.append(path.name)
        total += ids.size
        if total >= TEXT_CHARS:
            break
    text = np.concatenate(parts)[:TEXT_CHARS]
    split = int(len(text) * (1 - TEXT_TEST_SHARE))
    info = {"source": str(folder), "files": len(used), "first": used[0], "last": used[-1],
            "chars": int(len(text)), "train_chars": split, "test_chars": int(len(text) - split)}
    return torch.from_numpy(text[:split].copy()), torch.from_numpy(text[split:].copy()), info


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine per image: rotation +-10 degrees, scale 0.9..1.1, shift +-2 pixels."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=generator) * 2 - 1
    angle, scale = u[:, 0] * math.radians(10), 1 + 0.1 * u[:, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * 2 / 14], 1), torch.stack([sin, cos, u[:, 3] * 2 / 14], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


# ---------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(arch: str, state: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Score a state dict of architecture ``arch`` on held-out data.

    Args:
        arch: a key of :data:`ARCHS` (an entry's ``arch``).
        state: the state dict (loaded strictly).
        data: ``(test_x, test_y)`` for MNIST networks (the full 10 k test set from :func:`load_mnist`),
            ``(test_ids, None)`` for the transformer (from :func:`load_text`).

    Returns:
        Test accuracy in [0, 1] for MNIST networks; mean test loss in nats per character for
        the transformer (windows of its context length, every position scored).
    """
    net = build(arch)
    net.load_state_dict(state)
    net.eval()
    x, y = data
    if arch == "char_transformer":
        ctx = net.context
        n = (len(x) - 1) // ctx
        inputs, targets = x[: n * ctx].view(n, ctx), x[1 : n * ctx + 1].view(n, ctx)
        total = 0.0
        for i in range(0, n, 64):
            logits = net(inputs[i : i + 64])
            total += F.cross_entropy(logits.flatten(0, 1), targets[i : i + 64].flatten(), reduction="sum").item()
        return total / (n * ctx)
    right = correct_images(net, x, y)
    return float(right.sum()) / len(y)


def correct_images(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Which test images ``net`` classifies right (bool per image, for paired comparisons)."""
    right = [(net(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).numpy() for i in range(0, len(y), 1000)]
    return np.concatenate(right)


@torch.no_grad()
def evaluate_images(arch: str, state: dict[str, torch.Tensor], data: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    """:func:`evaluate`'s per-image answer for an MNIST network: right or wrong, per test image."""
    net = build(arch)
    net.load_state_dict(state)
    net.eval()
    return correct_images(net, *data)


@torch.no_grad()
def log_probabilities(arch: str, state: dict[str, torch.Tensor], images: torch.Tensor) -> np.ndarray:
    """An MNIST network's log-softmax per image (rows) and class, float64 (for :func:`kl_divergence`)."""
    net = build(arch)
    net.load_state_dict(state)
    net.eval()
    return np.concatenate([F.log_softmax(net(images[i : i + 1000]).double(), 1).numpy()
                           for i in range(0, len(images), 1000)])


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean KL(reference || other) over images, in nats, of two :func:`log_probabilities`.

    How far a quantized network's answers moved from fp32's on every image, not only on the
    few whose top class flips: it separates files that score the same to within a few images.
    """
    return float((np.exp(reference) * (reference - other)).sum(1).mean())


# ---------------------------------------------------------------------------------- training

def _optimizer(net: nn.Module, r: Recipe) -> torch.optim.Optimizer:
    if r.optimizer == "sgd":
        return torch.optim.SGD(net.parameters(), lr=r.lr, momentum=r.momentum, nesterov=r.nesterov,
                               weight_decay=r.weight_decay)
    if r.optimizer == "adam":
        return torch.optim.Adam(net.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    if r.optimizer == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    if r.optimizer == "adadelta":
        return torch.optim.Adadelta(net.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    raise ValueError(f"unknown optimizer {r.optimizer}")


def _scheduler(opt: torch.optim.Optimizer, r: Recipe, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    if r.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr, total_steps=total, pct_start=0.25)
    if r.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    if r.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, max(1, 2 * total // 3), 0.1)
    if r.schedule == "epoch0.7":
        return torch.optim.lr_scheduler.StepLR(opt, max(1, total // max(r.epochs, 1)), 0.7)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _l1(net: nn.Module) -> torch.Tensor:
    return torch.stack([p.abs().sum() for p in net.parameters() if p.dim() >= 2]).sum()


def train_entry(entry: Entry, mnist: tuple[torch.Tensor, ...] | None, text: tuple | None, log: Log) -> tuple[dict, float]:
    """Train ``entry`` from its seed; returns ``(state dict, seconds)``."""
    r = entry.recipe
    torch.manual_seed(r.seed)
    generator = torch.Generator().manual_seed(r.seed + 1)
    net = build(entry.arch)
    opt = _optimizer(net, r)
    started = time.perf_counter()
    net.train()
    if entry.metric == "loss":
        train_ids = text[0]
        ctx = net.context
        sched = _scheduler(opt, r, r.steps)
        warm = 100
        for step in range(r.steps):
            for group in opt.param_groups:  # linear warm-up before the cosine
                if step < warm:
                    group["lr"] = r.lr * (step + 1) / warm
            start = torch.randint(0, len(train_ids) - ctx - 1, (r.batch,), generator=generator)
            idx = start[:, None] + torch.arange(ctx + 1)
            chunk = train_ids[idx]
            logits = net(chunk[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            if step >= warm:
                sched.step()
            if step % 250 == 0 or step == r.steps - 1:
                log(f"    {entry.name}: step {step}/{r.steps} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
    else:
        x, y = mnist[0], mnist[1]
        steps = (len(y) + r.batch - 1) // r.batch
        sched = _scheduler(opt, r, steps * r.epochs)
        for epoch in range(r.epochs):
            order = torch.randperm(len(y), generator=generator)
            seen, total_loss = 0, 0.0
            for idx in order.split(r.batch):
                xb, yb = x[idx], y[idx]
                if r.augment:
                    xb = augment(xb, generator)
                loss = F.cross_entropy(net(xb), yb, label_smoothing=r.label_smoothing)
                total_loss += loss.item() * len(idx)
                if r.l1:
                    loss = loss + r.l1 * _l1(net)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                seen += len(idx)
            log(f"    {entry.name}: epoch {epoch + 1}/{r.epochs} loss {total_loss / seen:.4f} "
                f"({time.perf_counter() - started:.0f} s)")
    net.eval()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return state, time.perf_counter() - started


# ---------------------------------------------------------------------------------- cache

def cache_dir(option: str | None = None) -> Path:
    """The cache folder: ``option`` (``--cache``), else ``$QPACK_ZOO``, else :data:`DEFAULT_CACHE`."""
    if option:
        return Path(option)
    return Path(os.environ["QPACK_ZOO"]) if os.environ.get("QPACK_ZOO") else DEFAULT_CACHE


def add_cache_arguments(parser: Any, only_help: str = "comma-separated zoo names (default all)") -> None:
    """``--cache``, ``--data`` and ``--only``, as the scripts that read the cached zoo take them."""
    parser.add_argument("--cache", default=None, help="the zoo's checkpoint folder (default $QPACK_ZOO or /work/zoo-cache)")
    parser.add_argument("--data", default=str(DEFAULT_MNIST), help="MNIST folder (60 k + 10 k)")
    parser.add_argument("--only", help=only_help)


def cached_entries(cache: str | None, wanted: set[str] | None) -> tuple[Path, list[Entry]] | None:
    """The cache folder and the zoo's entries named in ``wanted`` (None: all); None, after
    an error line on stderr, when the cache lacks one of their checkpoints."""
    folder = cache_dir(cache)
    entries = [e for e in ZOO if wanted is None or e.name in wanted]
    missing = [e.name for e in entries if not (folder / f"{e.name}.pt").is_file()]
    if missing:
        print(f"error: not in {folder}: {', '.join(missing)} (run bench_zoo.py --train-only)", file=sys.stderr)
        return None
    return folder, entries


def load_checkpoint(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(state dict, its JSON)`` from the cache, or None when either file is missing or the recipe changed."""
    pt, meta_path = folder / f"{name}.pt", folder / f"{name}.json"
    if not (pt.is_file() and meta_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    entry = find(name)
    if meta.get("recipe") != asdict(entry.recipe) or meta.get("arch") != entry.arch:
        return None
    return torch.load(pt, map_location="cpu", weights_only=True), meta


def save_checkpoint(folder: Path, entry: Entry, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``NAME.pt`` and ``NAME.json`` (each to a temporary name first, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path, write in ((folder / f"{entry.name}.pt", lambda p: torch.save(state, p)),
                        (folder / f"{entry.name}.json", lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))):
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        os.replace(tmp, path)


def parameters(state: dict[str, torch.Tensor]) -> int:
    """Elements of the floating-point tensors (BN running statistics included, counters not)."""
    return sum(t.numel() for t in state.values() if t.is_floating_point())


if __name__ == "__main__":  # a quick look at one network's speed: python _zoo.py NAME
    torch.set_num_threads(1)
    e = find(sys.argv[1])
    print(e, sum(p.numel() for p in build(e.arch).parameters()))
