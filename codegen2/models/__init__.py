"""Model families (pure math) and the checkpoint code that feeds them."""

from __future__ import annotations

from codegen2.models import codegen2, llama
from codegen2.models.codegen2 import CodeGen2, CodeGen2Config
from codegen2.models.llama import Llama, LlamaConfig

PRESETS: dict[str, tuple[type, dict]] = {
    **{name: (CodeGen2Config, fields) for name, fields in codegen2.PRESETS.items()},
    **{name: (LlamaConfig, fields) for name, fields in llama.PRESETS.items()},
}


def preset_config(name: str, **overrides) -> CodeGen2Config | LlamaConfig:
    """The config of an official model shape by name (e.g. 'codegen2-1B'), with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    cls, fields = PRESETS[name]
    return cls(**{**fields, **overrides})


def config_from_dict(d: dict) -> CodeGen2Config | LlamaConfig:
    """Inverse of ``Config.to_dict()``: our own JSON form of a config, for any custom shape."""
    d = dict(d)
    family = d.pop("family", None)
    classes = {"codegen2": CodeGen2Config, "llama": LlamaConfig}
    if family not in classes:
        raise ValueError(f"config has unknown family {family!r}; expected one of {list(classes)}")
    return classes[family](**d)


__all__ = ["CodeGen2", "CodeGen2Config", "Llama", "LlamaConfig", "PRESETS", "preset_config", "config_from_dict"]
