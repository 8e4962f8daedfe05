"""Build a model from a checkpoint: skeleton on the meta device, then weights tensor by tensor.

Peak memory stays near the size of the weights: each tensor is read from its (memory-mapped) file,
put in the model's layout by `model.sanitize` (GPT-2's Conv1D weights are transposed), converted to
the target dtype and device, and assigned in place of the meta parameter; nothing holds a second
copy. Names may lack the base model's prefix (`h.0...` for `transformer.h.0...`), as older Hub
checkpoints store them. Every parameter must be filled and every checkpoint tensor used (or listed
as ignorable by the model), otherwise loading fails and names what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lamina.config import ConfigValueError, ModelConfig
from lamina.errors import CheckpointError, LaminaError
from lamina.heap import release_free_heap
from lamina.loading.checkpoint import Checkpoint
from lamina.models.registry import resolve
from lamina.placement.empty import init_empty

# Called after each parameter is filled, with the owning module's name and the module; lets a
# caller transform a layer (quantize it, move it) as soon as its weights are complete. Returns
# True when it replaced the module.
ModuleHook = Callable[[str, nn.Module], bool]
# Called before a module's first tensor is read; returning True means the callee filled (or
# replaced) the whole module itself, so the loader reads none of its tensors. Keeps a format's own
# representation (GGUF blocks kept quantized) from first being expanded to float and thrown away.
# Tensors that are not parameters (a GPTQ linear's `qweight`, `scales`, ...) are offered to the claim
# as their module's, so a format that stores a layer differently can build it.
ModuleClaim = Callable[[str, nn.Module], bool]
# A claim or hook that rebuilds modules frees large temporaries; glibc keeps them in the heap, so
# the heap is trimmed (and a mapped file's pages read so far released) every this many rebuilt
# modules (about one decoder block; ~1 ms a trim).
TRIM_EVERY = 8


def build_empty(checkpoint: Checkpoint) -> tuple[nn.Module, ModelConfig]:
    """The checkpoint's model with every parameter on the meta device (no memory used).

    A config value that passes `ModelConfig`'s checks can still make the model code fail (fewer
    `layer_types` than layers); that becomes a one-line CheckpointError, not a traceback.
    """
    try:
        model_class, config = resolve(checkpoint.config)
        with init_empty():
            model = model_class(config)
    except ConfigValueError as exc:
        fix = (
            "fix config.json"
            if checkpoint.path.is_dir()
            else "its metadata is wrong, re-convert or re-download it"
        )
        raise CheckpointError(f"{_config_source(checkpoint)}: {exc}; {fix}") from None
    except LaminaError:
        raise
    except Exception as exc:  # TypeError, ValueError, ZeroDivisionError, RuntimeError from torch...
        raise CheckpointError(
            f"cannot build {_architecture(checkpoint)} from {_config_source(checkpoint)}: "
            f"{_one_line(exc)}; check its values"
        ) from None
    return model, config


def _architecture(checkpoint: Checkpoint) -> str:
    """The architecture the checkpoint's config names, for messages."""
    names = checkpoint.config.get("architectures")
    return str(names[0]) if isinstance(names, list) and names else "the model"


def _config_source(checkpoint: Checkpoint) -> Path:
    """Where the checkpoint's config comes from: a directory's config.json, or the GGUF file itself."""
    return checkpoint.path / "config.json" if checkpoint.path.is_dir() else checkpoint.path


def _one_line(exc: Exception) -> str:
    """An exception as `Type: message` on one line (torch's messages can span several)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def load_weights(
    model: nn.Module,
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    device: torch.device | str,
    on_loaded: ModuleHook | None = None,
    claim: ModuleClaim | None = None,
) -> None:
    """Fill every parameter of `model` from `checkpoint`, converting to `dtype` on `device`."""
    params = dict(model.named_parameters())  # tied weights appear once, under their first name
    ignored = [re.compile(p) for p in getattr(model, "ignored_checkpoint_keys", ())]
    tied_aliases = _tied_aliases(model)
    sanitize = getattr(model, "sanitize", lambda _name, tensor: tensor)
    unexpected = []
    filled: set[str] = set()
    rebuilt = 0  # modules a claim or hook replaced, for heap trimming
    prefix = getattr(model, "base_model_prefix", "")
    claimed: set[str] = set()  # modules a claim built, whose remaining tensors are skipped

    def claimed_now(module_name: str) -> bool:
        """Offer the module to the claim (once); True when the claim built it."""
        nonlocal rebuilt
        if module_name in claimed:
            return True
        if claim is None or not claim(module_name, model.get_submodule(module_name)):
            return False
        claimed.add(module_name)
        filled.update(n for n in params if n.rpartition(".")[0] == module_name)
        rebuilt += 1
        if rebuilt % TRIM_EVERY == 0:
            _release(checkpoint)
        return True

    for name in checkpoint.tensor_names():
        target = parameter_name(name, params, tied_aliases, prefix)
        if target is None:  # not a parameter: a claimable module's own stored form, or unexpected
            owner = _owner_module(model, name, prefix) if claim is not None else None
            claimed_here = owner is not None and claimed_now(owner)
            if not claimed_here and not any(p.search(name) for p in ignored):
                unexpected.append(name)
            continue
        if target in filled:  # a tied weight stored under both names: the first copy wins
            continue
        module_name, _, attr = target.rpartition(".")
        module = model.get_submodule(module_name)
        if claimed_now(module_name):
            continue
        tensor = sanitize(target, checkpoint.read(name))
        expected = params[target].shape
        if tuple(tensor.shape) != tuple(expected):
            raise CheckpointError(
                f"tensor {name} has shape {tuple(tensor.shape)} in {checkpoint.path} but the model "
                f"config implies {tuple(expected)}; the config and the weights disagree"
            )
        module._parameters[attr] = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
        filled.add(target)
        if on_loaded is not None and on_loaded(module_name, module):
            rebuilt += 1
            if rebuilt % TRIM_EVERY == 0:
                _release(checkpoint)
    if unexpected:
        raise CheckpointError(
            f"{checkpoint.path.name} has {len(unexpected)} tensor(s) the model does not use, "
            f"e.g. {unexpected[:3]}; is it the architecture its config names?"
        )
    missing = sorted(set(params) - filled)
    if missing:
        raise CheckpointError(
            f"{checkpoint.path.name} lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    checkpoint.release_pages()


def _release(checkpoint: Checkpoint) -> None:
    """Give back what rebuilding modules left behind: freed heap, and the mapped file pages read so far
    (each module now holds its own copy)."""
    release_free_heap()
    checkpoint.release_pages()


def _owner_module(model: nn.Module, name: str, prefix: str) -> str | None:
    """The innermost module a tensor that is not a parameter belongs to by its name (`x.q_proj` for
    `x.q_proj.qweight` or `x.q_proj.weight.absmax`, with or without the base model's prefix), or
    None when there is none below the model itself."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:end])
        for candidate in (module_name, f"{prefix}.{module_name}" if prefix else module_name):
            try:
                model.get_submodule(candidate)
            except AttributeError:
                continue
            return candidate
    return None


def parameter_name(
    name: str, params: dict[str, nn.Parameter], aliases: dict[str, str], prefix: str
) -> str | None:
    """The model parameter a checkpoint tensor fills: its own name, a tied alias, or the name
    with the base model's prefix that some checkpoints leave out (None: not a parameter)."""
    for candidate in (name, f"{prefix}.{name}" if prefix else name):
        if candidate in params:
            return candidate
        if candidate in aliases:
            return aliases[candidate]
    return None


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Second names of shared parameters -> the name `named_parameters` reports them under."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases
