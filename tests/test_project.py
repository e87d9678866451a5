"""The project's declared interfaces stay in step with the code: MLproject, the parameter
reference and the command line are generated from the parameter dataclasses."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from components.nn.config import TrainConfig
from components.params import DataParams, RuntimeParams, param
from components.steps.params import (
    EnsembleParams,
    PipelineParams,
    PromotionParams,
    TrainParams,
    TrainRecipe,
    TuneParams,
)
from pipelines.mlproject import (
    DOCS_COMMAND,
    ENTRY_POINTS,
    MLPROJECT_COMMAND,
    entry_point,
    mlproject,
    parameters_md,
)
from pipelines.options import dataclass_options

ROOT = Path(__file__).resolve().parents[1]


def test_committed_mlproject_is_the_generated_one():
    assert (ROOT / "MLproject").read_text() == mlproject(), (
        f"MLproject differs from the parameter dataclasses: run `{MLPROJECT_COMMAND}`")


def test_committed_parameter_reference_is_the_generated_one():
    assert (ROOT / "docs" / "parameters.md").read_text() == parameters_md(), (
        f"docs/parameters.md differs from the parameter dataclasses: run `{DOCS_COMMAND}`")


def test_every_entry_point_passes_every_parameter_on_its_command_line():
    """`mlflow run` hands each value over as `--name-with-dashes {name}`."""
    spec = yaml.safe_load(mlproject())
    assert spec["name"] == "cnnflow" and spec["conda_env"] == "conda.yaml"
    assert list(spec["entry_points"]) == list(ENTRY_POINTS)
    for name, entry in spec["entry_points"].items():
        assert entry["command"].startswith("python -m pipelines."), name
        for param_name in entry["parameters"]:
            assert f"--{param_name.replace('_', '-')} {{{param_name}}}" in entry["command"]


def test_a_field_added_to_train_params_reaches_the_cli_and_mlproject():
    """Adding a train parameter is one field: the options and the entry point follow."""
    extended = dataclasses.make_dataclass("Extended", [
        ("swa_start", float, param(0.0, "Epoch to start weight averaging; 0 = off.")),
        ("swa_bn", bool, param(False, "Recompute BatchNorm statistics after averaging.")),
    ], bases=(TrainParams,))

    @click.command()
    @dataclass_options(extended)
    def command(**kwargs):
        click.echo(repr(extended(**kwargs)))

    options = {p.name: p for p in command.params}
    assert options["swa_start"].opts == ["--swa-start"]
    assert options["swa_start"].help == "Epoch to start weight averaging; 0 = off."
    assert options["swa_bn"].type is click.BOOL
    result = CliRunner().invoke(command, ["--swa-start", "1.5", "--swa-bn", "true"])
    assert "swa_start=1.5" in result.output and "swa_bn=True" in result.output, result.output
    assert "model='custom_cnn'" in result.output  # the inherited fields keep their defaults

    entry = yaml.safe_load("entry_points:\n" + entry_point("train", "pipelines.train",
                                                             extended))["entry_points"]["train"]
    assert entry["parameters"]["swa_start"] == {"type": "float", "default": 0.0}
    assert entry["parameters"]["swa_bn"] == {"type": "string", "default": "false"}
    assert "--swa-start {swa_start}" in entry["command"]
    assert "--swa-bn {swa_bn}" in entry["command"]
    assert entry["parameters"].keys() - {"swa_start", "swa_bn"} == {
        f.name for f in dataclasses.fields(TrainParams)}


def _changed(field: dataclasses.Field):
    """A value of the field's type that differs from its default."""
    default = field.default
    if isinstance(default, bool):
        return not default
    return default + 7 if isinstance(default, int | float) else f"{default}-changed"


# Recipe fields a step takes under another meaning (documented in its class's docstring).
OTHER_MEANING = {"main": {"min_delta"}, "ensemble": {"weights"}, "tune": set()}


@pytest.mark.parametrize("step", sorted(OTHER_MEANING))
def test_every_training_field_reaches_main_tune_and_bagging(step):
    """main, tune and ensemble --bagging pass each recipe, data and runtime field on to the
    TrainParams they train with, so a field added to a group reaches them with no edit."""
    shared = [f for group in (TrainRecipe, DataParams, RuntimeParams)
              for f in dataclasses.fields(group) if f.name not in OTHER_MEANING[step]]
    for field in shared:
        if field.name == "experiment" and step == "main":
            continue  # the pipeline names each training's experiment itself
        value = _changed(field)
        if step == "main":
            trained = PipelineParams(**{field.name: value}).train_params("lenet5", "")
        elif step == "tune":
            trained = TuneParams(**{field.name: value}).base("lenet5", {})
        else:
            trained = EnsembleParams(**{field.name: value}).train_params()
        assert getattr(trained, field.name) == value, (step, field.name)


def test_re_declared_fields_keep_their_own_meaning():
    fields = {cls: {f.name: f for f in dataclasses.fields(cls)}
              for cls in (PipelineParams, EnsembleParams, TrainRecipe)}
    assert fields[PipelineParams]["min_delta"] is \
        PromotionParams.__dataclass_fields__["min_delta"]
    assert EnsembleParams().weights == "equal"
    assert EnsembleParams(init_weights="none").train_params().weights == "none"
    assert EnsembleParams(weights="val_acc").train_params().weights == TrainRecipe.weights
    assert PipelineParams(min_delta=0.5).train_params("lenet5", "").min_delta == \
        TrainConfig.min_delta


def test_logged_train_params_rebuild_the_run_for_resume():
    params = TrainParams(model="lenet5", lr=0.05, cv_ensemble=True, cv=3, weights="none",
                         label_smoothing=0.1, preprocess_run="")
    logged = {k: str(v) for k, v in params.logged().items()}  # MLflow stores text
    runtime = {k: getattr(params, k) for k in TrainParams.RUNTIME}
    assert TrainParams.from_logged(logged, **runtime) == params


def test_help_imports_neither_torch_nor_mlflow():
    """`cnnflow --help`, every `cnnflow <command> --help` and the generators stay light."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from pipelines.cli import COMMANDS, cli\n"
        "from pipelines.mlproject import mlproject, parameters_md\n"
        "for args in [['--help']] + [[name, '--help'] for name in COMMANDS]:\n"
        "    result = CliRunner().invoke(cli, args)\n"
        "    assert result.exit_code == 0 and 'Usage:' in result.output, (args, result.output)\n"
        "mlproject(), parameters_md()\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'mlflow') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_conda_env_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(d for d in pip_deps if d != "-e .") == sorted(project["dependencies"])

