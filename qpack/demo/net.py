"""The seed network: three conv blocks and two linear layers for 1x28x28 digits."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SEED_PARAMETER_COUNT", "SeedNet"]

#: number of parameters of :class:`SeedNet` (buffers not counted)
SEED_PARAMETER_COUNT = 481_214


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
