"""The ``kvstacks`` command line. Plugins add subcommands through ``register_cli_commands``."""

from __future__ import annotations

import json

import click

from kvstacks.errors import KVStacksError
from kvstacks.sizes import format_size


@click.group()
@click.version_option(package_name="kvstacks")
def cli() -> None:
    """kvstacks: a KV-cache storage layer for LLM serving."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List loaded plugins, their distributions, and what each registers."""
    from kvstacks.plugins import describe

    try:
        found = describe()
    except KVStacksError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for plugin in found:
        version = f" {plugin['version']}" if plugin["version"] else ""
        click.echo(f"{plugin['name']}  ({plugin['distribution']}{version})")
        if plugin.get("error"):
            click.echo(f"    FAILED TO LOAD: {plugin['error']}")
        for kind, names in sorted(plugin["registers"].items()):
            click.echo(f"    {kind.replace('_', ' ')}: {', '.join(sorted(names))}")


@cli.command()
@click.argument("stack", type=click.Path(dir_okay=False))
def check(stack: str) -> None:
    """Validate a stack YAML file against the installed plugins."""
    from kvstacks.config import load_yaml

    try:
        cfg = load_yaml(stack)
    except KVStacksError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{stack}: ok, model {cfg.model!r}, chunk_size {cfg.chunk_size}, write_mode {cfg.write_mode}")
    for i, tier in enumerate(cfg.stack):
        capacity = format_size(tier.capacity) if tier.capacity is not None else "unbounded"
        click.echo(f"  [{i}] {tier.name}: backend {tier.backend}, capacity {capacity}, "
                   f"eviction {tier.eviction}, compressor {tier.compressor}")
    if cfg.controller is not None:
        click.echo(f"  controller: {cfg.controller.get('url', '(no url)')}")


@cli.group()
def config() -> None:
    """Stack configuration helpers."""


@config.command("from-lmcache")
@click.argument("lmcache_yaml", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the stack here instead of stdout.")
def from_lmcache(lmcache_yaml: str, output: str | None) -> None:
    """Write the kvstacks stack equivalent to an LMCache worker config, and say what has no equivalent."""
    from pathlib import Path

    import yaml

    from kvstacks.config import parse_stack
    from kvstacks.lmcache import translate

    try:
        data = yaml.safe_load(Path(lmcache_yaml).read_text())
        result = translate(data)
    except OSError as exc:
        raise click.ClickException(f"cannot read {lmcache_yaml}: {exc.strerror}") from None
    except (yaml.YAMLError, ValueError) as exc:
        raise click.ClickException(f"{lmcache_yaml} is not an LMCache config: {exc}") from None
    header = [f"# kvstacks stack translated from {lmcache_yaml} by 'kvstacks config from-lmcache'"]
    header += [f"# NOTE {note}" for note in result.notes]
    text = "\n".join(header) + "\n" + yaml.safe_dump(result.stack, sort_keys=False)
    if output:
        Path(output).write_text(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    try:
        parse_stack(result.stack, lmcache_yaml)
    except KVStacksError as exc:
        click.echo(f"note: the stack does not pass 'kvstacks check' here yet: {exc}", err=True)


_DTYPES = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float32": "float32", "fp32": "float32"}


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Stack YAML to measure.")
@click.option("--layers", default=32, show_default=True, help="KV layers.")
@click.option("--hidden", default=1024, show_default=True, help="KV heads x head dim.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(sorted(_DTYPES)))
@click.option("--chunks", default=16, show_default=True, help="Chunks per round.")
@click.option("--repeats", default=3, show_default=True, help="Rounds; medians are reported.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON line.")
def bench(config_path: str, layers: int, hidden: int, dtype: str, chunks: int, repeats: int, as_json: bool) -> None:
    """Store and retrieve throughput per tier, beside a memcpy baseline measured in the same run."""
    from kvstacks.bench import run_bench

    try:
        result = run_bench(config_path, layers, hidden, _DTYPES[dtype], chunks, repeats, progress=not as_json)
    except KVStacksError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"chunk: {result['chunk_bytes'] / 2**20:.1f} MiB ({result['chunk_tokens']} tokens), "
               f"{chunks} chunks x {repeats} rounds, medians")
    click.echo(f"memcpy baseline: {result['memcpy_gbps']:.2f} GB/s")
    click.echo(f"{'tier':<12}{'store GB/s':>12}{'retrieve GB/s':>15}{'store ms/chunk':>16}{'retrieve ms/chunk':>19}{'vs memcpy':>11}")
    for name, row in result["tiers"].items():
        click.echo(f"{name:<12}{row['store_gbps']:>12.2f}{row['retrieve_gbps']:>15.2f}"
                   f"{row['store_ms']:>16.2f}{row['retrieve_ms']:>19.2f}{row['retrieve_vs_memcpy']:>10.0%}")


def main() -> None:
    from kvstacks.plugins import add_cli_commands

    add_cli_commands(cli)
    cli()

