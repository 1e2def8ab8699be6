"""Write the version 1 payloads that test_rans.py checks still decode.

Run once with the version 1 coder (kvstacks-cachegen before payload version 2,
commit 4a7ba72) first on the path; it writes each payload and the SHA-256 of
the bits that coder's own decoder gave for it:

    PYTHONPATH=<v1 checkout>/plugins/cachegen python tests/plugins/cachegen/data/make_v1_payloads.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from kvstacks_cachegen.cli import fit_tables
from kvstacks_cachegen.compressor import VERSION, CacheGenCompressor

HERE = Path(__file__).parent
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CASES = {
    # large enough (262,144 values) that decoding splits across coder workers
    "v1-fp16-default": ((2, 4, 256, 128), "float16", {}),
    "v1-bf16-low-sinks": ((2, 6, 64, 64), "bfloat16", {"level": "low", "sinks": "always"}),
    "v1-fp32-anchors": ((2, 3, 70, 32), "float32", {"anchor_every": 10}),
    "v1-fp16-tables": ((2, 4, 64, 64), "float16", {"tables": "v1-tables.json"}),
}


def kv_of(shape: tuple[int, ...], dtype: str, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.standard_t(5, size=shape) * rng.uniform(0.2, 3, size=(2, shape[1], 1, shape[3])) \
        + rng.normal(size=(2, shape[1], 1, shape[3]))
    return torch.from_numpy(x.astype(np.float32)).to(DTYPES[dtype])


def main() -> None:
    assert VERSION == 1, "run this with the version 1 coder first on the path"
    fit = CacheGenCompressor(CacheGenCompressor.Options(workers=0))
    tables = fit_tables(fit, [kv_of((2, 4, 256, 64), "float32", 99).numpy()], 64, 4, "synthetic")
    tables.save(HERE / "v1-tables.json")
    index = {}
    for seed, (name, (shape, dtype, options)) in enumerate(CASES.items()):
        if "tables" in options:
            options = dict(options, tables=HERE / options["tables"])
        c = CacheGenCompressor(CacheGenCompressor.Options(workers=0, **options))
        payload = bytes(c.compress(kv_of(shape, dtype, seed)))
        (HERE / f"{name}.bin").write_bytes(payload)
        decoded = c.decompress(memoryview(payload), shape, DTYPES[dtype])
        bits = decoded.view(torch.int32 if dtype == "float32" else torch.int16).numpy().tobytes()
        index[name] = {"shape": list(shape), "dtype": dtype,
                       "options": {k: str(v.name) if isinstance(v, Path) else v for k, v in options.items()},
                       "decoded_sha256": hashlib.sha256(bits).hexdigest()}
    (HERE / "v1-payloads.json").write_text(json.dumps(index, indent=1) + "\n")


if __name__ == "__main__":
    main()
