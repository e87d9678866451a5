"""The model registry: backbones, the shared classification head, pretrained weights, freezing.

Every model is a `Classifier` = backbone (feature extractor, split into ordered `blocks`) +
global pooling + `head`. Keeping one shape for all models is what lets freezing, partial
fine-tuning, weight loading and ensembles work the same way for a custom CNN and a ResNet.

Adding a model is one builder function plus `@register_model(...)`; nothing else changes.
The builder returns a `Backbone`; `create_model` adds the head, loads weights and freezes.
"""

from __future__ import annotations

import difflib
import os
import pickle
import socket
import urllib.parse
import urllib.request
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from components.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from components.errors import CnnflowError

__all__ = [
    "MODELS",
    "WEIGHTS_CHOICES",
    "Backbone",
    "Classifier",
    "ModelError",
    "ModelSpec",
    "WeightsFallbackWarning",
    "convmixer_patch_size",
    "count_parameters",
    "create_model",
    "get_spec",
    "imagenet_weights_path",
    "list_models",
    "make_head",
    "model_normalization",
    "parse_freeze",
    "register_model",
]

WEIGHTS_CHOICES = ("none", "imagenet", "auto")
_STATE_DICT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".tar"}
_PROBE_TIMEOUT_S = 5.0


class ModelError(CnnflowError, ValueError):
    """A bad model request (name, size, weights, freeze): the message says what to do instead."""


class WeightsFallbackWarning(UserWarning):
    """`weights=auto` could not get pretrained weights and fell back to random init."""


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    """What a builder returns: the feature extractor and how to split it for fine-tuning.

    `blocks` lists, from input to output, groups of dotted submodule paths inside `module`;
    together they must own every backbone parameter, so freezing never misses one.
    """

    module: nn.Module
    blocks: Sequence[Sequence[str]]
    features: int
    pool: nn.Module | None = None  # default: global average pooling to 1x1


Builder = Callable[..., Backbone]


@dataclass(frozen=True)
class ModelSpec:
    """Registry entry: how to build a model and what it needs."""

    name: str
    builder: Builder
    min_image_size: int
    default_head_hidden: int
    torchvision_weights: str | None  # torchvision model name whose DEFAULT weights we load
    normalization: tuple[tuple[float, float, float], tuple[float, float, float]]
    description: str
    cam_layer: str = ""  # dotted path inside the backbone Grad-CAM explains ("": last block)

    @property
    def has_imagenet_weights(self) -> bool:
        return self.torchvision_weights is not None


MODELS: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    min_image_size: int = 8,
    default_head_hidden: int = 128,
    torchvision_weights: str | None = None,
    normalization: tuple[tuple[float, float, float], tuple[float, float, float]] = (
        IMAGENET_MEAN,
        IMAGENET_STD,
    ),
    description: str = "",
    cam_layer: str = "",
) -> Callable[[Builder], Builder]:
    """Register `builder(image_size: int | None) -> Backbone` under `name`.

    `min_image_size`: the smallest input side the model runs at in training (measured: e.g.
    vgg16's five 2x2 poolings need 32), never below 8 px, where little is left to classify.

    `torchvision_weights` names the torchvision model whose ImageNet weights fit this
    backbone (None: no pretrained weights exist).

    `cam_layer` is the dotted path, inside the backbone module, of the layer Grad-CAM
    explains (`components/nn/explain.py`): the last convolutional stage whose output still
    has a spatial grid, and whose output no later module changes in place. Empty: the last
    module of the last block.
    """

    def decorate(builder: Builder) -> Builder:
        if name in MODELS:
            raise ModelError(f"model '{name}' is already registered; pick another name")
        lines = (builder.__doc__ or "").strip().splitlines()
        MODELS[name] = ModelSpec(
            name=name,
            builder=builder,
            min_image_size=min_image_size,
            default_head_hidden=default_head_hidden,
            torchvision_weights=torchvision_weights,
            normalization=normalization,
            description=description or (lines[0] if lines else ""),
            cam_layer=cam_layer,
        )
        return builder

    return decorate


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(MODELS)


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`, or a ModelError listing the valid names."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        pass
    hint = difflib.get_close_matches(str(name).lower(), list(MODELS), n=1)
    did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ModelError(
        f"unknown model '{name}'{did_you_mean}; choose one of: {', '.join(list_models())}"
    )


def model_normalization(
    name: str,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel (mean, std) the model's inputs should be normalized with.

    ImageNet statistics for every model, scratch ones included: pretrained backbones need
    them, BN-equipped scratch models do not care, and one shared normalization lets the
    same batches feed every member of a comparison or ensemble.
    """
    return get_spec(name).normalization


def imagenet_weights_path(name: str) -> Path | None:
    """Where the model's ImageNet weights file lives in the torch hub cache (None: none exist)."""
    spec = get_spec(name)
    if spec.torchvision_weights is None:
        return None
    return _hub_checkpoint_path(_weights_url(spec.torchvision_weights))


# --------------------------------------------------------------------------------------------
# Classifier, head, freezing
# --------------------------------------------------------------------------------------------


class _HeadBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d that tolerates a batch of one in training (uses running stats for it).

    A lone last batch otherwise crashes training with "Expected more than 1 value per channel".
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


def make_head(in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    """The seeds' head: Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        _HeadBatchNorm(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def parse_freeze(freeze: str) -> tuple[str, int]:
    """Parse a freeze spec into (mode, N): ("none", 0), ("backbone", 0) or ("partial", N)."""
    text = str(freeze).strip().lower()
    if text in ("none", "backbone"):
        return text, 0
    if text.startswith("partial:"):
        count = text.split(":", 1)[1].strip()
        if count.isdigit() and int(count) >= 1:
            return "partial", int(count)
        raise ModelError(
            f"freeze '{freeze}': N in partial:N must be an integer >= 1 (blocks left trainable)"
        )
    raise ModelError(f"unknown freeze '{freeze}'; use none, backbone or partial:N (N >= 1)")


class Classifier(nn.Module):
    """backbone -> pool -> flatten -> head, with block-wise freezing.

    Frozen blocks stay in eval mode through `train()`, so their BatchNorm running statistics
    (and dropout/stochastic depth) behave as in feature extraction.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        *,
        blocks: Sequence[Sequence[str]],
        pool: nn.Module | None = None,
        name: str = "",
        cam_layer: str = "",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool if pool is not None else nn.AdaptiveAvgPool2d(1)
        self.head = head
        self.name = name
        self.block_paths: tuple[tuple[str, ...], ...] = tuple(tuple(g) for g in blocks)
        self.frozen_blocks = 0
        self.weights_source: str | None = None  # filled in by create_model
        self.cam_layer = cam_layer or (self.block_paths[-1][-1] if self.block_paths else "")
        self._check_blocks()

    def _check_blocks(self) -> None:
        """Every backbone parameter must belong to exactly one block, or freezing leaks."""
        owners: dict[int, int] = {}
        for index, group in enumerate(self.block_paths):
            for path in group:
                for p in self.backbone.get_submodule(path).parameters():
                    if id(p) in owners and owners[id(p)] != index:
                        raise ModelError(f"{self.name}: a parameter is in two blocks ({path})")
                    owners[id(p)] = index
        orphans = [n for n, p in self.backbone.named_parameters() if id(p) not in owners]
        if orphans:
            raise ModelError(f"{self.name}: backbone parameters outside any block: {orphans[:3]}")

    @property
    def blocks(self) -> list[nn.Module]:
        """Backbone blocks from input to output (each a ModuleList view of its submodules)."""
        return [
            nn.ModuleList(self.backbone.get_submodule(p) for p in group)
            for group in self.block_paths
        ]

    @property
    def num_blocks(self) -> int:
        return len(self.block_paths)

    def frozen_modules(self) -> Iterator[nn.Module]:
        for group in self.block_paths[: self.frozen_blocks]:
            for path in group:
                yield self.backbone.get_submodule(path)

    def set_freeze(self, freeze: str) -> Classifier:
        """Apply `none`, `backbone` or `partial:N` (head + last N blocks train)."""
        mode, n = parse_freeze(freeze)
        if mode == "partial" and n > self.num_blocks:
            raise ModelError(
                f"freeze '{freeze}': {self.name or 'this model'} has only {self.num_blocks} "
                f"backbone blocks; use partial:1..{self.num_blocks} or backbone"
            )
        self.frozen_blocks = {
            "none": 0,
            "backbone": self.num_blocks,
            "partial": self.num_blocks - n,
        }[mode]
        self.requires_grad_(True)
        for module in self.frozen_modules():
            module.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
        return self

    @property
    def explained_layer(self) -> nn.Module:
        """The backbone layer Grad-CAM explains (the registry's `cam_layer`)."""
        try:
            return self.backbone.get_submodule(self.cam_layer)
        except AttributeError:
            raise ModelError(f"{self.name}: cam_layer '{self.cam_layer}' is not a module of "
                             "its backbone; fix its register_model(...)") from None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, flattened backbone features (the head's input)."""
        return torch.flatten(self.pool(self.backbone(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those with requires_grad when `trainable_only`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------
# create_model
# --------------------------------------------------------------------------------------------


def create_model(
    name: str,
    num_classes: int,
    *,
    weights: str = "none",
    freeze: str = "none",
    dropout: float = 0.5,
    head_hidden: int | None = None,
    image_size: int | None = None,
) -> tuple[Classifier, str]:
    """Build a registered model with a fresh head; returns (model, weights_source).

    weights: `none` | `imagenet` | `auto` | a state-dict path; freeze: `none` | `backbone` |
    `partial:N`. weights_source is `random`, `random-fallback`, `imagenet` or `file:<name>`.
    """
    spec = get_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(f"num_classes must be an integer >= 2 (got {num_classes!r})")
    if not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise ModelError(f"dropout must be in [0, 1) (got {dropout!r})")
    if head_hidden is not None and (not isinstance(head_hidden, int) or head_hidden < 0):
        raise ModelError(f"head_hidden must be a positive integer, or 0 for the default "
                         f"(got {head_hidden!r})")
    if image_size is not None and image_size < spec.min_image_size:
        raise ModelError(
            f"{name} needs images of at least {spec.min_image_size} px (got {image_size}); "
            f"use --image-size {spec.min_image_size} or larger"
        )
    kind, path = _parse_weights(weights)
    if kind == "imagenet" and not spec.has_imagenet_weights:
        raise ModelError(
            f"{name} has no ImageNet weights; use --weights none or a state-dict path"
        )
    parse_freeze(freeze)  # fail before the (slow) build

    part = spec.builder(image_size=image_size)
    hidden = head_hidden or spec.default_head_hidden
    model = Classifier(
        part.module,
        make_head(part.features, hidden, num_classes, float(dropout)),
        blocks=part.blocks,
        pool=part.pool,
        name=name,
        cam_layer=spec.cam_layer,
    )
    model.set_freeze(freeze)  # validates N against the real block count before loading

    if kind == "none":
        source = "random"
    elif kind == "imagenet":
        _load_backbone(model, _imagenet_state_dict(spec, download=True), f"{name} ImageNet")
        source = "imagenet"
    elif kind == "auto":
        source = _load_auto(model, spec)
    else:
        assert path is not None
        _load_file(model, path)
        source = f"file:{path.name}"
    model.weights_source = source
    return model, source


def _parse_weights(weights: str) -> tuple[str, Path | None]:
    text = str(weights).strip()
    if text.lower() in WEIGHTS_CHOICES:
        return text.lower(), None
    path = Path(text).expanduser()
    looks_like_path = (
        os.sep in text or "/" in text or path.suffix.lower() in _STATE_DICT_SUFFIXES
    )
    if path.is_file():
        return "file", path
    if path.exists():
        raise ModelError(f"weights path {path} is not a file (give a state-dict file)")
    if looks_like_path:
        raise ModelError(f"weights file not found: {path} (give a state-dict file path)")
    raise ModelError(
        f"unknown weights '{weights}'; use none, imagenet, auto or a path to a state-dict file"
    )


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _weights_url(torchvision_name: str) -> str:
    from torchvision.models import get_model_weights

    return get_model_weights(torchvision_name).DEFAULT.url


def _hub_checkpoint_path(url: str) -> Path:
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _reachable(url: str) -> bool:
    """Quick TCP probe (through the proxy if one is set): urllib has no timeout of its own."""
    parsed = urllib.parse.urlparse(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    target = urllib.parse.urlparse(proxy) if proxy else parsed
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((target.hostname, port), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _imagenet_state_dict(spec: ModelSpec, *, download: bool) -> dict[str, torch.Tensor]:
    """ImageNet weights from the hub cache, downloading them there only when `download`."""
    if spec.torchvision_weights is None:
        raise ModelError(
            f"{spec.name} has no ImageNet weights; use --weights none or a state-dict path"
        )
    url = _weights_url(spec.torchvision_weights)
    cached = _hub_checkpoint_path(url)
    offline = ModelError(
        f"ImageNet weights for {spec.name} are not available offline: place {cached.name} in "
        f"{cached.parent}/ or use --weights none"
    )
    if cached.is_file():
        try:
            return _unwrap_state_dict(
                torch.load(cached, map_location="cpu", weights_only=True), str(cached)
            )
        except Exception as exc:  # truncated download, wrong file...
            raise ModelError(
                f"cannot read ImageNet weights {cached} ({type(exc).__name__}); "
                f"delete it and retry, or use --weights none"
            ) from exc
    if not download or not _reachable(url):
        raise offline
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as exc:
        raise ModelError(
            f"downloading ImageNet weights for {spec.name} failed ({type(exc).__name__}: "
            f"{exc}); place {cached.name} in {cached.parent}/ or use --weights none"
        ) from exc


def _load_auto(model: Classifier, spec: ModelSpec) -> str:
    """ImageNet weights if already cached (never downloads), else random init with a warning."""
    if not spec.has_imagenet_weights:
        return "random"
    try:
        state = _imagenet_state_dict(spec, download=False)
        _load_backbone(model, state, f"{spec.name} ImageNet")
    except ModelError as exc:
        warnings.warn(
            f"weights=auto: {exc}; training {spec.name} from random init instead",
            WeightsFallbackWarning,
            stacklevel=3,
        )
        return "random-fallback"
    return "imagenet"


def _unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or a checkpoint holding one; strip DDP/compile prefixes."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ModelError(f"{source} does not hold a state dict (save model.state_dict())")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def _load_backbone(model: Classifier, state: dict[str, torch.Tensor], source: str) -> None:
    """Load matching keys into the backbone; the head stays fresh. Fails if nothing matched."""
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    own = model.backbone.state_dict()
    matched = [k for k in state if k in own]
    if not matched:
        raise ModelError(
            f"no parameter of {source} matches the {model.name} backbone; "
            f"was it saved from another model?"
        )
    mismatched = [k for k in matched if state[k].shape != own[k].shape]
    if mismatched:
        k = mismatched[0]
        raise ModelError(
            f"{source} does not fit {model.name}: {k} has shape {tuple(state[k].shape)}, "
            f"expected {tuple(own[k].shape)} (different model or image size?)"
        )
    missing = [k for k in own if k not in state]
    model.backbone.load_state_dict({k: state[k] for k in matched}, strict=False)
    if missing:
        warnings.warn(
            f"{source}: {len(missing)} of {len(own)} backbone tensors not in the file "
            f"(e.g. {missing[0]}); they keep their random init",
            stacklevel=4,
        )


def _load_file(model: Classifier, path: Path) -> None:
    """A Classifier state dict loads whole (head too, if it fits); others load the backbone."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise ModelError(
            f"cannot read weights file {path} ({type(exc).__name__}); it must be a state dict "
            f"saved with torch.save(model.state_dict(), path)"
        ) from exc
    state = _unwrap_state_dict(obj, str(path))
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    own_head = model.head.state_dict()
    head_fits = bool(head) and set(head) == set(own_head) and all(
        head[k].shape == v.shape for k, v in own_head.items()
    )
    if head and not head_fits:
        warnings.warn(
            f"{path.name}: its head does not fit this model (other num_classes or "
            f"head_hidden); loading the backbone only, the head starts fresh",
            stacklevel=3,
        )
    _load_backbone(model, state, path.name)
    if head_fits:
        model.head.load_state_dict(head)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _conv_bn_relu(cin: int, cout: int, kernel: int, padding: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=padding, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


@register_model("custom_cnn", default_head_hidden=64, cam_layer="block3")
def custom_cnn(image_size: int | None = None) -> Backbone:
    """The rice seed's CNN: 3 Conv-BN-ReLU-MaxPool blocks (32/64/128 channels), then GAP."""
    blocks = OrderedDict()
    cin = 3
    for i, cout in enumerate((32, 64, 128), start=1):
        blocks[f"block{i}"] = nn.Sequential(*_conv_bn_relu(cin, cout, 3, 1), nn.MaxPool2d(2))
        cin = cout
    return Backbone(nn.Sequential(blocks), [[name] for name in blocks], features=cin)


@register_model("lenet5", min_image_size=12, default_head_hidden=120, cam_layer="c3")
def lenet5(image_size: int | None = None) -> Backbone:
    """LeNet-5 with BN: C1(6@5x5, pad 2)-S2-C3(16@5x5)-S4, adaptive pool to 5x5 (400 features)."""
    module = nn.Sequential(OrderedDict(
        c1=nn.Sequential(*_conv_bn_relu(3, 6, 5, 2), nn.MaxPool2d(2)),
        c3=nn.Sequential(*_conv_bn_relu(6, 16, 5, 0), nn.MaxPool2d(2)),
    ))
    return Backbone(module, [["c1"], ["c3"]], features=16 * 5 * 5, pool=nn.AdaptiveAvgPool2d(5))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)


def convmixer_patch_size(image_size: int | None) -> int:
    """Patch size scaled to the image (1 below 32 px ... 7 from 112 px; 7 when unknown)."""
    return 7 if image_size is None else max(1, min(7, image_size // 16))


@register_model("convmixer", default_head_hidden=128, cam_layer="mixer7")
def convmixer(image_size: int | None = None, dim: int = 256, depth: int = 8,
              kernel_size: int = 9) -> Backbone:
    """ConvMixer-256/8 (kernel 9); the patch size adapts to the image size."""
    patch = convmixer_patch_size(image_size)
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        stem=nn.Sequential(nn.Conv2d(3, dim, patch, stride=patch), nn.GELU(), nn.BatchNorm2d(dim))
    )
    for i in range(depth):
        layers[f"mixer{i}"] = nn.Sequential(
            _Residual(nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                nn.GELU(),
                nn.BatchNorm2d(dim),
            )),
            nn.Conv2d(dim, dim, 1),
            nn.GELU(),
            nn.BatchNorm2d(dim),
        )
    return Backbone(nn.Sequential(layers), [[name] for name in layers], features=dim)


def _torchvision(name: str, keep: Sequence[str], **kwargs: object) -> nn.Sequential:
    """A torchvision model (random init) cut to its feature children, keeping their names.

    Same names means same state-dict keys, so torchvision checkpoints load unchanged.
    """
    from torchvision.models import get_model

    full = get_model(name, weights=None, **kwargs)
    return nn.Sequential(OrderedDict((child, getattr(full, child)) for child in keep))


def _resnet(name: str) -> Backbone:
    stem = ["conv1", "bn1", "relu", "maxpool"]
    layers = ["layer1", "layer2", "layer3", "layer4"]
    module = _torchvision(name, stem + layers)
    features = 512 * type(module.layer4[-1]).expansion
    return Backbone(module, [stem] + [[layer] for layer in layers], features=features)


@register_model("resnet18", default_head_hidden=128, torchvision_weights="resnet18",
                cam_layer="layer4")
def resnet18(image_size: int | None = None) -> Backbone:
    """ResNet-18; blocks: stem, layer1..layer4."""
    return _resnet("resnet18")


@register_model("resnet50", default_head_hidden=64, torchvision_weights="resnet50",
                cam_layer="layer4")
def resnet50(image_size: int | None = None) -> Backbone:
    """ResNet-50 (the rice seed's 2048->64->3 head); blocks: stem, layer1..layer4."""
    return _resnet("resnet50")


@register_model("vgg16", min_image_size=32, default_head_hidden=64, torchvision_weights="vgg16",
                cam_layer="features.29")
def vgg16(image_size: int | None = None) -> Backbone:
    """VGG-16 conv features + GAP (512-d, the seed's 512->64->3 head); blocks: 5 conv stages."""
    module = _torchvision("vgg16", ["features"])
    pools = [i for i, m in enumerate(module.features) if isinstance(m, nn.MaxPool2d)]
    starts = [0] + [p + 1 for p in pools[:-1]]
    spans = zip(starts, pools, strict=True)
    blocks = [[f"features.{i}" for i in range(start, end + 1)] for start, end in spans]
    return Backbone(module, blocks, features=512)


@register_model("mobilenetv2", default_head_hidden=256, torchvision_weights="mobilenet_v2",
                cam_layer="features.18")
def mobilenetv2(image_size: int | None = None) -> Backbone:
    """MobileNetV2 (the seed's 1280->256->3 head); blocks: the 19 `features` children."""
    module = _torchvision("mobilenet_v2", ["features"])
    return Backbone(module, [[f"features.{i}"] for i in range(len(module.features))], 1280)


@register_model("efficientnet_b0", default_head_hidden=256,
                torchvision_weights="efficientnet_b0", cam_layer="features.8")
def efficientnet_b0(image_size: int | None = None) -> Backbone:
    """EfficientNet-B0; blocks: the 9 `features` children (stem, 7 MBConv stages, head conv)."""
    module = _torchvision("efficientnet_b0", ["features"])
    return Backbone(module, [[f"features.{i}"] for i in range(len(module.features))], 1280)


class _GoogLeNetInput(nn.Module):
    """torchvision's `transform_input`: ImageNet-normalized input -> the (x-0.5)/0.5 scale
    GoogLeNet's ImageNet weights were trained on. No parameters, so no state-dict keys."""

    def __init__(self) -> None:
        super().__init__()
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("scale", (std / 0.5).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean - 0.5) / 0.5).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


@register_model("googlenet", min_image_size=15, default_head_hidden=128,
                torchvision_weights="googlenet", cam_layer="inception5b")
def googlenet(image_size: int | None = None) -> Backbone:
    """GoogLeNet (no aux heads); blocks: stem, inception 3a, 3b, 4a..4e, 5a, 5b."""
    stem = ["conv1", "maxpool1", "conv2", "conv3", "maxpool2"]
    groups = [
        ["inception3a"], ["inception3b", "maxpool3"],
        ["inception4a"], ["inception4b"], ["inception4c"], ["inception4d"],
        ["inception4e", "maxpool4"], ["inception5a"], ["inception5b"],
    ]
    names = stem + [n for g in groups for n in g]
    module = _torchvision("googlenet", names, aux_logits=False, init_weights=False)
    module = nn.Sequential(OrderedDict([("transform_input", _GoogLeNetInput()),
                                        *module.named_children()]))
    return Backbone(module, [["transform_input", *stem], *groups], features=1024)
