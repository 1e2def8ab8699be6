"""kvstacks-cachegen: CacheGen-style lossy KV compression on CPU.

Registers the compressor ``cachegen`` (lossy) and the ``kvstacks cachegen fit``
command that fits symbol tables for a model. The lossless option is core's
``zstd`` compressor (byte planes plus zstd), so it is not repeated here.
"""

from __future__ import annotations

from typing import Any

import pluggy

# The same marker as ``kvstacks.hookimpl``, made here so that the coder worker
# processes (``python -m kvstacks_cachegen.coder_worker``), which import this
# package, start without importing kvstacks and torch.
hookimpl = pluggy.HookimplMarker("kvstacks")


@hookimpl
def register_compressors(register) -> None:
    from kvstacks_cachegen.compressor import CacheGenCompressor
    register(CacheGenCompressor)


@hookimpl
def register_cli_commands(cli: Any) -> None:
    from kvstacks_cachegen.cli import cachegen

    cli.add_command(cachegen)
