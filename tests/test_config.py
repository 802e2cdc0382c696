from dataclasses import dataclass

import pytest

from fromfeedback.config import build_config, describe_fields, parse_overrides
from fromfeedback.files import UserError
from fromfeedback.sft import SFTConfig


@dataclass
class Example:
    lr: float = 1e-5
    """Learning rate."""
    steps: int = 10
    """Steps."""
    name: str = "x"
    """A name."""
    flag: bool = False
    """A switch."""
    layers: list[int] | None = None
    """Some layers."""


def test_parse_overrides_forms():
    assert parse_overrides(["--lr", "3e-5", "--max-steps=10", "batch_size=4"]) == {"lr": "3e-5", "max_steps": "10", "batch_size": "4"}
    with pytest.raises(UserError, match="needs a value"):
        parse_overrides(["--lr"])
    with pytest.raises(UserError, match="unexpected argument"):
        parse_overrides(["stray"])


def test_preset_then_overrides(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('[ex]\nlr = 0.5\nsteps = 3\nname = "from-preset"\n')
    config = build_config(Example, str(preset), "ex", ["--steps", "7", "--flag", "true", "--layers", "1,2"])
    assert config == Example(lr=0.5, steps=7, name="from-preset", flag=True, layers=[1, 2])


def test_errors_name_the_field(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('[ex]\nsteps = "many"\n')
    with pytest.raises(UserError, match=r"p.toml \[ex\].steps: expected an integer"):
        build_config(Example, str(preset), "ex")
    with pytest.raises(UserError, match=r"unknown field\(s\) \['stepz'\]"):
        build_config(Example, None, "ex", ["--stepz", "3"])
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        build_config(Example, "nope", "ex")


def test_demo_preset_builds_and_every_field_is_documented():
    config = build_config(SFTConfig, "demo", "sft")
    assert config.model == "smollm2-135m" and config.max_steps > 0
    text = describe_fields(SFTConfig)
    assert all(f"--{name.replace('_', '-')} " in text for name in SFTConfig.__dataclass_fields__)
    assert "): \n" not in text + "\n", "a field has no docstring"
