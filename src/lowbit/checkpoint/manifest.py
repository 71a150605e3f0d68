"""The checkpoint manifest: what manifest.json holds (Manifest, LayerEntry, versioned) and the
validation every loaded manifest passes before anything it names is read (check_manifest)."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lowbit
from lowbit.errors import CheckpointError, ConfigError, ShapeError
from lowbit.marks import (
    CONFIG_FILE,
    FORMAT,
    MANIFEST,
    MAX_JSON_BYTES,
    QUANT_FILE,
    looks_like_checkpoint,
    missing_manifest,
)
from lowbit.qtensor import QuantFormat, QuantizedWeight

FORMAT_VERSION = 2
DENSE_FILE = "dense.safetensors"
REPORT = "REPORT.md"
TOKENIZER_FILE = "tokenizer.json"
UNHASHED = (MANIFEST, REPORT)  # the only files of a checkpoint folder no sha256 covers
REQUIRED_FILES = (QUANT_FILE, DENSE_FILE, CONFIG_FILE)
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")  # the manifest's "dtype"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODULE_NAME = re.compile(r"\w+(\.\w+)*")
# tensors of one quantized layer in quantized.safetensors (bias aside); codes.b<w> / zeros.b<w>
# hold the groups of width w of a mixed-precision layer
_PART = re.compile(r"codes|scales|scale_mult|zeros|perm|group_bits|(codes|zeros)\.b[1-8]")


@dataclass(frozen=True)
class LayerEntry:
    """The manifest's description of one quantized layer: its format, shape and which optional
    tensors (permutation, bias, per-group widths) are stored beside its codes and scales."""

    fmt: QuantFormat
    shape: tuple[int, int]
    perm: bool = False
    bias: bool = False
    group_bits: list[int] | None = None
    average_bits: float | None = None

    @classmethod
    def of(cls, qw: QuantizedWeight, bias: bool) -> LayerEntry:
        if not qw.mixed:
            return cls(qw.fmt, qw.shape, qw.perm is not None, bias)
        return cls(qw.fmt, qw.shape, qw.perm is not None, bias, qw.group_bits.tolist(), qw.average_bits())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerEntry:
        """From a checked manifest entry (_check_layer_entry)."""
        return cls(QuantFormat.from_dict(d), tuple(d["shape"]), d.get("perm", False), d.get("bias", False),
                   d.get("group_bits"), d.get("average_bits"))

    def to_dict(self) -> dict[str, Any]:
        d = {**self.fmt.to_dict(), "shape": list(self.shape), "perm": self.perm, "bias": self.bias}
        if self.group_bits is not None:
            d["group_bits"] = self.group_bits
            d["average_bits"] = self.average_bits
        return d


@dataclass(frozen=True)
class Source:
    """The manifest's "source": the model a checkpoint was made from, as its author recorded it
    (data, not an instruction: evaluation.load_reference_for decides what to trust)."""

    spec: Any = None      # what was asked for: a known name, a folder, a .gguf file or a hub id
    name: Any = None
    kind: str | None = None  # "known", "gguf", "hf_folder", "hub"
    path: Any = None      # the file or folder it was read from, for gguf and hf_folder
    sha256: Any = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Source:
        return cls(d.get("spec"), d.get("name"), d.get("kind"), d.get("path"), d.get("sha256"))


@dataclass(frozen=True)
class Stats:
    """The manifest's "stats": size from the records and what the job cost. A key a manifest
    lacks is None (check_manifest checks the numbers it has)."""

    bits_per_weight: float | None = None
    model_bytes: int | None = None       # quantized layers packed, every other tensor at 16 bits
    reference_bytes: int | None = None   # every parameter at 16 bits
    disk_bytes: int | None = None        # every file of the folder (added by save_checkpoint)
    seconds: float | None = None         # quantization wall time
    peak_rss_bytes: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stats:
        return cls(*(d.get(f) for f in cls.__dataclass_fields__))


@dataclass(frozen=True)
class Manifest:
    """manifest.json. `info` holds what the job records besides the format (source, recipe,
    calibration, stats, evaluation...), written between "dtype" and "layers"; read it through
    the properties below."""

    dtype: str
    layers: dict[str, LayerEntry]
    files: dict[str, dict[str, Any]]  # {name: {"bytes", "sha256"}}
    info: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    lowbit_version: str = lowbit.__version__
    format_version: int = FORMAT_VERSION

    # ------------------------------------------------------------ what the job recorded
    @property
    def source(self) -> Source:
        return Source.from_dict(self.info.get("source") or {})

    @property
    def recipe(self) -> dict[str, Any]:
        """The recipe as it was written (Recipe.used_dict): a dict, as a recipe of another lowbit
        version may not load (Recipe.from_dict)."""
        return self.info.get("recipe") or {}

    @property
    def calibration(self) -> dict[str, Any] | None:
        """{"dataset", "n_samples", "seqlen", "seed", ...}, or None for a data-free method."""
        return self.info.get("calibration")

    @property
    def stats(self) -> Stats | None:
        """None where the manifest records no stats."""
        st = self.info.get("stats")
        return Stats.from_dict(st) if st else None

    @property
    def evaluation(self) -> list[dict[str, Any]]:
        """The evaluations recorded with it (EvalResult.to_dict() each), reference first."""
        return self.info.get("evaluation") or []

    @property
    def budget(self) -> dict[str, Any] | None:
        """The budget search's report (budget/plan.py: BudgetReport), or None without a budget."""
        return self.info.get("budget") or None

    @property
    def fallbacks(self) -> list[str]:
        """Layers GPTQ quantized round-to-nearest because their Hessian would not factorize."""
        return self.info.get("fallbacks") or []

    @property
    def skipped(self) -> list[str]:
        """Linear layers the recipe kept in full precision."""
        return self.info.get("skipped") or []

    def with_evaluation(self, evaluation: list[dict[str, Any]]) -> Manifest:
        """This manifest with `evaluation` recorded in place of the one it has."""
        return replace(self, info={**self.info, "evaluation": evaluation})

    # ------------------------------------------------------------ the file
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": self.format_version, "lowbit_version": self.lowbit_version,
                "created": self.created, "dtype": self.dtype, **self.info,
                "layers": {n: e.to_dict() for n, e in self.layers.items()}, "files": self.files}

    def to_json(self) -> str:
        """manifest.json's text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: Any, where: Path) -> Manifest:
        """A manifest parsed from the file `where`, checked (check_manifest) first."""
        d = check_manifest(d, where)
        core = ("format", "format_version", "lowbit_version", "created", "dtype", "layers", "files")
        return cls(d["dtype"], {n: LayerEntry.from_dict(e) for n, e in d["layers"].items()}, d["files"],
                   {k: v for k, v in d.items() if k not in core}, str(d.get("created", "")),
                   str(d.get("lowbit_version", "")), d["format_version"])

    @classmethod
    def read(cls, path: str | os.PathLike) -> Manifest:
        """The checked manifest of the checkpoint folder `path`; a folder without one is refused,
        with a message that says so when it looks like a damaged checkpoint."""
        mpath = _manifest_file(Path(path))
        return cls.from_dict(_read_json(mpath, "manifest"), mpath)


def _read_json(f: Path, what: str) -> Any:
    """The JSON value in `f`, or a CheckpointError naming the file; a file over MAX_JSON_BYTES is
    refused unread."""
    try:
        size = f.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{f} is {size} bytes, more than a {what} may have ({MAX_JSON_BYTES}); "
                                  "the checkpoint is damaged, re-run `lowbit quantize`")
        data = f.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{f} could not be read ({e})") from None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep to parse
        raise CheckpointError(f"{f} is not valid JSON ({e}); the {what} is damaged, re-run `lowbit quantize` "
                              "or copy the checkpoint again") from None


def _is_int(x: Any) -> bool:
    return type(x) is int  # bool is an int subclass, never a size


def _is_number(x: Any) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def _check_file_name(name: Any, where: Path) -> None:
    """A manifest's file name must be a plain name of a file in the checkpoint folder."""
    if (not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or name != name.strip()
            or any(c in name for c in "/\\:\0") or Path(name).is_absolute()):
        raise CheckpointError(f"{where}: files names {name!r}, which is not the plain name of a file in the "
                              "checkpoint folder; the manifest is damaged or was edited, re-run `lowbit quantize`")


def _check_layer_entry(name: Any, entry: Any, where: Path) -> None:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: layers[{name!r}] {problem}; the manifest is damaged, "
                               "re-run `lowbit quantize`")

    if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
        raise bad("is not a module name (dotted words)")
    if not isinstance(entry, dict):
        raise bad("is not an object")
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)):
        raise bad(f"shape is {shape!r}, not [out_features, in_features] of positive integers")
    for key in ("bits", "group_size"):
        if not _is_int(entry.get(key)):
            raise bad(f"{key} is {entry.get(key)!r}, not an integer")
    if not _is_int(entry.get("scale_bits", 0)):
        raise bad(f"scale_bits is {entry.get('scale_bits')!r}, not an integer")
    for key, required in (("symmetric", True), ("perm", False), ("bias", False)):
        if (required or key in entry) and not isinstance(entry.get(key), bool):
            raise bad(f"{key} is {entry.get(key)!r}, not true or false")
    if "group_bits" in entry:
        gb = entry["group_bits"]
        if not (isinstance(gb, list) and gb and all(_is_int(b) and 1 <= b <= 8 for b in gb)):
            raise bad("group_bits is not a list of bit widths from 1 to 8")
        if not _is_number(entry.get("average_bits")):
            raise bad(f"average_bits is {entry.get('average_bits')!r}, not a number")
    try:
        QuantFormat.from_dict(entry)
    except (ConfigError, ShapeError) as e:
        raise bad(f"has an unsupported format ({e})") from None


def check_manifest(manifest: Any, where: Path) -> dict[str, Any]:
    """`manifest` (parsed from the file `where`) if it has every key lowbit reads, with the right
    types; else a CheckpointError naming the key. A manifest of an older format version is refused."""
    def bad(key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: {key} {problem}; the manifest is damaged, re-run `lowbit quantize`")

    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where} holds a JSON {type(manifest).__name__}, not an object; it is not a "
                              "lowbit manifest, re-run `lowbit quantize`")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a lowbit manifest (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        if _is_int(version) and version < FORMAT_VERSION:
            raise CheckpointError(
                f"{where.parent}: checkpoint format version {version} was made by an older lowbit, whose "
                f"manifest leaves the config and tokenizer files unhashed; lowbit {lowbit.__version__} reads "
                f"version {FORMAT_VERSION}: re-run `lowbit quantize` to make the checkpoint again")
        raise CheckpointError(f"{where.parent}: checkpoint format version {version!r} is not supported by "
                              f"lowbit {lowbit.__version__} (reads version {FORMAT_VERSION})")
    for key in ("dtype", "layers", "files"):
        if key not in manifest:
            raise bad(key, "is missing")
    if manifest["dtype"] not in FLOAT_DTYPES:
        raise bad("dtype", f"is {manifest['dtype']!r}, not one of {', '.join(FLOAT_DTYPES)}")
    for key in ("source", "recipe", "stats"):
        if key in manifest and not isinstance(manifest[key], dict):
            raise bad(key, "is not an object")
    if isinstance(manifest.get("source"), dict) and not isinstance(manifest["source"].get("kind", ""), str):
        raise bad("source.kind", "is not a string")
    for key, value in manifest.get("stats", {}).items():
        if key in ("bits_per_weight", "model_bytes", "seconds") and not _is_number(value):
            raise bad(f"stats.{key}", f"is {value!r}, not a number")
    cal = manifest.get("calibration")
    if cal is not None:
        if not isinstance(cal, dict):
            raise bad("calibration", "is neither null nor an object")
        if not (isinstance(cal.get("dataset"), str)
                and all(_is_int(cal.get(k)) for k in ("n_samples", "seqlen", "seed"))):
            raise bad("calibration", "needs a dataset name and integer n_samples, seqlen and seed")
    if not isinstance(manifest["layers"], dict):
        raise bad("layers", "is not an object")
    for name, entry in manifest["layers"].items():
        _check_layer_entry(name, entry, where)
    files = manifest["files"]
    if not isinstance(files, dict):
        raise bad("files", "is not an object")
    for name, meta in files.items():
        _check_file_name(name, where)
        if not (isinstance(meta, dict) and _is_int(meta.get("bytes")) and meta["bytes"] >= 0
                and isinstance(meta.get("sha256"), str) and _SHA256.fullmatch(meta["sha256"])):
            raise bad(f"files[{name!r}]", "is not {\"bytes\": size, \"sha256\": 64 hex digits}")
    absent = [f for f in REQUIRED_FILES if f not in files]
    if absent:
        raise bad("files", f"does not list {', '.join(absent)}, so nothing checks them")
    return manifest


def _manifest_file(path: Path) -> Path:
    """The manifest.json of the checkpoint folder `path`; a folder without one is refused, with a
    message that says so when it looks like a damaged checkpoint."""
    mpath = path / MANIFEST
    if not path.is_dir() or not mpath.is_file():
        if looks_like_checkpoint(path):
            raise CheckpointError(missing_manifest(path))
        raise CheckpointError(f"{path} is not a lowbit checkpoint (no {MANIFEST}); create one with `lowbit quantize`")
    return mpath


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of the checkpoint folder `path` (check_manifest) as the JSON object it
    is, for what inspects the file itself; lowbit reads it typed, through Manifest.read."""
    mpath = _manifest_file(Path(path))
    return check_manifest(_read_json(mpath, "manifest"), mpath)
