"""The project's declared interfaces stay in step with the code."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from components.steps.train import param_defaults

ROOT = Path(__file__).resolve().parents[1]


def test_mlproject_train_parameters_match_the_cli_defaults():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    train = spec["entry_points"]["train"]
    declared = {name: p["default"] for name, p in train["parameters"].items()}
    defaults = param_defaults()
    assert declared.keys() == defaults.keys()
    for name, default in defaults.items():
        if isinstance(default, bool):  # MLproject passes "true"/"false" strings
            assert str(declared[name]).lower() == str(default).lower(), name
        else:
            assert type(default)(declared[name]) == default, name
        assert f"--{name.replace('_', '-')} {{{name}}}" in train["command"], name


def test_conda_env_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(d for d in pip_deps if d != "-e .") == sorted(project["dependencies"])


def test_mlproject_data_step_parameters_match_their_dataclasses():
    """eda and preprocess: same names, defaults and command-line flags as the CLI."""
    import dataclasses

    from components.steps.eda import EdaParams
    from components.steps.preprocess import PreprocessParams

    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    for step, params_cls in (("eda", EdaParams), ("preprocess", PreprocessParams)):
        entry = spec["entry_points"][step]
        declared = {name: p["default"] for name, p in entry["parameters"].items()}
        defaults = {f.name: f.default for f in dataclasses.fields(params_cls)}
        assert declared.keys() == defaults.keys(), step
        for name, default in defaults.items():
            if isinstance(default, bool):  # MLproject passes "true"/"false" strings
                assert str(declared[name]).lower() == str(default).lower(), (step, name)
            else:
                assert type(default)(declared[name]) == default, (step, name)
            assert f"--{name.replace('_', '-')} {{{name}}}" in entry["command"], (step, name)
        assert f"python -m pipelines.{step}" in entry["command"]


def test_mlproject_tune_pseudo_label_and_main_parameters_match_their_dataclasses():
    import dataclasses

    from components.steps.main import PipelineParams
    from components.steps.pseudo_label import PseudoLabelParams
    from components.steps.tune import TuneParams

    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    for step, params_cls, module in (("tune", TuneParams, "tune"),
                                     ("pseudo_label", PseudoLabelParams, "pseudo_label"),
                                     ("main", PipelineParams, "main")):
        entry = spec["entry_points"][step]
        declared = {name: p["default"] for name, p in entry["parameters"].items()}
        defaults = {f.name: f.default for f in dataclasses.fields(params_cls)}
        assert declared.keys() == defaults.keys(), step
        for name, default in defaults.items():
            if isinstance(default, bool):
                assert str(declared[name]).lower() == str(default).lower(), (step, name)
            else:
                assert type(default)(declared[name]) == default, (step, name)
            assert f"--{name.replace('_', '-')} {{{name}}}" in entry["command"], (step, name)
        assert f"python -m pipelines.{module}" in entry["command"]


def test_readme_documents_every_train_parameter():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in param_defaults() if f"| `{name}` |" not in readme]
    assert missing == []
