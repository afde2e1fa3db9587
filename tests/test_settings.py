"""Settings are defined once: the CLI's options come from the dataclass fields, both refuse the same
values, the library's errors name the field and the CLI's name the flag."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

import kdcache
from kdcache.cli import main


def command_options(name: str) -> dict[str, object]:
    return {param.name: param for param in main.commands[name].params}


@pytest.mark.parametrize("settings_class, command", [(kdcache.DumpSettings, "dump-teacher"),
                                                      (kdcache.TrainSettings, "train-student")])
def test_every_setting_is_an_option_with_its_default_and_help(settings_class, command):
    options = command_options(command)
    for field in dataclasses.fields(settings_class):
        option = options[field.name]
        assert option.opts[0] == "--" + field.name.replace("_", "-")
        assert field.metadata["help"] and option.help == field.metadata["help"]
        if field.type != "tuple[int, ...]":
            assert option.default == field.default, field.name


@pytest.mark.parametrize("settings, fragment", [
    (lambda: kdcache.TrainSettings(lr=-1), "`lr` must be positive, got -1"),
    (lambda: kdcache.TrainSettings(epochs=0), "`epochs` must be positive, got 0"),
    (lambda: kdcache.TrainSettings(kd_weight=-1), "`kd_weight` must not be negative, got -1"),
    (lambda: kdcache.TrainSettings(loss="kl"), "`loss` must be one of forward_kl,"),
    (lambda: kdcache.TrainSettings(temperature=float("nan")), "`temperature` must be a number"),
    (lambda: kdcache.TrainSettings(early_stopping=2, val_fraction=0.1), "`early_stopping` needs `eval_every`"),
    (lambda: kdcache.DumpSettings(top_k=0), "`top_k` must be positive, got 0"),
    (lambda: kdcache.DumpSettings(fidelity_every=-3), "`fidelity_every` must be positive, got -3"),
])
def test_a_settings_object_refuses_bad_values_naming_the_field(settings, fragment):
    with pytest.raises(kdcache.KDCacheError) as error:
        settings()
    assert fragment in str(error.value)


@pytest.mark.parametrize("args, fragment", [
    (["--lr", "-1"], "Error: --lr must be positive, got -1.0"),
    (["--epochs", "0"], "Error: --epochs must be positive, got 0"),
    (["--val-fraction", "0.1", "--early-stopping", "2"], "Error: --early-stopping needs --eval-every"),
])
def test_the_cli_names_the_flag(tmp_path, args, fragment):
    result = CliRunner().invoke(main, ["train-student", "--cache", str(tmp_path), "--out", str(tmp_path / "out"),
                                       "--student-config", "x.json", *args])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(fragment), result.output
    assert not (tmp_path / "out").exists()
