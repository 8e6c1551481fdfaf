"""Model families (pure math) and the checkpoint code that feeds them.

One registry of families: each names its config and model class, the tokenizer it is trained with, and the
shapes of its official checkpoints. Code that needs to know the family of a config looks it up here by
``config.family`` instead of testing classes; Hugging Face's names for the same things live only in convert.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from codegen2.models import codegen2, llama
from codegen2.models.codegen2 import CodeGen2, CodeGen2Config
from codegen2.models.llama import Llama, LlamaConfig

ModelConfig = CodeGen2Config | LlamaConfig


@dataclass(frozen=True)
class Family:
    name: str  # the config's ``family``
    config: type
    model: type[nn.Module]
    tokenizer: str  # the tokenizer kind its checkpoints use (tokenizer.load_tokenizer)
    presets: dict[str, dict]  # official shapes: name -> config fields


FAMILIES: dict[str, Family] = {
    "codegen2": Family("codegen2", CodeGen2Config, CodeGen2, "codegen2", codegen2.PRESETS),
    "llama": Family("llama", LlamaConfig, Llama, "codegen25", llama.PRESETS),
}
PRESETS: dict[str, tuple[Family, dict]] = {name: (f, fields) for f in FAMILIES.values()
                                           for name, fields in f.presets.items()}


def family(cfg: ModelConfig | str | None) -> Family:
    """The family of a config, or of a family name."""
    name = cfg if cfg is None or isinstance(cfg, str) else cfg.family
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {list(FAMILIES)}")
    return FAMILIES[name]


def build(cfg: ModelConfig) -> nn.Module:
    """A model of this config's family (random weights; on the current default device)."""
    return family(cfg).model(cfg)


def preset_config(name: str, **overrides) -> ModelConfig:
    """The config of an official model shape by name (e.g. 'codegen2-1B'), with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    fam, fields = PRESETS[name]
    return fam.config(**{**fields, **overrides})


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of ``Config.to_dict()``: our own JSON form of a config, for any custom shape."""
    d = dict(d)
    return family(d.pop("family", None)).config(**d)


__all__ = ["CodeGen2", "CodeGen2Config", "Llama", "LlamaConfig", "ModelConfig", "Family", "FAMILIES", "PRESETS",
           "family", "build", "preset_config", "config_from_dict"]
