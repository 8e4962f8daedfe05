"""Model configuration: one dataclass per architecture family, built from a Hugging Face config dict.

`ModelConfig` holds what every decoder-only family shares; each family file in `lamina/models/`
subclasses it with its own fields. `from_hf_dict` keeps the keys the dataclass knows, drops the rest,
and normalizes the spellings that differ between transformers versions (RoPE keys, EOS lists), so
the model code reads one clean set of names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from lamina.errors import CheckpointError

ConfigT = TypeVar("ConfigT", bound="ModelConfig")


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
        for alias, name in cls.hf_aliases.items():
            if values.get(alias) is not None:
                values.setdefault(name, values[alias])
        values.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known and v is not None}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise CheckpointError(
                f"model config for {values.get('architecture', '?')} lacks required keys {missing}; "
                "is config.json complete?"
            )
        return cls(**kwargs)


def _normalize(hf: dict[str, Any]) -> dict[str, Any]:
    """Spell HF config keys one way: architecture name, EOS as a list, RoPE theta and scaling."""
    values = dict(hf)
    architectures = hf.get("architectures") or []
    if architectures and "architecture" not in values:
        values["architecture"] = architectures[0]
    eos = hf.get("eos_token_id")
    values["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
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
        raise CheckpointError(
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
