"""Fitted symbol tables: which distribution class each (K/V, layer, channel) uses.

Without tables, every chunk carries one small histogram per (K/V, layer)
(one byte a symbol, about 0.1% of the payload). A table file fitted on sample
KV of a model instead assigns each channel row to one of a few shared classes
(k-means on code length), so a chunk carries no histograms and codes each
channel with a distribution closer to its own.

The file is JSON (never pickle)::

    {"format": "kvstacks-cachegen-tables", "version": 1, "model": "...",
     "layers": L, "hidden": H, "bins": [per layer], "clip": 4.0, "anchor_every": 0,
     "classes": [[counts...], ...], "row_class": [class of row (k, l, h), 2*L*H of them]}

Its id (first 8 bytes of the SHA-256 of its canonical JSON) is written into
every chunk coded with it, so a chunk is never decoded with the wrong tables.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kvstacks.errors import ConfigError

FORMAT = "kvstacks-cachegen-tables"
VERSION = 1
COUNT_SCALE = 4095  # class counts are stored as integers up to this


@dataclass
class Tables:
    model: str
    layers: int
    hidden: int
    bins: list[int]
    clip: float
    anchor_every: int
    classes: list[np.ndarray]  # uint16 counts, one array per class
    row_class: np.ndarray  # int [2 * layers * hidden]
    table_id: bytes = b""
    # derived: rows of each class, in order, for gathering symbols into streams
    class_rows: list[np.ndarray] = field(default_factory=list)
    _models: dict[int, list[Any]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.table_id = hashlib.sha256(canonical_json(self.to_json())).digest()[:8]
        rows = np.asarray(self.row_class, dtype=np.int64)
        self.class_rows = [np.flatnonzero(rows == c) for c in range(len(self.classes))]

    def models(self, coder: int) -> list[Any]:
        """Each class's model for ``coder`` (see :mod:`kvstacks_cachegen.streams`), built once."""
        if coder not in self._models:
            from kvstacks_cachegen.streams import model_from_counts

            self._models[coder] = [model_from_counts(c, coder) for c in self.classes]
        return self._models[coder]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "model": self.model, "layers": self.layers,
            "hidden": self.hidden, "bins": list(self.bins), "clip": self.clip,
            "anchor_every": self.anchor_every, "classes": [c.astype(int).tolist() for c in self.classes],
            "row_class": np.asarray(self.row_class).astype(int).tolist(),
        }

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), separators=(",", ":")) + "\n")

    def matches(self, layers: int, hidden: int, bins: list[int], clip: float, anchor_every: int) -> bool:
        return (self.layers == layers and self.hidden == hidden and list(bins) == self.bins
                and self.clip == clip and self.anchor_every == anchor_every)


def canonical_json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def load_tables(path: Path, where: str = "compressor_options.tables") -> Tables:
    """Read and validate a table file; every problem is a ConfigError naming the fix."""
    fix = "re-create it with `kvstacks cachegen fit`"
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(where, f"cannot read {path}: {exc.strerror}; {fix} or drop the option") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(where, f"{path} is not a JSON table file ({exc}); {fix}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(where, f"{path} is not a cachegen table file; {fix}")
    if data.get("version") != VERSION:
        raise ConfigError(where, f"{path} has table version {data.get('version')!r}, this kvstacks-cachegen "
                                 f"reads version {VERSION}; {fix}")
    try:
        layers, hidden = int(data["layers"]), int(data["hidden"])
        bins = [int(b) for b in data["bins"]]
        clip = float(data["clip"])
        anchor_every = int(data["anchor_every"])
        classes = [np.asarray(c, dtype=np.int64) for c in data["classes"]]
        row_class = np.asarray(data["row_class"], dtype=np.int64)
        model = str(data.get("model", ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(where, f"{path} is missing or has a bad field ({exc}); {fix}") from None
    problems = []
    if not (1 <= layers <= 4096 and 1 <= hidden <= 1 << 20):
        problems.append("layers/hidden out of range")
    if len(bins) != layers or any(b % 2 or not 4 <= b <= 256 for b in bins):
        problems.append("bins must list an even count in 4..256 for every layer")
    if not (math.isfinite(clip) and 0 < clip <= 64):
        problems.append("clip must be in (0, 64]")
    if row_class.shape != (2 * layers * hidden,) or not classes or len(classes) > 65535:
        problems.append("row_class must have 2 * layers * hidden entries and classes must not be empty")
    elif row_class.min() < 0 or row_class.max() >= len(classes):
        problems.append("row_class refers to a class that does not exist")
    if any(c.ndim != 1 or c.min(initial=0) < 0 or c.max(initial=0) > COUNT_SCALE for c in classes):
        problems.append(f"class counts must be lists of integers in 0..{COUNT_SCALE}")
    if not problems:
        row_bins = np.repeat(np.asarray(bins), hidden)
        row_bins = np.concatenate([row_bins, row_bins])
        for c, counts in enumerate(classes):
            alphabets = np.unique(row_bins[row_class == c])
            if alphabets.size > 1 or (alphabets.size == 1 and alphabets[0] != counts.size):
                problems.append(f"class {c} is used by rows whose bins differ from its {counts.size} counts")
                break
    if problems:
        raise ConfigError(where, f"{path} is not a valid table file: {'; '.join(problems)}; {fix}")
    return Tables(model, layers, hidden, bins, clip, anchor_every,
                  [c.astype(np.uint16) for c in classes], row_class)


def fit_classes(row_hist: np.ndarray, row_bins: np.ndarray, classes_per_group: int,
                iterations: int = 12) -> tuple[list[np.ndarray], np.ndarray]:
    """Cluster channel rows by their symbol histograms (rows of ``row_hist``,
    padded to the widest alphabet) into classes minimising total code length.

    Rows with different bins never share a class, since their alphabets differ.
    Returns per-class integer counts (scaled to ``COUNT_SCALE``) and the class of each row.
    """
    row_class = np.zeros(row_hist.shape[0], dtype=np.int64)
    classes: list[np.ndarray] = []
    for b in np.unique(row_bins):
        rows = np.flatnonzero(row_bins == b)
        hist = row_hist[rows, :b].astype(np.float64) + 0.5
        k = max(1, min(classes_per_group, rows.size))
        # Start from rows spread over the spectrum of spreads (entropy), which k-means then refines.
        p_rows = hist / hist.sum(1, keepdims=True)
        entropy = -(p_rows * np.log2(p_rows)).sum(1)
        seeds = np.argsort(entropy)[np.linspace(0, rows.size - 1, k).astype(int)]
        centers = p_rows[seeds]
        assign = np.zeros(rows.size, dtype=np.int64)
        for _ in range(iterations):
            cost = -hist @ np.log2(centers).T  # bits each row would cost with each class
            assign = cost.argmin(1)
            for c in range(k):
                members = hist[assign == c]
                if members.size:
                    centers[c] = members.sum(0) / members.sum()
        used = np.unique(assign)
        for _new, c in enumerate(used):
            counts = np.ceil(centers[c] / centers[c].max() * COUNT_SCALE)
            classes.append(np.maximum(counts, 1).astype(np.uint16))
            row_class[rows[assign == c]] = len(classes) - 1
    return classes, row_class
