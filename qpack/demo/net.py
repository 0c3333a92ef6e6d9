"""The demo's networks for 1x28x28 digits: the seed CNN and the two LeNets of Deep Compression.

- :class:`SeedNet`: the seed experiment's CNN (three conv blocks, two linear layers);
- :class:`LeNet300`: LeNet-300-100, fully connected 784-300-100-10 with ReLUs;
- :class:`LeNet5`: Caffe's LeNet as Han et al. ("Deep Compression", ICLR 2016) compress it:
  conv 20 5x5, max-pool, conv 50 5x5, max-pool, fc 500, ReLU, fc 10.

:data:`MODELS` maps the demo's ``--model`` names to the classes. The LeNets start from
Caffe's fillers (:func:`caffe_xavier_`), as the prototxts Deep Compression trained from do;
PyTorch's default (Kaiming-uniform with a = sqrt(5), i.e. bound sqrt(1/fan_in), and non-zero
biases) starts their weights sqrt(3) times smaller.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "LENET5_PARAMETER_COUNT",
    "LENET300_PARAMETER_COUNT",
    "MODELS",
    "MODEL_TITLES",
    "SEED_PARAMETER_COUNT",
    "LeNet5",
    "LeNet300",
    "SeedNet",
    "caffe_xavier_",
]

#: number of parameters of :class:`SeedNet` (buffers not counted)
SEED_PARAMETER_COUNT = 481_214
#: number of parameters of :class:`LeNet300`
LENET300_PARAMETER_COUNT = 266_610
#: number of parameters of :class:`LeNet5`
LENET5_PARAMETER_COUNT = 431_080


def caffe_xavier_(module: nn.Module) -> None:
    """Initialise every conv and linear layer of ``module`` as Caffe's ``xavier`` filler does.

    Caffe's default ``variance_norm: FAN_IN`` draws weights from U(-sqrt(3 / fan_in),
    +sqrt(3 / fan_in)), fan_in = inputs x kernel area; the LeNet prototxts fill biases with 0.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            fan_in = layer.weight[0].numel()
            bound = (3.0 / fan_in) ** 0.5
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound)
                if layer.bias is not None:
                    layer.bias.zero_()


class SeedNet(nn.Module):
    """The CNN of the seed experiment (module names as there, so the state-dict keys match).

    ``layer1``: Conv2d(1, 16, 5, pad 2), BatchNorm2d, ReLU;
    ``layer2``: Conv2d(16, 16, 3, pad 1), BatchNorm2d, ReLU, MaxPool2d(2);
    ``layer3``: Conv2d(16, 32, 3, pad 1), BatchNorm2d, ReLU, MaxPool2d(2);
    ``fc1``: Linear(1568, 300) with no activation after it; ``fc2``: Linear(300, 10).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, 16, kernel_size=5, padding=2), nn.BatchNorm2d(16), nn.ReLU())
        self.layer2 = nn.Sequential(
            nn.Conv2d(16, 16, kernel_size=3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.layer3 = nn.Sequential(
            nn.Conv2d(16, 32, kernel_size=3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.fc1 = nn.Linear(7 * 7 * 32, 300)
        self.fc2 = nn.Linear(300, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch ``(N, 1, 28, 28)`` -> ``(N, num_classes)``."""
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc2(self.fc1(x.flatten(1)))


class LeNet300(nn.Module):
    """LeNet-300-100: ``fc1`` Linear(784, 300), ReLU, ``fc2`` Linear(300, 100), ReLU, ``fc3`` Linear(100, 10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        caffe_xavier_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch ``(N, 1, 28, 28)`` -> ``(N, num_classes)``."""
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


class LeNet5(nn.Module):
    """Caffe's LeNet (the "LeNet-5" of Deep Compression), layer for layer.

    ``conv1`` Conv2d(1, 20, 5) -> MaxPool2d(2) -> ``conv2`` Conv2d(20, 50, 5) -> MaxPool2d(2)
    -> ``fc1`` Linear(800, 500) -> ReLU -> ``fc2`` Linear(500, 10). As in Caffe's
    ``lenet_train_test.prototxt``, the convolutions have no padding and no activation of
    their own (the max-pools follow them directly); the only ReLU is after ``fc1``.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)
        caffe_xavier_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch ``(N, 1, 28, 28)`` -> ``(N, num_classes)``."""
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


#: ``--model`` name -> network class
MODELS: dict[str, type[nn.Module]] = {"seed": SeedNet, "lenet300": LeNet300, "lenet5": LeNet5}

#: ``--model`` name -> the name used in reports
MODEL_TITLES: dict[str, str] = {"seed": "seed CNN", "lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}
