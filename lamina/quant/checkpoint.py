"""Save a quantized model as safetensors + a JSON scheme file, and load it back.

Directory layout written by `save_quantized`:
- `model.safetensors`: float parameters under their HF names, and each quantized layer's portable
  tensors as `{layer}.{tensor}` (e.g. `model.layers.0.mlp.up_proj.qweight`);
- `quant_config.json` (the scheme file): {"format": "lamina-quant", "version": 1, "method": ...,
  "group_size": ..., "layers": {layer: {"method", "in_features", "out_features", options...}}};
- `config.json`: the HF model config, when given.

Loading checks the scheme file against the tensors: a missing scheme file next to quantized tensors,
an unknown method, a layer without its tensors, a tensor shape that disagrees, or quantized tensors
no layer claims are all `CheckpointError`s that say what to do, and so is a stored tensor whose shape
disagrees with the model built from config.json. Tensors are read with safetensors (no pickle) through
a memory map, one layer at a time.

`check_output_dir` and `staged_output` make writing a directory safe: the output is checked before
any work, and everything is written into a temporary sibling that becomes the output only once
complete, so a failure or Ctrl-C never leaves a partial checkpoint.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock, so a killed writer's staging directory is not swept
    fcntl = None  # type: ignore[assignment]

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from lamina.errors import CheckpointError, InvalidArgumentError, LaminaError
from lamina.loading.weight_files import is_autoawq_config, open_weights_file
from lamina.quant.apply import LAYER_CLASSES, quantized_layers, set_submodule
from lamina.quant.base import field_problem
from lamina.quant.blockq import FORMATS, BlockQuantEmbedding, BlockQuantLinear
from lamina.quant.half import HalfEmbedding, HalfLinear
from lamina.quant.hub_formats import ReorderedInputLinear
from lamina.quant.int8 import Int8Embedding

SCHEME_FILE = "quant_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT, VERSION = "lamina-quant", 1
STAGE_INFIX = ".partial-"  # a save to DIR writes into .DIR.partial-XXXX first


def save_quantized(
    model: nn.Module, out_dir: str | Path, method: str, config: dict[str, Any] | None = None, **options: Any
) -> Path:
    """Write `model` (with quantized layers) to `out_dir`; returns the directory."""
    if any(isinstance(m, (Int8Embedding, BlockQuantEmbedding)) for m in model.modules()):
        raise InvalidArgumentError(
            "this model keeps a GGUF's blocks quantized, which cannot be saved as a Lamina quantized checkpoint; "
            "load it with quantize='none' and quantize that"
        )
    if any(
        getattr(m, "qkv_proj", None) is not None or getattr(m, "gate_up_proj", None) is not None
        for m in model.modules()
    ):
        raise InvalidArgumentError(
            "this model's projections are fused (q/k/v, gate/up), which a quantized checkpoint cannot "
            "record under the names the model loads by; load it with fuse=False to save it"
        )
    if any(isinstance(m, ReorderedInputLinear) for m in model.modules()):
        raise InvalidArgumentError(
            "this model holds GPTQ act-order layers, whose input order a Lamina quantized checkpoint "
            "cannot record; keep using the GPTQ checkpoint it was loaded from"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # a 16-bit embedding is saved as the float weight it stands for, and a head sharing its table with
    # it (tied) is not saved apart: the loaded model ties it again
    half_embeddings = {name: m for name, m in model.named_modules() if isinstance(m, HalfEmbedding)}
    tables = {m.weight16.data_ptr() for m in half_embeddings.values()}
    layers = {
        name: layer
        for name, layer in quantized_layers(model).items()
        if not (isinstance(layer, HalfLinear) and layer.weight16.data_ptr() in tables)
    }
    tensors: dict[str, torch.Tensor] = {
        f"{name}.weight": m.weight16.cpu() for name, m in half_embeddings.items()
    }
    scheme_layers: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        for tname, t in layer.export_tensors().items():
            tensors[f"{name}.{tname}"] = t.contiguous()
        scheme_layers[name] = {
            **layer.scheme_config(),
            "in_features": layer.in_features,
            "out_features": layer.out_features,
        }
    seen: set[int] = set()
    for pname, p in model.named_parameters(remove_duplicate=True):  # tied weights are saved once
        owner = pname.rpartition(".")[0]
        if owner not in layers and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            tensors[pname] = p.detach().cpu().contiguous()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    scheme = {"format": FORMAT, "version": VERSION, "method": method, **options, "layers": scheme_layers}
    (out / SCHEME_FILE).write_text(json.dumps(scheme, indent=1), encoding="utf-8")
    # safetensors writes through a private (0600) temporary file; give the weights the mode every
    # other file here got from the umask.
    shutil.copymode(out / SCHEME_FILE, out / WEIGHTS_FILE)
    if config is not None:
        (out / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return out


def check_output_dir(path: str | Path) -> Path:
    """The absolute directory `path` names, checked before any work is done: it must be new or an
    empty directory, and creatable in a writable place. Raises `InvalidArgumentError` otherwise."""
    try:
        out = Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # ~user with no such user, a symlink loop
        raise InvalidArgumentError(
            f"cannot use {path} as the output directory ({exc}); give another --out DIR"
        ) from None
    if out.exists():
        if not out.is_dir():
            raise InvalidArgumentError(
                f"output {out} is an existing file, not a directory; choose a new --out DIR"
            )
        if _has_entries(out):
            raise InvalidArgumentError(f"output directory {out} is not empty; choose a new --out DIR")
    ancestor = next(p for p in out.parents if p.exists())
    if not ancestor.is_dir():
        raise InvalidArgumentError(
            f"cannot create output directory {out}: {ancestor} is a file; choose another --out DIR"
        )
    try:  # the real test of writability (permissions, read-only or virtual file systems)
        Path(tempfile.mkdtemp(prefix=".lamina-write-test-", dir=ancestor)).rmdir()
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot create output directory {out}: {ancestor} is not writable ({exc.strerror}); "
            "choose another --out DIR"
        ) from None
    return out


def _has_entries(directory: Path) -> bool:
    try:
        return any(directory.iterdir())
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot read output directory {directory} ({exc.strerror}); choose another --out DIR"
        ) from None


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A new temporary sibling of `out` (`.NAME.partial-XXXX`) to write a checkpoint into.

    When the block completes it is renamed to `out` (atomically, also over an empty `out`
    directory); on any error or Ctrl-C it is removed, with any parent directories made for it, so
    `out` never holds a partial checkpoint. Write failures (disk full, file too large) become a
    `CheckpointError`.

    A writer killed outright (SIGKILL, OOM, power loss) cannot clean up, so each staging directory is
    held under an exclusive `flock` while it is written (the kernel drops the lock when its process
    dies) and a new save of the same `out` first removes the `.NAME.partial-*` siblings whose lock it
    can take: those whose writer is gone, never one still being written.
    """
    made = [p for p in out.parents if not p.exists()]  # deepest first
    stage, lock = None, None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_stages(out)
        stage, lock = _new_stage(out)
        yield stage
        os.replace(stage, out)
    except (OSError, SafetensorError) as exc:
        _discard(stage, made)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
        raise CheckpointError(
            f"cannot write {out} ({reason}); nothing was written, free some space or choose another --out DIR"
        ) from None
    except BaseException:
        _discard(stage, made)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _new_stage(out: Path) -> tuple[Path, int | None]:
    """A new, empty staging directory for `out`, and the descriptor holding its lock (None where the
    file system has no locks: then a killed writer's directory stays behind, as before)."""
    while True:
        stage = out.parent / f".{out.name}{STAGE_INFIX}{secrets.token_hex(4)}"
        stage.mkdir()  # umask-respecting mode (tempfile.mkdtemp's would be 0700)
        try:
            lock = _lock(stage)
        except (FileNotFoundError, BlockingIOError):  # another save's sweep took it before it was locked
            continue
        if lock is None or _same_directory(lock, stage):
            return stage, lock
        os.close(lock)  # swept and gone between mkdir and the lock: take another name


def _lock(directory: Path) -> int | None:
    """An open descriptor on `directory` holding an exclusive flock; None where locks are not supported.
    Raises `FileNotFoundError` when the directory is gone and `BlockingIOError` when it is locked."""
    if fcntl is None:
        return None
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # ENOLCK, EOPNOTSUPP: a file system without flock
        os.close(fd)
        return None
    return fd


def _same_directory(fd: int, path: Path) -> bool:
    """Whether `path` still names the directory `fd` has open (not removed or replaced since)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def remove_stale_stages(out: Path) -> list[Path]:
    """Remove the staging directories of earlier saves to `out` whose writer is gone (killed before it
    could clean up), and return them. One still being written is locked by its writer and kept; so
    is one whose lock cannot be tested (a file system without flock)."""
    prefix = f".{out.name}{STAGE_INFIX}"
    try:
        stages = sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []
    removed = []
    for stage in stages:
        if stage.is_symlink() or not stage.is_dir():
            continue
        try:
            lock = _lock(stage)
        except OSError:  # locked by a live writer, or gone already
            continue
        if lock is None:
            continue
        try:
            if _same_directory(lock, stage):
                shutil.rmtree(stage, ignore_errors=True)
                if not stage.exists():
                    removed.append(stage)
        finally:
            os.close(lock)
    return removed


def _discard(stage: Path | None, made: list[Path]) -> None:
    """Remove a staging directory and the (now empty) parents made for it, deepest first."""
    if stage is not None:
        shutil.rmtree(stage, ignore_errors=True)
    for directory in made:
        with suppress(OSError):  # one not made after all, or holding something else now
            directory.rmdir()


def is_quantized_dir(path: str | Path) -> bool:
    """Whether `path` is a directory written by `save_quantized` (it has the scheme file, and the file
    is not AutoAWQ's of the same name)."""
    return (Path(path) / SCHEME_FILE).is_file() and not is_autoawq_config(Path(path) / SCHEME_FILE)


def read_scheme(directory: str | Path) -> dict[str, Any]:
    """The validated scheme file of a quantized checkpoint directory."""
    path = Path(directory) / SCHEME_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no {SCHEME_FILE}; it is not a Lamina quantized checkpoint "
            "(write one with `lamina quantize MODEL --out DIR`)"
        )
    try:
        scheme = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; re-run `lamina quantize`") from None
    if (
        not isinstance(scheme, dict)
        or scheme.get("format") != FORMAT
        or not isinstance(scheme.get("layers"), dict)
    ):
        raise CheckpointError(
            f"{path} is not a {FORMAT} scheme file (no 'format' or 'layers'); re-run `lamina quantize`"
        )
    version = scheme.get("version")
    if type(version) is not int or version != VERSION:  # "1" or true are not version 1
        raise CheckpointError(
            f"{path} has scheme version {version!r}, this Lamina reads {VERSION!r}; "
            "re-run `lamina quantize` with this Lamina"
        )
    if not isinstance(scheme.get("method"), str):
        raise CheckpointError(
            f"{path} has method {scheme.get('method')!r}, not a method name; re-run `lamina quantize`"
        )
    for name, entry in scheme["layers"].items():
        if not isinstance(entry, dict) or not _known_method(entry.get("method")):
            method = entry.get("method") if isinstance(entry, dict) else entry
            raise CheckpointError(
                f"{path}: layer {name} has unknown method {method!r}; known: {', '.join(LAYER_CLASSES)}"
            )
        problem = _entry_problem(entry)
        if problem:
            raise CheckpointError(f"{path}: layer {name} {problem}; re-run `lamina quantize`")
    return scheme


def _known_method(method: Any) -> bool:
    return isinstance(method, str) and method in LAYER_CLASSES


def _entry_problem(entry: dict[str, Any]) -> str | None:
    """What is wrong with one layer's entry (see `QuantizedLinear.config_problem`); GGUF blocks kept as
    stored also need a block format this Lamina has."""
    cls = LAYER_CLASSES[entry["method"]]
    problem = cls.config_problem(entry)
    if problem is None and issubclass(cls, BlockQuantLinear):
        known = ", ".join(FORMATS)
        problem = field_problem(
            entry, "ggml_type", lambda v: isinstance(v, str) and v in FORMATS, f"not one of {known}"
        )
    return problem


def load_quantized_into(model: nn.Module, directory: str | Path) -> set[str]:
    """Fill `model` (built on the meta device or CPU) from a quantized checkpoint directory.

    Quantized layers replace the model's linears; float tensors are assigned by name. Returns the
    names filled (parameter names and quantized layer names).
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}; the quantized checkpoint is incomplete")
    with open_weights_file(weights) as f:
        keys = set(f.keys())
        quantized_keys = any(k.endswith((".qweight", ".weight_q", ".weight_packed")) for k in keys)
        if quantized_keys and not is_quantized_dir(directory):
            raise CheckpointError(
                f"{directory} holds quantized tensors but no {SCHEME_FILE}; restore that file or re-run "
                "`lamina quantize`"
            )
        scheme = read_scheme(directory)
        filled: set[str] = set()
        for name, entry in scheme["layers"].items():
            prefix = f"{name}."
            names = {k[len(prefix) :] for k in keys if k.startswith(prefix) and "." not in k[len(prefix) :]}
            tensors = {n: _owned(f.get_tensor(prefix + n)) for n in names}
            cls = LAYER_CLASSES[entry["method"]]
            try:
                layer = cls.from_tensors(
                    entry["in_features"], entry["out_features"], {**entry, "name": name}, tensors
                )
            except LaminaError:
                raise
            except (KeyError, TypeError, ValueError, ZeroDivisionError, IndexError, RuntimeError) as exc:
                # `read_scheme` checked the entry; this is the net for what its checks miss.
                raise CheckpointError(
                    f"{directory / SCHEME_FILE}: layer {name} cannot be rebuilt from its entry and tensors "
                    f"({type(exc).__name__}: {' '.join(str(exc).split())}); re-run `lamina quantize`"
                ) from None
            _check_layer_fits(model, name, layer, weights)
            set_submodule(model, name, layer)
            keys -= {prefix + n for n in names}
            filled.add(name)
        params = dict(model.named_parameters())
        floats = {k: _owned(f.get_tensor(k)) for k in keys if k in params}
        for k, t in floats.items():
            _check_fits(f"tensor {k}", tuple(t.shape), tuple(params[k].shape), weights)
        stray = sorted(keys - set(floats))
        if stray:
            raise CheckpointError(
                f"{weights.name} has tensors the scheme file and model do not account for: {stray[:3]}; "
                f"the checkpoint and its {SCHEME_FILE} do not match"
            )
    model.load_state_dict(floats, strict=False, assign=True)
    return filled | set(floats)


def _check_layer_fits(model: nn.Module, name: str, layer: nn.Module, weights: Path) -> None:
    """A stored quantized layer must be shaped like the linear the model (built from config.json)
    has there. `from_tensors` only checks the tensors against the scheme file, which was written
    with them, so an edited config.json would otherwise go unnoticed."""
    try:
        current = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{SCHEME_FILE} names layer {name}, which this model does not have") from None
    if not isinstance(current, nn.Linear):
        raise CheckpointError(
            f"{SCHEME_FILE} names layer {name}, which is a {type(current).__name__} in this model, not a linear"
        )
    stored = (layer.out_features, layer.in_features)
    _check_fits(f"quantized layer {name}", stored, tuple(current.weight.shape), weights)


def _check_fits(what: str, stored: tuple[int, ...], expected: tuple[int, ...], weights: Path) -> None:
    """Raise a `CheckpointError` naming `what` when its stored shape is not the model's."""
    if stored != expected:
        raise CheckpointError(
            f"{what} has shape {stored} in {weights} but the model config implies {expected}; "
            "the config and the weights disagree"
        )


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A copy in torch's own (64-byte aligned) memory. safetensors may hand back tensors over a Python
    buffer aligned to 8 bytes only; the packed int8 CPU kernel crashes on those."""
    return t.clone()
