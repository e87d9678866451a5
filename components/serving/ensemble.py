"""Voting ensembles as a servable model: the vote registry and `EnsembleClassifier`.

The rice-leaf seed soft-voted its three transfer models (mean of logits) and got every test
image right. A vote from `VOTES` combines member logits: `soft` (weighted mean of member
probabilities), `logits` (softmax of the weighted mean of logits, the seed's variant) or
`hard` (weighted majority). The model has the same output as a single model (label,
confidence, prob_<class>).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch
from PIL import Image

from components.errors import CnnflowError
from components.registrar import registrar
from components.serving.classifier import ImageClassifier, _items, log_proba, probability_frame

VoteFn = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]
VOTES: dict[str, VoteFn] = {}
_HARD_TIE_BREAK = 1e-6


class EnsembleError(CnnflowError, RuntimeError):
    """Bad ensemble input (members, vote, weights); one line saying what to do."""


# --------------------------------------------------------------------------------------------
# Votes: member logits (M tensors N x C) + weights (M, sum 1) -> N x C log-probabilities
# --------------------------------------------------------------------------------------------


# `@register_vote(name)` adds a vote; `--vote name` then works everywhere.
register_vote = registrar(VOTES, "vote")


@register_vote("soft")
def soft_vote(logits: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """log of the weighted mean of member probabilities (computed in log space, exactly)."""
    log_p = torch.stack([torch.log_softmax(z.double(), dim=1) for z in logits])
    return torch.logsumexp(log_p + weights.double().log().view(-1, 1, 1), dim=0)


@register_vote("logits")
def logits_vote(logits: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Softmax of the weighted mean of logits: the rice-leaf seed's soft voting."""
    mean = (torch.stack([z.double() for z in logits]) * weights.double().view(-1, 1, 1)).sum(0)
    return torch.log_softmax(mean, dim=1)


@register_vote("hard")
def hard_vote(logits: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Weighted share of member votes per class; ties go to the higher mean probability.

    The shares are the ensemble's probabilities (confidence = winning share); a class no
    member voted for keeps only the tie-break mass, so a unanimous wrong vote costs a large
    but finite loss.
    """
    n_classes = logits[0].shape[1]
    votes = sum(w * torch.nn.functional.one_hot(z.argmax(1), n_classes).double()
                for w, z in zip(weights.double(), logits, strict=True))
    scores = votes + _HARD_TIE_BREAK * soft_vote(logits, weights).exp()
    return torch.log(scores / scores.sum(1, keepdim=True))


def get_vote(name: str) -> VoteFn:
    try:
        return VOTES[name]
    except KeyError:
        raise EnsembleError(f"unknown vote '{name}': use one of "
                            f"{', '.join(sorted(VOTES))}") from None


# --------------------------------------------------------------------------------------------
# The pyfunc model
# --------------------------------------------------------------------------------------------


class EnsembleClassifier(mlflow.pyfunc.PythonModel):
    """Members rebuilt from their own configs and state dicts; the same predict path as a
    single `ImageClassifier` (each image decoded once, preprocessed once per distinct
    member preprocessing, every member scored, votes combined)."""

    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = json.loads(Path(context.artifacts["ensemble"]).read_text())
        root = Path(context.artifacts["members"])
        self.build(config, [load_member(root / m["dir"]) for m in config["members"]])

    def build(self, config: dict[str, Any], members: Sequence[Any]) -> EnsembleClassifier:
        classes = members[0].class_names
        for m in members[1:]:
            if m.class_names != classes:
                raise EnsembleError("ensemble members have different class lists: "
                                    f"{classes} vs {m.class_names}")
        self.config = config
        self.members = list(members)
        self.vote = get_vote(config["vote"])
        self.weights = torch.tensor(config["weights"], dtype=torch.float64)
        self.device = torch.device("cpu")
        keys: list[tuple] = []
        self._transforms: list[Callable[[Image.Image], torch.Tensor]] = []
        self._input_of: list[int] = []
        for m in self.members:
            key = (m.config["image_size"], tuple(m.config["mean"]), tuple(m.config["std"]))
            if key not in keys:
                keys.append(key)
                self._transforms.append(m.transform)
            self._input_of.append(keys.index(key))
        return self

    @property
    def class_names(self) -> list[str]:
        return self.members[0].class_names

    @property
    def format(self) -> str:
        """The members' format (`pytorch`, or an export's `onnx` / `int8`)."""
        return ",".join(dict.fromkeys(m.format for m in self.members))

    def to(self, device: torch.device | str) -> EnsembleClassifier:
        self.device = torch.device(device)
        for m in self.members:
            m.to(self.device)
        return self

    def input_transforms(self) -> list[Callable[[Image.Image], torch.Tensor]]:
        return list(self._transforms)

    def member_logits(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [m.logits_batch([inputs[j]]) for m, j in zip(self.members, self._input_of,
                                                             strict=True)]

    def score_batch(self, inputs: Sequence[torch.Tensor]
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits = self.member_logits(inputs)
        return (self.vote(logits, self.weights).float(),
                [torch.log_softmax(z, dim=1) for z in logits])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        probs = log_proba(self, _items(model_input)).exp().numpy()
        return probability_frame(self.class_names, probs)


# How a member folder is loaded, by the `format` of its model_config.json (none: pytorch).
MEMBER_LOADERS: dict[str, Callable[[Path], Any]] = {}
register_member_loader = registrar(MEMBER_LOADERS, "member format")


@register_member_loader("pytorch")
def _pytorch_member(folder: Path) -> ImageClassifier:
    return ImageClassifier().load(folder / "model_config.json", folder / "weights.pt")


def _onnx_member(folder: Path) -> Any:
    from components.serving.onnx_model import ONNX_FILE, OnnxClassifier

    return OnnxClassifier().load(folder / "model_config.json", folder / ONNX_FILE)


for _format in ("onnx", "int8"):  # exported members: fp32 or int8 graphs, one loader
    register_member_loader(_format)(_onnx_member)


def load_member(folder: Path) -> Any:
    """One member of a saved ensemble (`members/<i>/`), by the format its config names."""
    config = json.loads((folder / "model_config.json").read_text())
    return MEMBER_LOADERS[config.get("format", "pytorch")](folder)


def save_members(members: Sequence[ImageClassifier], folder: Path) -> list[dict[str, str]]:
    """members/<i>/{model_config.json,weights.pt}: state dicts only, never pickled nets."""
    entries = []
    for i, m in enumerate(members):
        sub = folder / str(i)
        sub.mkdir(parents=True)
        (sub / "model_config.json").write_text(json.dumps(m.config, indent=2))
        torch.save({k: v.detach().cpu() for k, v in m.model.state_dict().items()},
                   sub / "weights.pt")
        entries.append({"dir": str(i)})
    return entries


