"""The parameters of every entry point, each declared once: type, default and help.

One dataclass per MLproject entry point (and `cnnflow` command); `pipelines/` turns them
into click options, `python -m pipelines.mlproject` into the MLproject file and
`docs/parameters.md`. Groups are shared by inheritance, so a parameter several steps take
means and defaults the same in all of them:

- `DataParams` (data, experiment, val_ratio, test_ratio, seed) and `RuntimeParams` (device,
  num_workers), from components/params.py;
- `TrainRecipe`: how a model is trained (the engine's `TrainConfig` plus the model and data
  knobs). `train`, `tune`, the `main` pipeline and `ensemble --bagging` inherit it, so a new
  training parameter is one field here (or in `TrainConfig`) and reaches all four;
- small groups for what a few steps share (reports folder, promotion rule, registered
  model, ensemble vote, prediction batches).

A step re-declares a group's field only where its meaning or default differs, and says so
in its docstring (`inherited` then leaves that field out of what is passed on).

`validate()` checks values before any run or scan exists: first every declared range
(`param(..., ge=, le=)`, one `check_bounds` for all classes), then the rules that tie
fields together or read a registry. It imports the layers below the
steps (data, nn, serving, tracking) lazily, never a step module: a step's own registries
(tune's samplers and search space, pseudo-label's placers) are checked by that step.

Import-light on purpose (no torch, torchvision or mlflow): `cnnflow <command> --help` and
MLproject generation read this module only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from components.nn.config import TrainConfig
from components.nn.recipes import check_recipe, describe_recipes, recipe_values
from components.params import (
    MAX_WORKERS,
    DataParams,
    ParamError,
    RuntimeParams,
    bool_text,
    bounds_of,
    check_bounds,
    inherited,
    param,
    split_list,
)
from components.settings import state_dir

# Hard ranges, checked before any run exists: past them memory runs out (a 100000-px image) or
# a typo is the likelier story (a batch of a million).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024
MAX_BATCH_SIZE = 4096
# Unrelated photos differ in ~128 of 256 pHash bits and unrelated 32-px digits in > 16; past 32
# bits near-duplicate groups would chain unrelated pictures together.
MAX_NEAR_DUP_DISTANCE = 32


# --------------------------------------------------------------------------------------------
# Groups several steps share
# --------------------------------------------------------------------------------------------


# `--lr auto`: run the learning-rate range test first and train with its suggestion.
AUTO_LR = "auto"


@dataclass
class TrainRecipe(TrainConfig):
    """How a model is trained: the loop's knobs (`TrainConfig`) plus the model and data ones.
    `lr` is re-declared as text: besides a number it takes `auto` (the range test of
    `cnnflow lr-find` picks it); `engine_config()` hands the engine a number."""

    lr: str = param(str(TrainConfig.lr), "Learning rate (> 0), or auto: run the LR range test "
                                         "(`cnnflow lr-find`) on this model and data first and "
                                         "train with its suggestion (logged as lr_chosen).")
    weights: str = param("auto", "none | imagenet | auto (ImageNet if cached, else random) | "
                                 "PATH to a state dict.")
    freeze: str = param("none", "none | backbone (feature extraction) | partial:N (last N "
                                "blocks also train).")
    image_size: int = param(32, "Square input size in pixels.", ge=MIN_IMAGE_SIZE,
                            le=MAX_IMAGE_SIZE)
    batch_size: int = param(32, "Images per batch.", ge=1, le=MAX_BATCH_SIZE)
    augmentation: str = param("light", "Augmentation preset: none | light | strong.")
    sampling: str = param("none", "How the train split is drawn each epoch: none (each image "
                                  "once, shuffled) | balanced (classes about equally often, "
                                  "with replacement; not with --nproc > 1).")
    recipe: str = param("none", "Named preset of training parameters; it fills the ones left "
                                f"at their defaults: {describe_recipes()}.")
    dropout: float = param(0.5, "Dropout in the classifier head.", ge=0, lt=1)
    head_hidden: int = param(0, "Hidden units of the head; 0 = the model's default.", ge=0,
                             le=65536)
    class_weights: str = param("none", "none | balanced (inverse class frequency).")
    log_timeout: float = param(60.0, "Seconds to wait after the last epoch for an unreachable "
                                     "MLflow server to take the epochs it missed; then exit 1 "
                                     "with the --resume command that completes the run.",
                               ge=0)
    heartbeat: float = param(10.0, "Seconds between progress heartbeats inside an epoch (epoch, "
                                   "batch i of n, images/s as `progress/*` metrics; the "
                                   "mirror's live status and died detection read them); "
                                   "0 = off.", ge=0, le=3600)
    system_metrics: float = param(10.0, "Seconds between MLflow system metrics samples (CPU, "
                                        "memory, disk, network, GPU via pynvml: `system/*`); "
                                        "0 = off.", ge=0, le=3600)

    def __post_init__(self) -> None:
        """Apply `recipe` (`_apply_recipe`); then a number given for `lr` in code (tune's
        sampled lr, a preset, a test) becomes the text the command line and MLflow hold, so
        a run rebuilt from its params compares equal."""
        self._apply_recipe()
        if isinstance(self.lr, int | float) and not isinstance(self.lr, bool):
            self.lr = str(self.lr)

    def _apply_recipe(self) -> None:
        """Apply `recipe`: its values go into the training fields still at their declared
        default (a value passed explicitly wins; one equal to the default cannot be told
        apart and takes the preset's). Idempotent, so rebuilt or resumed parameters keep
        their values; an unknown name is left to `validate`'s one line."""
        try:
            preset = recipe_values(self.recipe)
        except ParamError:
            return
        own = set(inherited(type(self), TrainRecipe))  # re-declared fields mean other things
        for f in fields(self):
            if f.name in preset and f.name in own and getattr(self, f.name) == f.default:
                setattr(self, f.name, preset[f.name])

    def lr_value(self) -> float | None:
        """The numeric learning rate, None for `auto`; else one line in check_bounds' words,
        the range being the one `TrainConfig.lr` declares."""
        text = str(self.lr).strip()
        if text.lower() == AUTO_LR:
            return None
        bounds = bounds_of(next(f for f in fields(TrainConfig) if f.name == "lr"))
        try:
            value = float(text)
        except ValueError:
            raise ParamError(f"lr={text!r} is not a number: lr must be {bounds.text()} or "
                             "auto") from None
        if not bounds.holds(value):
            raise ParamError(f"lr={text} {bounds.broken(value)}: lr must be {bounds.text()} or "
                             "auto")
        return value

    def engine_config(self, lr: float | None = None) -> TrainConfig:
        """The engine's knobs, which carry the same names as the run's parameters; `lr` is
        the learning rate `auto` resolved to (without it, `auto` stands in as the engine's
        default, for checks only)."""
        values = {f.name: getattr(self, f.name) for f in fields(TrainConfig)}
        values["lr"] = lr if lr is not None else (self.lr_value() or TrainConfig.lr)
        return TrainConfig(**values)


@dataclass
class ScanParams:
    """Steps that read every file of a folder (eda, preprocess): `num_workers` counts
    file-reading processes, not DataLoader workers, hence its own declaration and default."""

    num_workers: int = param(-1, "Processes reading files: -1 = one per CPU core, 0 = this "
                                 "process only.", ge=-1, le=MAX_WORKERS)
    near_dup_distance: int = param(12, "Near-duplicates: pictures whose 256-bit perceptual "
                                       "hashes differ in at most this many bits (eda reports "
                                       "them, preprocess keeps each group in one split); "
                                       "0 = off.", ge=0, le=MAX_NEAR_DUP_DISTANCE)


@dataclass
class ReportsParams:
    reports_dir: str = param("reports", "Folder for reports: eda's go to "
                                        "<reports_dir>/eda/<dataset>/, an experiment's to "
                                        "<reports_dir>/<experiment>/, label-issues' to "
                                        "<reports_dir>/label-issues/<experiment>/<cv run>/.")


@dataclass
class PromotionParams:
    """The promotion rule: evaluate, the `main` pipeline and `cnnflow promote` apply it."""

    metric: str = param("test_acc", "Metric the promotion rule compares (losses and costs: "
                                    "lower is better).")
    min_delta: float = param(0.0, "The challenger must beat the champion by at least this "
                                  "much.", ge=0)


@dataclass
class RegistryParams:
    """Which registered model a version goes to or is promoted in (evaluate, `cnnflow
    promote`)."""

    registered_model: str = param("", "Registered model name (default: "
                                      "<experiment>-classifier).")


@dataclass
class VoteParams:
    """How an ensemble is formed from trained runs (ensemble and the `main` pipeline)."""

    top_k: int = param(3, "Ensemble the k best training runs by validation accuracy "
                          "(ensemble: without --run-ids; run: 0 = no ensemble).", ge=0,
                       le=1000)
    vote: str = param("soft", "soft (mean of probabilities) | logits (mean of logits) | hard "
                              "(majority).")


@dataclass
class PredictRuntimeParams(RuntimeParams):
    """Steps that predict with logged models (evaluate, ensemble, pseudo-label) decode images
    in this process by default: same meaning as `RuntimeParams.num_workers`, default 0."""

    num_workers: int = param(0, "DataLoader worker processes decoding images.", ge=0,
                             le=MAX_WORKERS)


@dataclass
class PredictParams(PredictRuntimeParams):
    batch_size: int = param(0, "Prediction batch size (evaluate: also for throughput); 0 = auto "
                               "(64 on CUDA, 4 on CPU).", ge=0, le=MAX_BATCH_SIZE)


# --------------------------------------------------------------------------------------------
# One class per entry point
# --------------------------------------------------------------------------------------------


@dataclass
class EdaParams(DataParams, ReportsParams, ScanParams):
    """`cnnflow eda` / `mlflow run . -e eda`. A flat folder's report shows the split `train`
    makes with the same val_ratio, test_ratio and seed."""

    def validate(self) -> None:
        """Cheap checks first, so a typo never creates a run or scans a folder."""
        from components.data.datasets import check_ratios

        check_bounds(self)
        check_ratios(self.val_ratio, self.test_ratio)

    def logged(self) -> dict[str, Any]:
        """What changes the report: not where it goes nor how many processes read the files."""
        return {"data": self.data, "val_ratio": self.val_ratio, "test_ratio": self.test_ratio,
                "seed": self.seed, "near_dup_distance": self.near_dup_distance}


@dataclass
class PreprocessParams(DataParams, ScanParams):
    """`cnnflow preprocess` / `mlflow run . -e preprocess`."""

    train_ratio: float = param(0.6, "Train share of a flat folder (the three shares must add "
                                    "up to 1).", gt=0, le=1)
    cache: bool = param(False, "Also store every image decoded and resized to image_size "
                               "(uint8 .npy).")
    image_size: int = param(TrainRecipe.image_size, "Square size of the cached images; train "
                                                    "uses the cache at this size.",
                            ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)

    def validate(self) -> None:
        """Cheap checks first: a typo must not cost a scan of the folder or create a run."""
        from components.data.datasets import check_ratios

        check_bounds(self)
        total = self.train_ratio + self.val_ratio + self.test_ratio
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ParamError(
                f"train_ratio + val_ratio + test_ratio = {total:g}, not 1: pass shares that "
                "add up to 1, e.g. 0.6 0.2 0.2, 0.7 0.3 0 or 0.9 0.1 0")
        check_ratios(self.val_ratio, self.test_ratio)

    def logged(self) -> dict[str, Any]:
        """Everything that changes the outputs (not the worker count or the experiment).

        `cache` is logged as true/false, the form `mlflow run -P cache=true` logs it in.
        """
        logged = {k: getattr(self, k) for k in ("data", "train_ratio", "val_ratio",
                                                "test_ratio", "seed", "image_size",
                                                "near_dup_distance")}
        return {**logged, "cache": bool_text(self.cache)}


@dataclass
class TrainParams(DataParams, TrainRecipe, RuntimeParams):
    """`cnnflow train` / `mlflow run . -e train`; resumed runs are rebuilt from these too."""

    model: str = param("custom_cnn", "Registered model name, e.g. custom_cnn, lenet5, resnet50, "
                                     "vgg16, mobilenetv2.")
    preprocess_run: str = param("", "Run id of a `cnnflow preprocess` run: train on its "
                                    "manifest (and tensor cache at this image_size) instead of "
                                    "scanning `data`.")
    nproc: int = param(1, "Training processes (DistributedDataParallel via torchrun: gloo on "
                          "CPU, one GPU each with NCCL); batch_size is per process.", ge=1)
    nnodes: int = param(1, "Machines training together (torchrun c10d rendezvous; run "
                           "`cnnflow train` on each with the same options); nproc is per "
                           "machine.", ge=1)
    node_rank: int = param(0, "This machine's number, 0 to nnodes-1: node 0 hosts the "
                              "rendezvous; start it first.", ge=0)
    rdzv_endpoint: str = param("", "HOST:PORT of node 0's rendezvous (a free port there), the "
                                   "same on every node; needed with nnodes > 1.")
    rdzv_timeout: float = param(300.0, "Seconds a node waits for the rendezvous: to reach node "
                                       "0, and node 0 for the others.", gt=0)
    resume: str = param("", "Run id of an unfinished run to continue from its last "
                            "checkpoint.")
    cv: int = param(0, "Stratified K-fold cross-validation over train+val (test untouched); "
                       "0 = off.", ge=0, le=100)
    cv_ensemble: bool = param(False, "With --cv: also soft-vote the K fold models into one "
                                     "ensemble run.")
    extra_train: str = param("", "Folder of extra labelled images (class sub-folders, e.g. "
                                 "from `cnnflow pseudo-label`) added to the train split only.")
    exclude_file: str = param("", "CSV with a `path` column (e.g. a reviewed label_issues.csv) "
                                  "or text file, one path per line, relative to the dataset "
                                  "root: images left out of train and val (never test).")
    find_label_issues: bool = param(False, "With --cv: rank likely mislabelled images from the "
                                           "out-of-fold predictions right after (as `cnnflow "
                                           "label-issues`); nothing is changed.")

    # Parameters that describe the run, not the result; a resumed run may change them.
    RUNTIME = ("device", "amp", "num_workers", "resume", "experiment", "log_timeout",
               "heartbeat", "system_metrics", "compile", "node_rank", "rdzv_endpoint",
               "rdzv_timeout")
    # How the processes were started: not logged (each node has its own), not the result's.
    LAUNCH = ("node_rank", "rdzv_endpoint", "rdzv_timeout")

    def validate(self) -> None:
        """Cheap checks first, so a typo never creates an empty MLflow run."""
        from components.data.datasets import check_ratios, check_sampling
        from components.nn.distributed import check_nodes, check_nproc
        from components.nn.engine import check_config

        if self.cv < 0 or self.cv == 1:  # a rule, not a range: said first
            raise ParamError(f"cv must be 0 (off) or >= 2 folds (got {self.cv})")
        check_bounds(self)
        check_ratios(self.val_ratio, self.test_ratio)
        if self.cv_ensemble and not self.cv:
            raise ParamError("cv_ensemble needs --cv K (K >= 2 folds to ensemble)")
        if self.find_label_issues and not self.cv:
            raise ParamError("find_label_issues needs --cv K: the ranking reads the folds' "
                             "out-of-fold predictions")
        if self.exclude_file and not Path(self.exclude_file).expanduser().is_file():
            raise ParamError(f"exclude file {self.exclude_file} does not exist: pass a CSV "
                             "with a `path` column (e.g. a reviewed label_issues.csv) or a "
                             "text file of dataset-relative paths, one per line")
        if self.preprocess_run and (self.cv or self.extra_train):
            raise ParamError("cv and extra_train read the image folder: drop "
                             "--preprocess-run, or use it without --cv / --extra-train")
        check_nproc(self.nproc, self.device)
        check_nodes(self.nnodes, self.node_rank, self.rdzv_endpoint)
        many = "nproc" if self.nproc > 1 else "nnodes" if self.nnodes > 1 else ""
        if many and (self.resume or self.cv or self.preprocess_run):
            raise ParamError(f"{many} > 1 trains a new run from the image folder: drop "
                             f"--resume / --cv / --preprocess-run, or use --{many} 1")
        if many and self.lr_value() is None:
            raise ParamError("lr=auto runs the range test in one process: find the LR with "
                             f"`cnnflow lr-find`, then pass it with --lr to --{many} N")
        check_recipe(self.recipe)
        check_sampling(self.sampling, self.nproc * self.nnodes)
        check_config(self.engine_config())

    def logged(self) -> dict[str, Any]:
        """Params of the run. An empty `preprocess_run` is left out: `mlflow run` logs an empty
        value itself (as "''"), and MLflow refuses a second, different value."""
        return {f.name: bool_text(getattr(self, f.name)) for f in fields(self)
                if f.name not in ("resume", "experiment", *self.LAUNCH)
                and not (f.name in ("preprocess_run", "extra_train", "exclude_file")
                         and not getattr(self, f.name))}

    @classmethod
    def from_logged(cls, logged: dict[str, str], **runtime: Any) -> TrainParams:
        """Rebuild the parameters of an earlier run from its MLflow params (for resume)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in logged and isinstance(f.default, bool):
                values[f.name] = logged[f.name].lower() == "true"
            elif f.name in logged:
                values[f.name] = type(f.default)(logged[f.name])
        values.update(runtime)
        return cls(**values)


@dataclass
class LrFindParams(DataParams, TrainRecipe, RuntimeParams):
    """`cnnflow lr-find` / `mlflow run . -e lr_find`: the LR range test on the model, data and
    optimiser `train` would use with the same options. The sweep sets the LR itself, so the
    recipe's schedule knobs (lr, epochs, scheduler, patience, ...) do not apply; `model` and
    `preprocess_run` are train's."""

    model: str = param(TrainParams.model, "Registered model name, e.g. custom_cnn, lenet5, "
                                          "resnet50.")
    preprocess_run: str = param("", "Run id of a `cnnflow preprocess` run: sweep on its "
                                    "manifest (and tensor cache) instead of scanning `data`.")
    start_lr: float = param(1e-7, "Smallest LR of the sweep.", gt=0, le=1)
    end_lr: float = param(10.0, "Largest LR of the sweep.", gt=0, le=1000)
    num_batches: int = param(100, "Training batches of the sweep (the train split is cycled "
                                  "when it has fewer); it stops early when the loss diverges.",
                             ge=10, le=10_000)

    # What the sweep depends on: the model, the data, the optimiser and the sweep itself.
    SWEPT = ("data", "val_ratio", "test_ratio", "seed", "model", "preprocess_run", "weights",
             "freeze", "image_size", "batch_size", "augmentation", "dropout", "head_hidden",
             "class_weights", "optimizer", "weight_decay", "momentum", "label_smoothing",
             "mixup", "cutmix", "recipe", "start_lr", "end_lr", "num_batches")

    def validate(self) -> None:
        from components.data.datasets import check_ratios
        from components.nn.engine import check_config

        check_bounds(self)
        check_ratios(self.val_ratio, self.test_ratio)
        if self.start_lr >= self.end_lr:
            raise ParamError(f"start_lr={self.start_lr:g} must be below end_lr="
                             f"{self.end_lr:g}: the sweep goes up, e.g. --start-lr 1e-7 "
                             "--end-lr 10")
        check_config(self.engine_config(self.start_lr))

    def train_params(self) -> TrainParams:
        """The `train` parameters whose data, model and loaders the sweep uses."""
        values = {name: getattr(self, name) for name in inherited(LrFindParams, TrainParams)}
        return TrainParams(**values, model=self.model, preprocess_run=self.preprocess_run)

    def logged(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.SWEPT
                if not (k == "preprocess_run" and not self.preprocess_run)}


@dataclass
class EvalParams(PromotionParams, RegistryParams, PredictParams):
    """`cnnflow evaluate` / `mlflow run . -e evaluate`. `device` is re-declared: its default
    `run` (the device the run trained on) is a value only evaluate understands."""

    run_id: str = param("", "Run to evaluate (a train or ensemble run); or use --model-uri.")
    model_uri: str = param("", "models:/<name>@<alias>, models:/<name>/<version> or "
                               "models:/m-<id>.")
    split: str = param("test", "val | test: a split of the run's own manifest.")
    device: str = param("run", "run (the device the run trained on) | auto | cpu | cuda | "
                               "cuda:N | mps.")
    cost: bool = param(True, "Measure parameters, size, latency, throughput and peak memory.")
    latency_runs: int = param(30, "Least single-image predictions timed for latency p50/p95 "
                                  "(more while the time budget lasts).", ge=1, le=100_000)
    register: bool = param(True, "Register the model (test split) as a new version with alias "
                                 "challenger.")
    promote: bool = param(True, "Apply the promotion rule after registering.")
    explain_images: int = param(8, "Grad-CAM gallery of the split: the N highest-loss images "
                                   "plus up to 2 per confusion pair (at most N more); 0 = "
                                   "off.", ge=0, le=64)
    tta: str = param("none", "Test-time augmentation: none | hflip (image + mirror) | "
                             "hflip+crops (also 5 zoomed crops); probabilities averaged over "
                             "the views, the registered model serves the same.")

    def validate(self) -> None:
        from components.serving.tta import check_tta

        check_bounds(self)
        if self.split not in ("val", "test"):
            raise ParamError(f"split must be val or test (got '{self.split}')")
        check_tta(self.tta)


@dataclass
class ExportParams(RegistryParams):
    """`cnnflow export` / `mlflow run . -e export`. `batch_size` and `latency_runs` are
    re-declared: exports are compared with the PyTorch model on the CPU, where ONNX Runtime
    runs, so `auto` is evaluate's CPU batch. `experiment` is its own, as pseudo-label's."""

    run_id: str = param("", "Run whose model to export (a train or ensemble run); or use "
                            "--model-uri.")
    model_uri: str = param("", "models:/<name>@<alias>, models:/<name>/<version> or "
                               "models:/m-<id>.")
    formats: str = param("onnx,int8", "Comma-separated: onnx (fp32 graph) | int8 (ONNX "
                                      "Runtime static quantization, QDQ, per-channel).")
    calibration_images: int = param(200, "int8: train-split images the activation ranges are "
                                         "calibrated on.", ge=1, le=100_000)
    batch_size: int = param(0, "Batch for the parity check and throughput; 0 = auto (evaluate's "
                               "CPU batch, 4).", ge=0, le=MAX_BATCH_SIZE)
    latency_runs: int = param(EvalParams.latency_runs, "Least single-image predictions timed "
                                                       "per format for latency p50/p95.",
                              ge=1, le=100_000)
    experiment: str = param("", "MLflow experiment of the export run (default: the model's "
                                "run's experiment).")

    def validate(self) -> None:
        from components.serving.export import check_formats

        check_bounds(self)
        if bool(self.run_id) == bool(self.model_uri):
            raise ParamError("pass exactly one of --run-id or --model-uri")
        check_formats(self.format_list())

    def format_list(self) -> list[str]:
        return split_list(self.formats)


@dataclass
class PromoteParams(RegistryParams, PromotionParams):
    """`cnnflow promote` (no MLproject entry point): the promotion rule applied to a
    registered model's challenger, or a rollback to a given version. `experiment` is its own:
    it names the registered model, <experiment>-classifier."""

    experiment: str = param("", "Instead of --registered-model: the experiment whose model "
                                "to promote (<experiment>-classifier).")
    version: str = param("", "Make this version champion directly (rollback); skips the rule.")
    force: bool = param(False, "Promote the challenger whatever the rule says.")


@dataclass
class EnsembleParams(VoteParams, DataParams, TrainRecipe, PredictRuntimeParams):
    """`cnnflow ensemble` / `mlflow run . -e ensemble`. The training recipe applies to
    `--bagging` members; `weights` is re-declared as the vote weights (the members' starting
    weights are `init_weights`), and `model` names the members' model."""

    run_ids: str = param("", "Member run ids, comma-separated (default: the experiment's "
                             "top-k).")
    weights: str = param("equal", "Vote weights: equal | val_acc | comma-separated list, one "
                                  "per member.")
    bagging: int = param(0, "Train N members on bootstrap samples of train (0: off); the "
                            "training options apply to them.", ge=0, le=1000)
    model: str = param(TrainParams.model, "Bagging: the members' model.")
    init_weights: str = param(TrainRecipe.weights, "Bagging: the members' starting weights: "
                                                   "none | imagenet | auto | PATH.")

    def validate(self) -> None:
        from components.data.datasets import check_ratios
        from components.serving.ensemble import get_vote

        check_bounds(self)
        check_ratios(self.val_ratio, self.test_ratio)
        get_vote(self.vote)
        explicit_vote_weights(self.weights)
        self.lr_value()
        check_recipe(self.recipe)
        if self.top_k < 2:
            raise ParamError(f"top_k must be >= 2 (got {self.top_k})")
        if self.bagging == 1:
            raise ParamError(f"bagging must be 0 (off) or >= 2 members (got {self.bagging})")
        if self.bagging and self.run_ids:
            raise ParamError("pass either --bagging N (train new members) or --run-ids, "
                             "not both")

    def train_params(self) -> TrainParams:
        """A bagging member's parameters: the shared recipe, data and runtime fields as given."""
        values = {name: getattr(self, name) for name in inherited(EnsembleParams, TrainParams)}
        return TrainParams(**values, model=self.model, weights=self.init_weights,
                           num_workers=self.num_workers)


def explicit_vote_weights(spec: str) -> list[float] | None:
    """The numbers of `--weights w1,w2,...` (numbers, >= 0, a positive sum), or None for
    `equal` / `val_acc`; checked before any work, the count once the members are known."""
    text = str(spec).strip().lower()
    if text in ("", "equal", "val_acc"):
        return None
    try:
        values = [float(w) for w in text.split(",")]
    except ValueError:
        raise ParamError(f"weights '{spec}' are not numbers: use equal, val_acc or a "
                         "comma-separated list such as 0.5,0.3,0.2") from None
    if any(w < 0 for w in values) or sum(values) <= 0:
        raise ParamError(f"weights {values} must be >= 0 with a positive sum")
    return values


# The database `--storage auto` keeps studies in, on the PostgreSQL `cnnflow up` started.
OPTUNA_DATABASE = "optuna"


@dataclass
class TuneParams(DataParams, TrainRecipe, RuntimeParams):
    """`cnnflow tune` / `mlflow run . -e tune`. The training fields are the trials' base
    configuration; the space overrides them (ranges, lists, fixed values). `model` is
    re-declared: it may list several models, and then `model` is tuned too.

    Checked by `components.steps.tune.check` (the space, samplers and pruners are its
    registries)."""

    space: str = param("lr: loguniform(1e-5, 1e-2); batch_size: [16, 32, 64]; "
                       "dropout: uniform(0, 0.6)",
                       "Search space: a YAML file, or inline 'lr: loguniform(1e-5, 1e-2); "
                       "batch_size: [16, 32, 64]' (uniform, loguniform, int, logint, choice, "
                       "lists, fixed values).")
    model: str = param(TrainParams.model, "Model, or several comma-separated (then `model` is "
                                          "tuned too).")
    n_trials: int = param(10, "Trials this worker runs (0 with a timeout: until the timeout).",
                          ge=0, le=1_000_000)
    timeout: float = param(0.0, "Stop starting trials after this many seconds; 0 = no limit.",
                           ge=0)
    metric: str = param("val_loss", "Epoch metric to optimise: val_loss | val_acc | "
                                    "train_loss | train_acc.")
    direction: str = param("minimize", "minimize | maximize.")
    sampler: str = param("tpe", "tpe | random | grid (grid: every parameter a list).")
    pruner: str = param("median", "median | hyperband | none.")
    storage: str = param("", "Optuna storage URL (default: sqlite under .cnnflow/); a "
                             "PostgreSQL URL lets workers on many machines share a study; "
                             "auto: the PostgreSQL `cnnflow up --backend postgresql` "
                             "started, else the SQLite file.")
    study: str = param("", "Study name; workers with the same name and storage share it "
                           "(default: a new study per run).")
    trial_epochs: int = param(0, "Maximum epochs per trial; 0 = epochs (which the "
                                 "--retrain-best run always gets).", ge=0, le=100_000)
    retrain_best: bool = param(False, "Train the best configuration with full epochs, then "
                                      "evaluate it.")

    def validate(self) -> None:
        """The ranges of every field (the space, samplers and pruners: `tune.check`)."""
        from components.data.datasets import check_ratios

        check_bounds(self)
        check_ratios(self.val_ratio, self.test_ratio)
        check_recipe(self.recipe)
        if self.lr_value() is None:
            raise ParamError("tune samples lr from --space itself: drop --lr auto (put lr in "
                             "the space, or pass a number)")

    def base(self, model: str, fixed: dict[str, Any]) -> TrainParams:
        """A trial's TrainParams before its sampled values."""
        values = {name: getattr(self, name) for name in inherited(TuneParams, TrainParams)}
        values.update(model=model, epochs=self.trial_epochs or self.epochs, **fixed)
        return TrainParams(**values)

    def storage_url(self) -> str:
        """The study's RDB URL: the given one, or an SQLite file under the state folder;
        `auto`: database OPTUNA_DATABASE on the PostgreSQL `cnnflow up` started, when it did
        (its own database: MLflow's and Optuna's schemas both keep an `alembic_version`)."""
        if self.storage == "auto":
            from sqlalchemy.engine import make_url

            from components.services import postgres_uri

            if server := postgres_uri():
                return make_url(server).set(database=OPTUNA_DATABASE).render_as_string(
                    hide_password=False)
        elif self.storage:
            return self.storage
        folder = state_dir()
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'optuna.db'}"


@dataclass
class PseudoLabelParams(PredictParams):
    """`cnnflow pseudo-label` / `mlflow run . -e pseudo_label`. `experiment` is its own: by
    default the run goes to the model's run's experiment. `mode` is checked by the step
    against its placers."""

    model: str = param("", "A models:/ URI (models:/<name>@champion, models:/m-<id>) or a "
                           "training run id.")
    images: str = param("", "Folder of unlabelled images (any depth).")
    out: str = param("", "New dataset folder for the confident images (default: "
                         "<images>-pseudo).")
    threshold: float = param(0.95, "Keep images whose top probability is at least this.",
                             gt=0, le=1)
    mode: str = param("copy", "copy | hardlink | symlink: how images are placed in the new "
                              "folder.")
    experiment: str = param("", "MLflow experiment of the run (default: the model's run's "
                                "experiment).")

    def validate(self) -> None:
        check_bounds(self)
        if not self.model:
            raise ParamError("pass --model: a models:/ URI or the run id of a trained model")
        images = Path(self.images).expanduser()
        if not self.images or not images.is_dir():
            raise ParamError(f"images folder '{self.images}' does not exist: pass a folder of "
                             "unlabelled images")
        out = self.out_dir()
        if out.exists() and any(out.iterdir()):
            raise ParamError(f"output folder {out} is not empty: pass a new --out")
        if out.resolve().is_relative_to(images.resolve()):
            raise ParamError(f"output folder {out} is inside the images folder: pass an --out "
                             "elsewhere")

    def out_dir(self) -> Path:
        """Default: `<images>-pseudo` next to the images folder."""
        if self.out:
            return Path(self.out).expanduser()
        images = Path(self.images).expanduser().resolve()
        return images.with_name(f"{images.name}-pseudo")


# cleanlab's per-image label quality scores (`cleanlab.rank.get_label_quality_scores`).
LABEL_QUALITY_METHODS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")


@dataclass
class LabelIssuesParams(ReportsParams):
    """`cnnflow label-issues` / `mlflow run . -e label_issues`: its run goes to the CV parent's
    experiment, so it takes no `experiment`."""

    cv_run: str = param("", "Run id of a `cnnflow train --cv K` parent run (cv-vN): its "
                            "out-of-fold predictions are ranked.")
    rank_by: str = param("self_confidence", "Label quality score (cleanlab): self_confidence "
                                            "| normalized_margin | "
                                            "confidence_weighted_entropy.")
    top: int = param(24, "Most suspicious images drawn in label_issues.png.", ge=1, le=1000)

    def validate(self) -> None:
        check_bounds(self)
        if not self.cv_run:
            raise ParamError("pass --cv-run: the run id of a cross-validation parent run "
                             "(make one with `cnnflow train --cv 5`)")
        if self.rank_by not in LABEL_QUALITY_METHODS:
            raise ParamError(f"rank_by '{self.rank_by}' is not a label quality score: choose "
                             f"one of {', '.join(LABEL_QUALITY_METHODS)}")


@dataclass
class ExplainParams(ReportsParams, PredictParams):
    """`cnnflow explain` / `mlflow run . -e explain`. `experiment` is its own, as
    pseudo-label's: by default the run goes to the model's run's experiment."""

    model: str = param("", "A train or ensemble run id, or a models:/ URI (an ONNX export: "
                           "the model it was exported from is explained).")
    images: str = param("", "An image file, or a folder of images (any depth).")
    out: str = param("", "Output folder (default: <reports_dir>/explain/<images>_<model "
                         "run>/); an earlier explain output there is replaced.")
    experiment: str = param("", "MLflow experiment of the run (default: the model's run's "
                                "experiment).")

    def validate(self) -> None:
        check_bounds(self)
        if not self.model.strip():
            raise ParamError("pass --model: a run id of a trained model or a models:/ URI")
        if not self.images or not Path(self.images).expanduser().exists():
            raise ParamError(f"images '{self.images}' does not exist: pass an image file or a "
                             "folder of images")

    def out_dir(self, run_name: str) -> Path:
        """`--out`, or `<reports_dir>/explain/<images name>_<model run name>/`."""
        if self.out:
            return Path(self.out).expanduser()
        images = Path(self.images).expanduser().resolve()
        name = f"{images.stem if images.is_file() else images.name}_{run_name}"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
        return Path(self.reports_dir) / "explain" / (safe or "images")


@dataclass
class CascadeParams(ReportsParams, RegistryParams, PredictParams):
    """`cnnflow cascade` / `mlflow run . -e cascade`: a detector (or boxes made elsewhere)
    finds the objects, a cnnflow classifier re-labels the crops of the `refine` classes
    (`batch_size` crops per forward pass). `registered_model` is re-declared (default
    <experiment>-cascade), and `experiment` is its own, as pseudo-label's. The detector name
    and the refine names are checked by the step against the registry and the detector's
    classes."""

    images: str = param("", "Folder of scene images (any depth).")
    classifier: str = param("", "The classifier stage: a models:/ URI (models:/<name>@champion, "
                                "models:/m-<id>) or a train or ensemble run id.")
    detector: str = param("", "Detector stage: fasterrcnn_mobilenet_v3_large_fpn | "
                              "fasterrcnn_mobilenet_v3_large_320_fpn | "
                              "ssdlite320_mobilenet_v3_large | retinanet_resnet50_fpn_v2; or "
                              "--boxes.")
    detector_weights: str = param("coco", "coco (torchvision's COCO weights, from the torch "
                                          "hub cache) | PATH to a detector file (cnnflow's "
                                          "save_detector, or a torchvision state dict).")
    download_weights: bool = param(False, "With --detector-weights coco: download them into "
                                          "the torch hub cache when missing (needs network).")
    boxes: str = param("", "Detections made elsewhere, instead of --detector: a folder of YOLO "
                           "txt files (class cx cy w h [score], normalised; classes.txt names "
                           "the classes) or a COCO JSON file.")
    refine: str = param("", "Comma-separated detector classes the classifier re-labels, e.g. "
                            "'cup,wine glass'; the other boxes keep the detector's label.")
    score_threshold: float = param(0.5, "Drop boxes the detector scored below this.", ge=0,
                                   le=1)
    iou_threshold: float = param(0.5, "Non-maximum suppression across classes: of two boxes "
                                      "overlapping more than this IoU the lower-scored goes "
                                      "(1 = off).", ge=0, le=1)
    margin: float = param(0.1, "Crop padding on each side, as a share of the box's width and "
                               "height.", ge=0, le=1)
    min_box: int = param(8, "Drop boxes narrower or shorter than this many pixels.", ge=0,
                         le=100_000)
    ground_truth: str = param("", "True boxes of the final classes (YOLO txt folder or COCO "
                                  "JSON): precision and recall per class at IoU 0.5, mAP@0.5 "
                                  "and the confusion of final labels, logged to the run.")
    out: str = param("", "Output folder (default: <reports_dir>/cascade/<images folder>/): "
                         "detections.csv and annotated/; an earlier cascade output there is "
                         "replaced.")
    annotated_artifacts: int = param(8, "Annotated images logged to the run (all of them are "
                                        "written to --out).", ge=0, le=1000)
    register: bool = param(True, "With --detector: register the logged cascade model (alias "
                                 "challenger).")
    registered_model: str = param("", "Registered model name of the cascade (default: "
                                      "<experiment>-cascade).")
    experiment: str = param("", "MLflow experiment of the run (default: the classifier's "
                                "run's experiment).")

    def validate(self) -> None:
        """Cheap checks first: no model is loaded and no run exists before they pass."""
        check_bounds(self)
        if not self.classifier.strip():
            raise ParamError("pass --classifier: a models:/ URI or the run id of a trained "
                             "classifier")
        images = Path(self.images).expanduser()
        if not self.images or not images.is_dir():
            raise ParamError(f"images folder '{self.images}' does not exist: pass a folder of "
                             "scene images")
        if bool(self.detector.strip()) == bool(self.boxes.strip()):
            raise ParamError("pass exactly one of --detector (a torchvision detector) or "
                             "--boxes (detections made elsewhere)")
        if not self.refine_list():
            raise ParamError("pass --refine: the detector classes the classifier re-labels, "
                             "e.g. --refine 'cup,wine glass'")
        for name in ("boxes", "ground_truth"):
            value = getattr(self, name)
            if value and not Path(value).expanduser().exists():
                raise ParamError(f"{name} '{value}' does not exist: pass a folder of YOLO txt "
                                 "files or a COCO JSON file")
        out = self.out_dir()
        if out.resolve().is_relative_to(images.resolve()):
            raise ParamError(f"output folder {out} is inside the images folder: pass an --out "
                             "elsewhere")
        if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                                  and not (out / "detections.csv").is_file())):
            raise ParamError(f"output folder {out} exists and holds no earlier cascade "
                             "output: pass a new --out")

    def refine_list(self) -> list[str]:
        return split_list(self.refine, whitespace=False)  # "wine glass" is one class

    def out_dir(self) -> Path:
        """`--out`, or `<reports_dir>/cascade/<images folder name>/`."""
        if self.out:
            return Path(self.out).expanduser()
        name = Path(self.images).expanduser().resolve().name or "images"
        return Path(self.reports_dir) / "cascade" / name


@dataclass
class SyncParams:
    """`cnnflow sync` / `mlflow run . -e sync`."""

    experiments: str = param("", "Comma-separated experiment names to mirror (default: all).")
    follow: bool = param(False, "Keep polling until stopped (Ctrl-C / SIGTERM) instead of one "
                                "pass.")
    interval: float = param(2.0, "Seconds between passes with --follow.", gt=0)
    dead_after: float = param(60.0, "A RUNNING run silent this many seconds (no heartbeat, "
                                    "metric or system metric) shows as `died`.", gt=0)
    reconcile_every: float = param(60.0, "Seconds between full listings that catch edits to "
                                         "long-finished runs (0 = every pass).", ge=0)
    rebuild: bool = param(False, "Drop the mirror and rebuild it from MLflow.")

    def validate(self) -> None:
        check_bounds(self)

    def experiment_list(self) -> list[str]:
        return split_list(self.experiments, whitespace=False)  # a name may hold spaces


@dataclass
class PipelineParams(DataParams, VoteParams, PromotionParams, ReportsParams, TrainRecipe,
                     RuntimeParams):
    """`cnnflow run` / `mlflow run . -e main`: the training recipe is `train`'s, so both
    commands train the same model by default. `min_delta` is the promotion rule's
    (PromotionParams comes before TrainRecipe, so its field wins): training's early-stopping
    `min_delta` keeps train's default here."""

    models: str = param("custom_cnn,resnet50,vgg16,mobilenetv2",
                        "Comma-separated models to train, e.g. "
                        "custom_cnn,resnet50,vgg16,mobilenetv2.")
    cache: bool = param(True, "Build preprocess's uint8 tensor cache and train from it.")
    sync: bool = param(True, "Mirror the experiment into MongoDB at the end (needs MONGO_URI "
                             "or `cnnflow up`).")
    report: bool = param(True, "Write reports/<experiment>/report.{md,html} and log it into "
                               "the parent run.")
    force: bool = param(False, "Re-run every step even when a finished run with the same "
                               "inputs exists.")

    # How the pipeline runs, not what it computes: left out of the pipeline's key.
    RUNTIME = ("experiment", "sync", "report", "reports_dir", "device", "amp", "num_workers",
               "log_timeout", "heartbeat", "system_metrics", "compile", "force")

    def model_list(self) -> list[str]:
        return split_list(self.models)

    def validate(self) -> None:
        """Every step's checks up front: a typo must not surface after an hour of training."""
        from components.nn.models import get_spec
        from components.serving.ensemble import get_vote
        from components.tracking.registry import VERSION_METRICS

        check_bounds(self)
        models = self.model_list()
        if not models:
            raise ParamError("models is empty: pass a comma-separated list, e.g. "
                             "--models custom_cnn,resnet18")
        if len(set(models)) != len(models):
            raise ParamError(f"a model is listed twice in --models '{self.models}': list "
                             "each model once")
        for model in models:
            get_spec(model)
        if self.top_k == 1:
            raise ParamError(f"top_k must be 0 (no ensemble) or >= 2 (got {self.top_k})")
        get_vote(self.vote)
        if self.metric not in VERSION_METRICS:
            raise ParamError(f"metric '{self.metric}' is not one evaluate records on a "
                             f"version: choose one of {', '.join(VERSION_METRICS)}")
        EdaParams(data=self.data, val_ratio=self.val_ratio, test_ratio=self.test_ratio).validate()
        self.preprocess_params("").validate()
        for model in models:
            self.train_params(model, "").validate()

    def preprocess_params(self, experiment: str) -> PreprocessParams:
        return PreprocessParams(
            data=self.data, experiment=experiment,
            train_ratio=round(1.0 - self.val_ratio - self.test_ratio, 10),
            val_ratio=self.val_ratio, test_ratio=self.test_ratio, seed=self.seed,
            cache=self.cache, image_size=self.image_size)

    def train_params(self, model: str, preprocess_run: str, experiment: str = "") -> TrainParams:
        """One model's training: every recipe, data and runtime field as given here."""
        values = {name: getattr(self, name) for name in inherited(PipelineParams, TrainParams)}
        values.update(model=model, preprocess_run=preprocess_run, experiment=experiment)
        return TrainParams(**values)

    def logged(self) -> dict[str, Any]:
        return {f.name: bool_text(getattr(self, f.name)) for f in fields(self)
                if f.name not in ("experiment", "force")}

    def key_inputs(self) -> dict[str, Any]:
        return {k: v for k, v in self.logged().items() if k not in self.RUNTIME}
