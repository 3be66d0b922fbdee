"""Models: the seed's MNIST CNN and a CIFAR-10-sized ResNet-18."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from protogalaxy.plugins import import_object

__all__ = [
    "MnistCNN",
    "ResNet18",
    "build_model",
    "model_names",
    "num_parameters",
    "register_model",
    "resolve_model",
]


class MnistCNN(nn.Module):
    """conv 1->10 k5, conv 10->20 k5 (dropout2d), fc 320->50 (dropout), fc 50->10:
    21,840 parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.flatten(start_dim=-3)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        out: torch.Tensor = self.fc2(x)
        return out

    def batched_forward(
        self, params: dict[str, torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        """K copies of this network at once: ``params`` stacked ``(K, ...)``, ``x``
        ``(K, B, 1, 28, 28)``, logits ``(K, B, classes)``.

        The K models become one grouped convolution per conv layer (``groups=K``)
        and one batched matmul per linear layer (channels-last layout), so a single
        autograd pass yields
        every client's gradient (the parameter blocks are disjoint). Same
        arithmetic as ``vmap`` over :meth:`forward`, without its batching overhead.
        """
        k, b = x.shape[0], x.shape[1]
        c1 = x.shape[2]  # input channels
        h = x.transpose(0, 1).reshape(b, k * c1, *x.shape[-2:])
        # oneDNN runs grouped convolutions about twice as fast in channels-last
        # layout; reshape below flattens in logical (C, H, W) order either way.
        h = h.contiguous(memory_format=torch.channels_last)
        w1 = params["conv1.weight"]
        h = F.conv2d(
            h, w1.reshape(-1, *w1.shape[2:]), params["conv1.bias"].reshape(-1), groups=k
        )
        h = F.relu(F.max_pool2d(h, 2))
        w2 = params["conv2.weight"]
        h = F.conv2d(
            h, w2.reshape(-1, *w2.shape[2:]), params["conv2.bias"].reshape(-1), groups=k
        )
        h = F.relu(F.max_pool2d(F.dropout2d(h, training=self.training), 2))
        h = h.reshape(b, k, -1).transpose(0, 1)  # (K, B, 320)
        h = F.relu(
            torch.baddbmm(
                params["fc1.bias"].unsqueeze(1), h, params["fc1.weight"].transpose(1, 2)
            )
        )
        h = F.dropout(h, training=self.training)
        return torch.baddbmm(
            params["fc2.bias"].unsqueeze(1), h, params["fc2.weight"].transpose(1, 2)
        )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), about 11.2M parameters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        out: torch.Tensor = self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return out


_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "mnist_cnn": lambda c: MnistCNN(c),
    "resnet18": lambda c: ResNet18(c),
}


def register_model(name: str, factory: Callable[[int], nn.Module]) -> None:
    """Make ``name`` a model a configuration can name (``model: name``):
    ``factory(num_classes)`` returns a fresh ``torch.nn.Module`` (the classes come
    from the dataset). A name is registered once."""
    if not name or ":" in name:
        raise ValueError(f"a model name is a plain word, got {name!r}")
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = factory


def model_names() -> list[str]:
    """The registered models' names."""
    return sorted(_MODELS)


def resolve_model(name: str) -> Callable[[int], nn.Module]:
    """A registered model's factory, or ``package.module:attr`` imported (a
    ``torch.nn.Module`` class or a factory, called with the number of classes)."""
    if name in _MODELS:
        return _MODELS[name]
    if ":" not in name:
        raise ValueError(
            f"model must be one of {model_names()} or an import path "
            f"'package.module:attr', got {name!r}"
        )
    found = import_object(name, "model")
    if not callable(found):
        raise ValueError(f"model {name!r} is not a class or a factory")
    factory: Callable[[int], nn.Module] = found
    return factory


def build_model(name: str, *, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A freshly initialised model, deterministic in ``seed``: a registered name
    or an import path (see :func:`resolve_model`)."""
    factory = resolve_model(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(num_classes)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} made a {type(model).__name__}, not a Module")
    return model


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
