"""LoRA adapters on a model's linear layers, applied from outside the model files, and peft's adapter format.

    add_lora(model, rank=16, alpha=32, targets=["wqkv", "wo"])  # y = W x + (alpha / rank) B A x on those layers
    save_adapter(adapter_state(model), model.config, "adapter/", rank=16, alpha=32)
    apply_adapter(model, "adapter/", base_dir)                   # peft's files (ours or peft's) -> LoRA layers
    merge_adapters(plain_model, adapter_state(model), alpha / rank)  # W + (alpha / rank) B A: plain weights

What this is: ``LoRALinear`` (the layer it wraps, frozen, plus A (r, in) and B (out, r); B starts at zero so a
new adapter leaves the model exactly as it was), the layers each family can adapt, and peft's on-disk format
(``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.<HF module>.lora_A.weight``)
written with Hugging Face's module names from convert.py's tables. CodeGen2's fused qkv: our rows are plain
[q; k; v], the checkpoint's are mp_num-interleaved, so B's rows are permuted as the weight's are (A acts on the
input and is the same in both). The adapter holds the layout of the base checkpoint it was trained on (mp_num 8
for the official 1B / 3.7B, else 4), which is why loading it takes that checkpoint's directory.

What this is not: training (freezing the base, the optimizer, checkpoints: train/), a quantized base (kernels/
swaps the wrapped layer for inference; train/lora.py for training), dropout, DoRA, rsLoRA, per-layer ranks, or
adapters on the output layer (the training loss reads its weight directly: models/loss.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from codegen2.models import convert

TARGETS = {"codegen2": ("wqkv", "wo", "w1", "w2"), "llama": ("wq", "wk", "wv", "wo", "w1", "w2", "w3")}
PEFT_PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T``; A and B are fp32 whatever the base's dtype or format."""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's initialisation, as peft's

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        # In the adapter's dtype (under autocast: the autocast dtype); x (..., in) -> (..., rank) -> (..., out).
        delta = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (delta * self.scale).to(y.dtype)


def _check_targets(family: str, targets: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    valid = TARGETS[family]
    if targets is None:
        return valid
    if not targets or (unknown := [t for t in targets if t not in valid]):
        raise ValueError(f"unknown LoRA target(s) {', '.join(map(repr, unknown or ['(none)']))}: "
                         f"{family} models adapt {', '.join(valid)}")
    return tuple(targets)


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str] | tuple[str, ...] | None = None
             ) -> nn.Module:
    """Wrap the ``targets`` linear layers of every block (default: all of TARGETS[family]) in LoRALinear, in
    place. A and B are created on each layer's device (from the global RNG: seed it first)."""
    if rank < 1 or not alpha > 0:
        raise ValueError(f"LoRA needs rank >= 1 and alpha > 0, got rank {rank}, alpha {alpha}")
    wanted = _check_targets(model.config.family, targets)
    for block in model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if name in wanted and not isinstance(child, LoRALinear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our names -> tensors of the adapters only: ``layers.{i}.attention.wqkv.lora_A`` (r, in), ``...lora_B``."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def _hf_modules(cfg) -> dict[str, str]:
    """Our module path -> Hugging Face's, for every linear layer of the blocks (from convert's name table)."""
    return {ours.removesuffix(".weight"): hf.removesuffix(".weight") for hf, ours in convert.name_map(cfg).items()
            if ours.startswith("layers.") and ours.endswith(".weight") and ours.split(".")[-2] in TARGETS[cfg.family]}


def merge_adapters(model: nn.Module, adapters: dict[str, torch.Tensor], scale: float) -> nn.Module:
    """Fold ``adapter_state`` tensors into a plain model (no LoRA layers) of the same shape, in place: each
    adapted W becomes W + scale * B A, summed in fp32 and stored in W's dtype."""
    modules = dict(model.named_modules())
    for key, A in adapters.items():
        if key.endswith(".lora_A"):
            name = key.removesuffix(".lora_A")
            w = modules[name].weight
            delta = adapters[f"{name}.lora_B"].float() @ A.float()  # (out, in)
            # A new tensor: the loaded one may be a read-only memory map.
            merged = (w.float() + scale * delta.to(w.device)).to(w.dtype)
            modules[name].weight = nn.Parameter(merged, requires_grad=w.requires_grad)
    return model


# --- peft's format ------------------------------------------------------------------------------------------------

def save_adapter(state: dict[str, torch.Tensor], cfg, directory: str | Path, *, rank: int, alpha: float,
                 mp_num: int = 4, base_model: str | None = None) -> Path:
    """Write ``adapter_state`` tensors as a peft LoRA adapter that peft + transformers load onto the base model.
    mp_num: the fused qkv layout of the base checkpoint (convert.qkv_mp_num)."""
    from safetensors.torch import save_file

    hf = _hf_modules(cfg)
    tensors, targets = {}, set()
    for key, t in state.items():
        path, _, part = key.rpartition(".")  # part: lora_A | lora_B
        t = t.detach().float().cpu()
        if part == "lora_B" and path.endswith("attention.wqkv"):
            t = convert.qkv_to_hf(t, mp_num)  # (3E, r): rows like the weight's
        tensors[f"{PEFT_PREFIX}{hf[path]}.{part}.weight"] = t.contiguous()
        targets.add(hf[path].rsplit(".", 1)[-1])
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
              "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


def load_adapter(model: nn.Module, directory: str | Path, mp_num: int = 4) -> nn.Module:
    """Add the LoRA layers of a peft adapter directory to ``model`` (in place) and load their weights.
    mp_num: the fused qkv layout of the base checkpoint the adapter was trained on."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise ValueError(f"{d} is not a LoRA adapter directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    c = json.loads((d / CONFIG_FILE).read_text())
    unsupported = {k: c.get(k) for k in ("use_rslora", "use_dora", "modules_to_save", "layers_to_transform",
                                         "rank_pattern", "alpha_pattern") if c.get(k)}
    if c.get("peft_type") != "LORA" or c.get("bias", "none") != "none" or unsupported:
        raise ValueError(f"{d / CONFIG_FILE}: only plain LoRA adapters are supported (peft_type LORA, bias none, "
                         f"no rsLoRA, DoRA, modules_to_save, layer or rank patterns); this one has "
                         f"{unsupported or {k: c.get(k) for k in ('peft_type', 'bias')}}")
    to_ours = {hf: ours for ours, hf in _hf_modules(model.config).items()}
    weights = {}
    for key, t in load_file(str(d / WEIGHTS_FILE)).items():
        hf_path, _, part = key.removeprefix(PEFT_PREFIX).removesuffix(".weight").rpartition(".")
        if hf_path not in to_ours or part not in ("lora_A", "lora_B"):
            raise ValueError(f"{d / WEIGHTS_FILE}: tensor '{key}' is not a LoRA weight of a linear layer this "
                             f"{model.config.family} model can adapt ({', '.join(TARGETS[model.config.family])})")
        weights[f"{to_ours[hf_path]}.{part}"] = t
    targets = sorted({k.rsplit(".", 2)[-2] for k in weights})
    add_lora(model, int(c["r"]), float(c["lora_alpha"]), targets)
    mine = {k: v for k, v in model.named_parameters() if k.endswith((".lora_A", ".lora_B"))}
    if missing := sorted(set(mine) - set(weights)):
        raise ValueError(f"{d / WEIGHTS_FILE}: no weights for {len(missing)} adapted layer(s), first '{missing[0]}'")
    with torch.no_grad():
        for key, t in weights.items():
            if key.endswith("attention.wqkv.lora_B"):
                t = convert.qkv_from_hf(t, mp_num)
            if t.shape != mine[key].shape:
                raise ValueError(f"{d / WEIGHTS_FILE}: '{key}' has shape {tuple(t.shape)}, the model needs "
                                 f"{tuple(mine[key].shape)} (rank {c['r']})")
            mine[key].copy_(t)
    return model


def qkv_layout(cfg, base_dir: str | Path, override: int | None = None) -> int:
    """The mp_num of the fused qkv rows in the checkpoint at ``base_dir`` (4 for families without one)."""
    from codegen2.models.checkpoint import read_config

    return convert.qkv_mp_num(read_config(Path(base_dir)), override) if cfg.family == "codegen2" else 4


def apply_adapter(model: nn.Module, adapter_dir: str | Path, base_dir: str | Path, mp_num: int | None = None
                  ) -> nn.Module:
    """``load_adapter`` onto a model loaded from ``base_dir``, in that checkpoint's qkv layout (or mp_num), the
    adapters frozen: for inference."""
    return load_adapter(model, adapter_dir, qkv_layout(model.config, base_dir, mp_num)).requires_grad_(False)
