"""Model configuration: one dataclass per architecture family, built from a Hugging Face config dict.

`ModelConfig` holds what every decoder-only family shares; each family file in `lamina/models/`
subclasses it with its own fields. `from_hf_dict` keeps the keys the dataclass knows, drops the rest,
and normalizes the spellings that differ between transformers versions (RoPE keys, EOS lists), so
the model code reads one clean set of names. It also checks each value against its field's type, and
sizes and counts for being positive, so a broken config.json fails with one line naming the key
instead of a traceback from deep in the model code.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from lamina.errors import CheckpointError

ConfigT = TypeVar("ConfigT", bound="ModelConfig")


class ConfigValueError(CheckpointError):
    """A config value is missing or wrong; the loader names the file it came from and the fix."""


@dataclass(kw_only=True)
class ModelConfig:
    """Fields every causal language model has. Families add theirs in a subclass."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    # A family's own spellings of these fields in its config.json (GPT-2's `n_embd` -> `hidden_size`).
    hf_aliases: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_hf_dict(cls: type[ConfigT], hf: dict[str, Any], **overrides: Any) -> ConfigT:
        """Build from a `config.json` dict; unknown keys are dropped, `overrides` win over `hf`."""
        values = _normalize(hf)
        spelled = {}  # field -> the family's own key that set it, for error messages
        for alias, name in cls.hf_aliases.items():
            if values.get(alias) is not None and name not in values:
                values[name], spelled[name] = values[alias], alias
        values.update(overrides)
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in types and v is not None}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigValueError(
                f"the {values.get('architecture', '?')} config lacks required keys {missing}"
            )
        return cls(**{k: _checked(k, spelled.get(k, k), v, types[k]) for k, v in kwargs.items()})


# Sizes and counts, in every family's spelling: zero or less makes an impossible model (a division
# by zero, a tensor of negative size). Token ids, windows and RoPE values are not among them.
POSITIVE_FIELDS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "head_dim",
        "max_position_embeddings",
        "num_heads",  # T5
        "num_kv_heads",  # Falcon
        "num_ln_in_parallel_attn",
        "ffn_hidden_size",
        "ffn_dim",  # OPT
        "word_embed_proj_dim",
        "d_kv",  # T5
        "d_ff",
        "num_decoder_layers",
        "relative_attention_num_buckets",
        "relative_attention_max_distance",
    }
)


# Real values that are a scale or a frequency base: zero or less makes every output NaN.
POSITIVE_REALS = frozenset(
    {
        "rope_theta",
        "rope_local_base_freq",
        "rms_norm_eps",
        "layer_norm_eps",
        "layer_norm_epsilon",
        "qk_norm_eps",
    }
)


class _WrongType(ValueError):
    """A config value is not of its field's type."""


# Returns a config value as its field takes it, or raises _WrongType.
Check = Callable[[Any], Any]


def _as_int(value: Any) -> int:
    """An integer, or a float with an integral value (2048.0); bools and strings are wrong."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    raise _WrongType


def _as_float(value: Any) -> Any:
    """Any finite number but a bool, unchanged (RoPE theta is often written as an integer)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return value
    raise _WrongType


def _of_type(kind: type) -> Check:
    """A check that a value is an instance of `kind`."""

    def check(value: Any) -> Any:
        if not isinstance(value, kind):
            raise _WrongType
        return value

    return check


def _list_of(item: Check) -> Check:
    """A check that a value is a list, each item passing `item`."""

    def check(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise _WrongType
        return [item(v) for v in value]

    return check


# A field's annotation (less " | None") -> (its check, what the message asks for).
FIELD_TYPES: dict[str, tuple[Check, str]] = {
    "int": (_as_int, "an integer"),
    "float": (_as_float, "a finite number"),
    "bool": (_of_type(bool), "true or false"),
    "str": (_of_type(str), "a string"),
    "list[int]": (_list_of(_as_int), "a list of integers"),
    "list[str]": (_list_of(_of_type(str)), "a list of strings"),
    "dict[str, Any]": (_of_type(dict), "a JSON object"),
}


def _checked(field_name: str, key: str, value: Any, annotation: str) -> Any:
    """`value` as field `field_name` (spelled `key` in config.json) takes it, or a one-line
    CheckpointError: wrong values would otherwise fail as a TypeError deep in the model code."""
    check, wanted = FIELD_TYPES[annotation.removesuffix(" | None")]
    positive = field_name in POSITIVE_FIELDS
    try:
        result = check(value)
        if (positive and result < 1) or (field_name in POSITIVE_REALS and result <= 0):
            raise _WrongType
    except _WrongType:
        wanted = (
            "a positive integer"
            if positive
            else "a positive number"
            if field_name in POSITIVE_REALS
            else wanted
        )
        raise ConfigValueError(f"{key} must be {wanted}, got {value!r}") from None
    return result


def _normalize(hf: dict[str, Any]) -> dict[str, Any]:
    """Spell HF config keys one way: architecture name, EOS as a list, RoPE theta and scaling."""
    values = dict(hf)
    architectures = hf.get("architectures") or []
    if architectures and "architecture" not in values:
        values["architecture"] = architectures[0]
    eos = hf.get("eos_token_id")
    values["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, int) else eos)
    if "torch_dtype" not in values and "dtype" in hf:
        values["torch_dtype"] = hf["dtype"]
    # transformers >= 5 writes `rope_parameters = {"rope_type", "rope_theta", ...}`; older versions
    # write `rope_theta` and an optional `rope_scaling` dict. Keep `rope_theta` + `rope_scaling`.
    rope = hf.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if "partial_rotary_factor" in rope:
            values["partial_rotary_factor"] = rope["partial_rotary_factor"]
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        values["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    scaling = values.get("rope_scaling")
    if isinstance(scaling, dict):
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.pop("type", "default"))
        if scaling["rope_type"] in ("longrope", "su"):  # "su": the first Phi-3 configs' name for it
            scaling = _complete_longrope(scaling, values)
        values["rope_scaling"] = None if scaling["rope_type"] == "default" else scaling
    return values


def _complete_longrope(scaling: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """LongRoPE's scaling dict with all its frequencies need. Phi-3 configs keep the original context
    beside `rope_scaling` and leave `factor` to be derived as context / original context."""
    original = scaling.get("original_max_position_embeddings") or values.get(
        "original_max_position_embeddings"
    )
    if not original:
        raise ConfigValueError(
            "rope_scaling 'longrope' needs original_max_position_embeddings, which the config lacks"
        )
    context = values.get("max_position_embeddings") or ModelConfig.max_position_embeddings
    factor = scaling.get("factor") or context / original
    return {
        **scaling,
        "rope_type": "longrope",
        "original_max_position_embeddings": original,
        "factor": factor,
    }
