"""Training recipes: MixUp/CutMix, EMA, gradient accumulation and clipping, balanced
sampling, torch.compile and the named presets (`--recipe`), on tiny real data."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import BIN, runs_of, subprocess_env
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from components.data.datasets import ensure_digits, load_splits, make_loaders
from components.nn.config import TrainConfig
from components.nn.engine import batch_mixer, fit, load_checkpoint
from components.nn.recipes import RECIPES, recipe_values
from components.steps.params import TrainParams
from pipelines.cli import cli

FAST = ["--image-size", "16", "--batch-size", "16", "--num-workers", "0", "--weights", "none",
        "--model", "lenet5", "--patience", "0", "--augmentation", "none"]


@pytest.fixture(scope="module")
def digits_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled digits, 16 images per class: enough to train two epochs in seconds."""
    source = ensure_digits()
    root = tmp_path_factory.mktemp("recipes") / "digits16"
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (root / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.png"))[:16]:
            shutil.copy2(image, root / folder.name / image.name)
    return root


def train_cli(*args: str):
    return CliRunner().invoke(cli, ["train", *args], catch_exceptions=False)


# --------------------------------------------------------------------------- through `train`


@pytest.mark.parametrize("args, logged", [
    (["--mixup", "0.2"], {"mixup": "0.2"}),
    (["--cutmix", "1.0"], {"cutmix": "1.0"}),
    (["--mixup", "0.2", "--cutmix", "1.0"], {"mixup": "0.2", "cutmix": "1.0"}),
    (["--ema", "0.9"], {"ema": "0.9"}),
    (["--grad-accum", "2", "--scheduler", "onecycle"], {"grad_accum": "2"}),
    (["--clip-grad-norm", "1.0"], {"clip_grad_norm": "1.0"}),
    (["--sampling", "balanced"], {"sampling": "balanced"}),
    (["--recipe", "small-photos"], {"recipe": "small-photos", "mixup": "0.2", "ema": "0.99",
                                    "augmentation": "strong", "label_smoothing": "0.1",
                                    "scheduler": "cosine"}),
    # A value passed explicitly wins over the preset's.
    (["--recipe", "small-data", "--mixup", "0.4"], {"recipe": "small-data", "mixup": "0.4",
                                                    "ema": "0.99"}),
], ids=["mixup", "cutmix", "mixup+cutmix", "ema", "grad_accum", "clip", "balanced",
        "small-photos", "small-data-override"])
def test_each_recipe_trains_two_epochs_and_logs_its_parameters(tracking, digits_small, args,
                                                               logged):
    experiment = "recipe-" + "-".join(a.strip("-") for a in args)
    result = train_cli("--data", str(digits_small), "--experiment", experiment, "--epochs",
                       "2", *FAST[:-2], *([] if "--recipe" in args else FAST[-2:]), *args)
    assert result.exit_code == 0, result.output
    (run,) = runs_of(tracking, experiment)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["epochs_run"] == 2
    assert {k: run.data.params[k] for k in logged} == logged
    assert run.data.params["recipe"] == logged.get("recipe", "none")


def test_ema_model_is_validated_checkpointed_and_logged(tracking, digits_small, tmp_path):
    """One epoch, so best.pt and last.pt hold the same (EMA) weights: the logged model's."""
    import mlflow

    result = train_cli("--data", str(digits_small), "--experiment", "ema-logged", "--epochs",
                       "1", "--ema", "0.9", *FAST)
    assert result.exit_code == 0, result.output
    (run,) = runs_of(tracking, "ema-logged")
    folder = Path(tracking.download_artifacts(run.info.run_id, "checkpoints", str(tmp_path)))
    last, best = load_checkpoint(folder / "last.pt"), load_checkpoint(folder / "best.pt")
    ema, raw = last["model"], last["raw_model"]
    assert last["ema_updates"] > 1
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if ema[k].is_floating_point())
    assert all(torch.equal(best["model"][k], ema[k]) for k in ema)
    logged = mlflow.pyfunc.load_model(run.data.tags["cnnflow.model_uri"])
    served = logged.unwrap_python_model().model.state_dict()
    assert all(torch.equal(served[k], ema[k]) for k in ema)


@pytest.mark.parametrize("args, message", [
    (["--recipe", "tiny"], "unknown recipe 'tiny': choose one of none, small-data, small-photos"),
    (["--sampling", "oversample"], "unknown sampling 'oversample': use one of balanced, none"),
    (["--ema", "1"], "ema=1 is not below 1"),
    (["--grad-accum", "0"], "grad_accum=0 is below 1"),
    (["--mixup", "-0.1"], "mixup=-0.1 is below 0"),
])
def test_bad_recipe_values_are_one_line_and_create_no_run(tracking, digits_small, args, message):
    result = train_cli("--data", str(digits_small), "--experiment", "bad-recipe", *FAST, *args)
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert runs_of(tracking, "bad-recipe") == []


def test_balanced_sampling_does_not_combine_with_nproc(tracking, digits_small):
    result = train_cli("--data", str(digits_small), "--experiment", "bad-recipe", *FAST,
                       "--sampling", "balanced", "--nproc", "2", "--device", "cpu")
    assert result.exit_code == 1
    assert "does not combine with --nproc > 1" in result.output
    assert len(result.output.strip().splitlines()) == 1


def _compile_run(uri: str, data: Path, experiment: str, timeout: float, **env: str):
    return subprocess.run(
        [str(BIN / "cnnflow"), "train", "--data", str(data), "--experiment", experiment,
         "--epochs", "1", "--compile", "true", "--device", "cpu", *FAST],
        capture_output=True, text=True, timeout=timeout, env=subprocess_env(uri, **env))


def test_compile_without_a_compiler_is_one_line(tracking, mlflow_server, digits_small,
                                                tmp_path):
    """A fresh inductor cache and no C++ compiler: the probe fails before the first batch."""
    proc = _compile_run(mlflow_server, digits_small, "compile-broken", 300,
                        CXX=str(tmp_path / "no-such-compiler"),
                        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "torch.compile does not work on this platform" in errors[0]
    assert errors[0].endswith("drop --compile")
    (run,) = runs_of(tracking, "compile-broken")
    assert run.info.status == "FAILED"


def test_compile_trains_or_says_to_drop_it(tracking, mlflow_server, digits_small):
    try:
        proc = _compile_run(mlflow_server, digits_small, "compile-ok", 60)
    except subprocess.TimeoutExpired:
        pytest.skip("torch.compile took more than 60 s on this machine (a cold inductor "
                    "cache on busy cores); the failure path is tested above")
    if proc.returncode:
        assert proc.stderr.strip().splitlines()[-1].endswith("drop --compile"), proc.stderr
    else:
        (run,) = runs_of(tracking, "compile-ok")
        assert run.data.params["compile"] == "true" and run.info.status == "FINISHED"


# --------------------------------------------------------------------------- the engine


def test_mixup_and_cutmix_targets_are_probabilities():
    torch.manual_seed(0)
    images, labels = torch.rand(16, 3, 16, 16), torch.arange(16) % 4
    for config in (TrainConfig(mixup=0.4), TrainConfig(cutmix=1.0),
                   TrainConfig(mixup=0.4, cutmix=1.0)):
        mixed, targets = batch_mixer(config, 4)(images, labels)
        assert targets.shape == (16, 4)
        assert torch.allclose(targets.sum(1), torch.ones(16))
        assert (targets >= 0).all() and (targets.max(1).values < 1).any()  # really mixed
        assert not torch.equal(mixed, images)
    assert batch_mixer(TrainConfig(), 4) is None


def _linear_model(seed: int = 3) -> nn.Module:
    """No batch-norm: the forward of 2 x 16 images equals that of 32, so gradients can too."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 5))


def _tensors(n: int, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=generator),
                         torch.randint(0, 5, (n,), generator=generator))


def test_two_accumulated_batches_of_16_step_like_one_batch_of_32(tmp_path):
    """Plain SGD with lr 1 moves each weight by exactly its gradient: equal weights after
    one step are equal gradients."""
    data, val = _tensors(32), DataLoader(_tensors(8, 1), batch_size=8)
    after = {}
    for batch, accum in ((32, 1), (16, 2)):
        model = _linear_model()
        config = TrainConfig(epochs=1, optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0,
                             grad_accum=accum, patience=0)
        fit(model, DataLoader(data, batch_size=batch), val, config, tmp_path / str(accum),
            device="cpu", progress=False)
        after[accum] = model.state_dict()
    before = _linear_model().state_dict()
    for name, start in before.items():
        moved = after[1][name] - start
        assert moved.abs().max() > 1e-3  # it did step
        assert torch.allclose(after[2][name] - start, moved, atol=1e-6, rtol=0), name


def test_accumulation_steps_at_the_end_of_an_odd_epoch(tmp_path):
    """3 batches with grad_accum 2: a step after batch 2 and one after the last batch."""
    model = _linear_model()
    config = TrainConfig(epochs=1, grad_accum=2, patience=0, optimizer="adam")
    result = fit(model, DataLoader(_tensors(48), batch_size=16),
                 DataLoader(_tensors(8, 1), batch_size=8), config, tmp_path,
                 device="cpu", progress=False)
    steps = {int(s["step"]) for s in load_checkpoint(result.last_path)["optimizer"]["state"]
             .values()}
    assert steps == {2}


def _ema_fit(checkpoints: Path, epochs: int, resume: Path | None = None):
    torch.manual_seed(7)  # the same initial weights for every call
    conv = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    train = DataLoader(_tensors(64), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    config = TrainConfig(epochs=epochs, ema=0.8, mixup=0.2, patience=0)
    return fit(conv, train, DataLoader(_tensors(16, 1), batch_size=8), config, checkpoints,
               device="cpu", progress=False, resume_from=resume, seed=5)


def test_resume_restores_the_ema_exactly(tmp_path):
    whole = load_checkpoint(_ema_fit(tmp_path / "whole", 3).last_path)
    first = _ema_fit(tmp_path / "broken", 1)
    resumed = load_checkpoint(_ema_fit(tmp_path / "broken", 3, first.last_path).last_path)
    assert resumed["ema_updates"] == whole["ema_updates"] == 12
    for key in ("model", "raw_model"):
        for name, tensor in whole[key].items():
            assert torch.equal(resumed[key][name], tensor), (key, name)
    assert any(not torch.equal(whole["model"][k], whole["raw_model"][k])
               for k in whole["model"] if whole["model"][k].is_floating_point())
    assert [h["val_loss"] for h in resumed["history"]] == \
        [h["val_loss"] for h in whole["history"]]


# --------------------------------------------------------------------------- data and presets


def test_balanced_sampling_draws_classes_about_evenly_on_a_9_to_1_folder(image_folder):
    splits = load_splits(image_folder({"many": 90, "few": 10}), val_ratio=0.1, test_ratio=0.1)
    share = {}
    for sampling in ("none", "balanced"):
        loader = make_loaders(splits, 16, 16, sampling=sampling, num_workers=0, seed=1)["train"]
        drawn = torch.cat([labels for _ in range(5) for _, labels in loader])
        share[sampling] = (drawn == splits.classes.index("few")).float().mean().item()
    assert 0.05 < share["none"] < 0.15
    assert 0.4 < share["balanced"] < 0.6
    again = make_loaders(splits, 16, 16, sampling="balanced", num_workers=0, seed=1)["train"]
    first = make_loaders(splits, 16, 16, sampling="balanced", num_workers=0, seed=1)["train"]
    assert [lb.tolist() for _, lb in again] == [lb.tolist() for _, lb in first]  # seeded


def test_every_recipe_sets_known_parameters_with_valid_values():
    """Iterates the registry, so a new preset is checked without touching this test."""
    for name in RECIPES:
        params = TrainParams(recipe=name)
        for field, value in recipe_values(name).items():
            assert getattr(params, field) == value, (name, field)
        params.validate()
        assert name in TrainParams.__dataclass_fields__["recipe"].metadata["help"]


def test_tune_refuses_a_space_value_the_recipe_would_replace():
    """A trial's recipe fills the fields at their defaults again: mixup 0 would become 0.2."""
    from components.steps.params import TuneParams
    from components.steps.tune import TuneError, check

    with pytest.raises(TuneError, match=r"mixup: the space holds 0.0, which --recipe "
                                        r"small-data turns into 0.2 in every trial"):
        check(TuneParams(recipe="small-data", space="mixup: [0.0, 0.4]"))
    with pytest.raises(TuneError, match="augmentation: the space holds 'light'"):
        check(TuneParams(space="recipe: [none, small-photos]; augmentation: [light, strong]"))
    check(TuneParams(recipe="small-data", space="mixup: [0.1, 0.4]; ema: uniform(0.9, 0.99)"))
    check(TuneParams(space="recipe: [none, small-data]; lr: loguniform(1e-4, 1e-2)"))
