"""``kvstacks cachegen fit``: profile sample KV of a model and write a table file."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
from kvstacks.errors import ConfigError


def load_kv_file(path: Path) -> list[np.ndarray]:
    """KV arrays [2, layers, tokens, hidden] from .npy or .npz (never pickled objects)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{path}: cannot read it as .npy/.npz without pickle ({exc})", param_hint="--kv") from None
    arrays = [loaded[name] for name in loaded.files] if isinstance(loaded, np.lib.npyio.NpzFile) else [loaded]
    for a in arrays:
        if a.ndim != 4 or a.shape[0] != 2 or a.dtype.kind != "f":
            raise click.BadParameter(f"{path}: expected float arrays [2, layers, tokens, hidden], got "
                                     f"{a.shape} {a.dtype}", param_hint="--kv")
    return arrays


def model_kv(model: str, gguf_file: str | None, texts: list[Path]) -> Iterator[np.ndarray]:
    """Run a transformers causal LM over each text and yield its KV as [2, L, T, H] float32.

    Loading and the cache layout come from kvstacks-transformers, the one place
    that knows how a model's cache maps to kvstacks' [2, layers, tokens, hidden].
    """
    try:
        import torch
        from kvstacks_transformers.layout import KVLayout, UnsupportedModel
        from kvstacks_transformers.smollm2 import ModelUnavailable, load_smollm2
    except ImportError:
        raise click.ClickException("--model needs kvstacks-transformers: pip install 'kvstacks-cachegen[fit]' "
                                   "(or pip install -e contrib/transformers)") from None
    if model == "smollm2":
        try:
            lm, tok = load_smollm2(progress=True)
        except ModelUnavailable as exc:
            raise click.ClickException(str(exc)) from None
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            tok = AutoTokenizer.from_pretrained(model, **kwargs)
            lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **kwargs).eval()
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"cannot load --model {model}: {exc}") from None
    try:
        layout = KVLayout.from_model(lm)
    except UnsupportedModel as exc:
        raise click.ClickException(str(exc)) from None
    for text in texts:
        ids = tok(text.read_text(), return_tensors="pt").input_ids
        with torch.no_grad():
            cache = lm(ids, use_cache=True).past_key_values
        yield layout.cache_to_kv(cache, dtype=torch.float32).numpy()


def fit_tables(compressor, samples: list[np.ndarray], chunk_size: int, classes_per_group: int, model: str):
    """Quantize the samples chunk by chunk as ``compressor`` would and fit classes to the histograms."""
    from kvstacks_cachegen.slabs import quantize_parts
    from kvstacks_cachegen.tables import Tables, fit_classes

    layers, hidden = samples[0].shape[1], samples[0].shape[3]
    bins = compressor.bins_for(layers)
    width = max(bins)
    hist = np.zeros((2 * layers * hidden, width), dtype=np.int64)
    row_bins = np.tile(np.repeat(np.asarray(bins), hidden), 2)
    for kv in samples:
        if kv.shape[1] != layers or kv.shape[3] != hidden:
            raise click.BadParameter(f"samples differ in shape: {kv.shape} vs layers {layers} hidden {hidden}")
        for start in range(0, kv.shape[2], chunk_size):
            x = np.ascontiguousarray(kv[:, :, start:start + chunk_size], dtype=np.float32)
            n_sink = compressor.sink_count(x)
            for last, _, _, q in quantize_parts(x[:, :, n_sink:], bins, compressor.clip,
                                                compressor.options.anchor_every, np.dtype(np.float32)):
                if not last:
                    continue
                rows = q.symbols.transpose(0, 1, 3, 2).reshape(2 * layers * hidden, -1).astype(np.int64)
                flat = (rows + (np.arange(rows.shape[0]) * width)[:, None]).reshape(-1)
                hist += np.bincount(flat, minlength=hist.size).reshape(hist.shape)
    classes, row_class = fit_classes(hist, row_bins, classes_per_group)
    return Tables(model, layers, hidden, bins, compressor.clip, compressor.options.anchor_every, classes, row_class)


@click.group("cachegen")
def cachegen() -> None:
    """CacheGen compression: fit symbol tables for a model."""


@cachegen.command("fit")
@click.option("--kv", "kv_files", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              help="Sample KV as .npy/.npz arrays [2, layers, tokens, hidden] (repeatable).")
@click.option("--model", help="A transformers model directory, or 'smollm2', to compute sample KV from --text.")
@click.option("--gguf-file", help="GGUF file inside --model.")
@click.option("--text", "texts", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              help="Sample text to run through --model (repeatable).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Table file to write (JSON).")
@click.option("--level", type=click.Choice(["high", "default", "low"]), default="default", show_default=True)
@click.option("--bins", help="Bins per layer group, e.g. 32,16,16 (overrides --level).")
@click.option("--clip", type=float, default=4.0, show_default=True)
@click.option("--anchor-every", type=int, default=0, show_default=True)
@click.option("--classes", "classes_per_group", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Distribution classes per bins group.")
@click.option("--chunk-size", type=click.IntRange(1, 1 << 20), default=256, show_default=True)
@click.option("--name", "model_name", default="", help="Model name recorded in the file.")
def fit(kv_files, model, gguf_file, texts, out, level, bins, clip, anchor_every, classes_per_group,
        chunk_size, model_name) -> None:
    """Profile sample KV and write a table file for compressor_options.tables."""
    from kvstacks_cachegen.compressor import CacheGenCompressor

    if not kv_files and not (model and texts):
        raise click.UsageError("give sample KV with --kv, or --model and --text to compute it")
    try:
        groups = [int(b) for b in bins.split(",")] if bins else None
    except ValueError:
        raise click.BadParameter(f"{bins!r} is not a comma list of integers", param_hint="--bins") from None
    try:
        compressor = CacheGenCompressor(CacheGenCompressor.Options(
            level=level, bins=groups, clip=clip, anchor_every=anchor_every, workers=0))
    except ConfigError as exc:
        raise click.BadParameter(exc.message, param_hint="--" + exc.path.rsplit(".", 1)[-1].replace("_", "-")) from None
    samples = [a for f in kv_files for a in load_kv_file(f)]
    if model and texts:
        samples.extend(model_kv(model, gguf_file, list(texts)))
    tables = fit_tables(compressor, samples, chunk_size, classes_per_group, model_name or (model or ""))
    tables.save(out)
    tokens = sum(s.shape[2] for s in samples)
    click.echo(f"wrote {out}: {len(tables.classes)} classes for {tables.layers} layers x {tables.hidden} "
               f"hidden, bins {sorted(set(tables.bins), reverse=True)}, from {tokens} tokens; "
               f"table id {tables.table_id.hex()}", file=sys.stdout)
