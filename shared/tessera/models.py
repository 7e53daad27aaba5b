"""Built-in model zoo, user models by import path, and the flat parameter vector exchanged each round.

Contracts
---------
- :class:`ModelSpec` names an architecture and its keyword arguments; :func:`build_model` turns it into a
  fresh ``torch.nn.Module`` (random initial weights from torch's global generator: seed it, or load weights).
  Built-in names:

  - ``"mlp"``: ``input_dim`` (int), ``num_classes`` (int), ``hidden`` (list of ints, default ``[64]``),
    ``activation`` (``"relu"`` | ``"tanh"``, default relu). Inputs of any shape are flattened first.
  - ``"cnn28"``: for ``N × 1 × 28 × 28`` images: two 3×3 conv blocks (conv → GroupNorm → ReLU → 2×2 max-pool)
    and two linear layers. ``num_classes`` (default 10), ``channels`` (two ints, default ``[16, 32]``),
    ``hidden`` (int, default 64), ``groups`` (GroupNorm groups, default 4; 0 disables normalisation),
    ``activation`` (``"relu"`` | ``"tanh"``, default relu; bounded activations are said to suit DP-SGD better,
    Papernot et al. 2021).
    GroupNorm, not BatchNorm: BatchNorm mixes examples in a batch, which DP-SGD (Opacus) cannot allow.
  - ``"import:package.module:factory"``: ``factory(**kwargs)`` must return an ``nn.Module``. The spec arrives
    from the curator, so an import spec is only built when ``package.module:factory`` is in the caller's
    ``allowed_imports`` (the participant's own configuration); otherwise it is refused.

- **Parameter order.** :func:`flatten_parameters` concatenates the trainable parameters (``requires_grad``) in
  ``model.named_parameters()`` order (= their ``state_dict`` order), each flattened in row-major order, as
  float32. :func:`load_flat_parameters` is its exact inverse. Buffers (e.g. BatchNorm running statistics) are
  not exchanged. Opacus' wrapper prefixes names with ``_module.``; pass the unwrapped module (this module
  refuses names with that prefix so a wrapped model cannot silently change the order or fingerprint).
- :func:`model_fingerprint` is SHA-256 over the spec's name, its canonical-JSON kwargs, and the ordered
  trainable parameter names and shapes.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from collections.abc import Collection
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator
from torch import nn

from tessera.errors import ConfigurationError, LocalUsageError

_IMPORT_RE = re.compile(r"^import:([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*):([A-Za-z_]\w*)$")
BUILTIN_MODELS = ("mlp", "cnn28")


class ModelSpec(BaseModel):
    """Which architecture to build: ``name`` (a built-in or ``import:package.module:factory``) and kwargs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description='"mlp", "cnn28" or "import:package.module:factory"')
    kwargs: dict[str, JsonValue] = Field(
        default_factory=dict, description="Keyword arguments of the factory."
    )

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str) -> str:
        if v not in BUILTIN_MODELS and not _IMPORT_RE.match(v):
            raise ValueError(
                f"unknown model {v!r}; use one of {BUILTIN_MODELS} or 'import:package.module:factory'"
            )
        return v

    @property
    def import_target(self) -> str | None:
        """``package.module:factory`` for an import spec, else ``None``."""
        return self.name.removeprefix("import:") if self.name.startswith("import:") else None

    def canonical_json(self) -> str:
        """Name and kwargs as canonical JSON (sorted keys, no spaces): the spec's identity."""
        return json.dumps({"name": self.name, "kwargs": self.kwargs}, sort_keys=True, separators=(",", ":"))


class MLP(nn.Module):
    """Flatten → (Linear → activation)* → Linear: a multilayer perceptron for tabular data."""

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        hidden: list[int] | tuple[int, ...] = (64,),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        acts: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}
        if activation not in acts:
            raise ConfigurationError(f"mlp activation must be relu or tanh, got {activation!r}")
        _positive(
            "mlp",
            input_dim=input_dim,
            num_classes=num_classes,
            **{f"hidden[{i}]": h for i, h in enumerate(hidden)},
        )
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_dim
        for h in hidden:
            layers += [nn.Linear(width, h), acts[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class CNN28(nn.Module):
    """Two conv blocks (3×3 conv → GroupNorm → activation → 2×2 max-pool) and two linear layers, for
    1×28×28."""

    def __init__(
        self,
        num_classes: int = 10,
        channels: list[int] | tuple[int, int] = (16, 32),
        hidden: int = 64,
        groups: int = 4,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        acts: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}
        if activation not in acts:
            raise ConfigurationError(f"cnn28 activation must be relu or tanh, got {activation!r}")
        act = acts[activation]
        if len(channels) != 2:
            raise ConfigurationError(f"cnn28 channels must be two integers, got {channels}")
        c1, c2 = channels
        _positive("cnn28", num_classes=num_classes, c1=c1, c2=c2, hidden=hidden)
        if groups < 0 or (groups and (c1 % groups or c2 % groups)):
            raise ConfigurationError(
                f"cnn28 groups={groups} must be 0 or divide both channel counts {c1}, {c2}"
            )

        def block(cin: int, cout: int) -> list[nn.Module]:
            norm: list[nn.Module] = [nn.GroupNorm(groups, cout)] if groups else []
            return [nn.Conv2d(cin, cout, 3), *norm, act(), nn.MaxPool2d(2)]

        # 28 → conv 26 → pool 13 → conv 11 → pool 5
        self.features = nn.Sequential(*block(1, c1), *block(c1, c2))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 5 * 5, hidden), act(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.features(x))
        return out


def _positive(model: str, **values: int) -> None:
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigurationError(f"{model}: {k} must be a positive integer, got {v!r}")


def build_model(spec: ModelSpec, *, allowed_imports: Collection[str] = ()) -> nn.Module:
    """Build a fresh model for ``spec``.

    Raises:
        ConfigurationError: bad kwargs for a built-in model, an import spec not in ``allowed_imports``
            (add ``package.module:factory`` to the participant's configuration if you trust it), a module or
            factory that cannot be imported, or a factory that does not return an ``nn.Module``.
    """
    kwargs: dict[str, Any] = dict(spec.kwargs)
    target = spec.import_target
    if target is None:
        cls: type[nn.Module] = MLP if spec.name == "mlp" else CNN28
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigurationError(f"model {spec.name!r}: bad kwargs {sorted(kwargs)}: {exc}") from exc
    if target not in allowed_imports:
        raise ConfigurationError(
            f"model {target!r} is not in this participant's allowed imports {sorted(allowed_imports)}; "
            "add it to the configuration if you trust that code"
        )
    module_name, factory_name = target.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"cannot import model factory {target!r}: {exc}") from exc
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigurationError(
            f"model factory {target!r} returned {type(model).__name__}, not an nn.Module"
        )
    return model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the trainable parameters, in the exchange order.

    Raises:
        LocalUsageError: the model is wrapped by Opacus (names start with ``_module.``): pass
            ``wrapped._module``.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if any(n.startswith("_module.") for n, _ in params):
        raise LocalUsageError(
            "model is wrapped by Opacus (parameter names start with '_module.'); pass ._module"
        )
    return params


def flatten_parameters(model: nn.Module) -> npt.NDArray[np.float32]:
    """The trainable parameters as one float32 vector, in the documented order (a copy)."""
    with torch.no_grad():
        parts = [p.detach().reshape(-1).to(torch.float32).cpu() for _, p in trainable_parameters(model)]
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return torch.cat(parts).numpy().copy()


def load_flat_parameters(model: nn.Module, vec: npt.ArrayLike) -> None:
    """Copy a flat vector (as made by :func:`flatten_parameters`) into the model's parameters, in place.

    Raises:
        LocalUsageError: the vector is not 1-D, has the wrong length, or holds NaN/inf (the model is then
            unchanged).
    """
    arr = np.asarray(vec, dtype=np.float32)
    params = trainable_parameters(model)
    total = sum(p.numel() for _, p in params)
    if arr.ndim != 1 or arr.shape[0] != total:
        raise LocalUsageError(f"parameter vector has shape {arr.shape}; the model needs ({total},)")
    if not np.all(np.isfinite(arr)):
        raise LocalUsageError("parameter vector holds NaN or infinite values")
    src = torch.from_numpy(arr.copy())
    offset = 0
    with torch.no_grad():
        for _, p in params:
            n = p.numel()
            p.copy_(src[offset : offset + n].view_as(p))
            offset += n


def model_fingerprint(spec: ModelSpec, model: nn.Module) -> str:
    """SHA-256 (hex) over the spec (name, canonical kwargs) and the ordered parameter names and shapes."""
    h = hashlib.sha256(b"tessera.model.v1\0")
    h.update(spec.canonical_json().encode())
    for name, p in trainable_parameters(model):
        h.update(f"\0{name}:{tuple(p.shape)}".encode())
    return h.hexdigest()


__all__ = [
    "BUILTIN_MODELS",
    "CNN28",
    "MLP",
    "ModelSpec",
    "build_model",
    "flatten_parameters",
    "load_flat_parameters",
    "model_fingerprint",
    "trainable_parameters",
]
