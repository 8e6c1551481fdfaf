"""Read and write Hugging Face model directories: config.json plus safetensors or PyTorch ``.bin`` weights.

Loading never holds a second copy of the weights: the model is built on the meta device, tensors are read through
memory maps (safetensors' ``safe_open``, ``torch.load(mmap=True)``) and handed to the model with
``load_state_dict(assign=True)``. A tensor is copied only when it must change: a dtype conversion, or CodeGen2's
fused qkv weight, which ``convert.py`` rearranges. Everything the checkpoint must hold is checked against the
config first, so a bad checkpoint fails with the file and tensor named instead of loading partially.

Hub ids (``Salesforce/codegen2-1B_P``) go through huggingface_hub's download and cache.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from codegen2.models import ModelConfig, build, convert

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and, where it applies, the tensor."""


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")
    return DTYPES[name]


def check_device(device: str | torch.device) -> torch.device:
    """The torch device named, or a ValueError that says why it cannot be used here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {str(device)!r} ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"device {str(device)!r}: CUDA is not available (torch {torch.__version__} is {build}, "
                         "or no GPU is visible); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available here; use --device cpu")
    return dev


# --- finding the files -----------------------------------------------------------------------------------------

def resolve(model: str | Path) -> Path:
    """A local model directory, or a Hugging Face hub id downloaded (or found in the hub cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"model '{text}' is neither a model directory nor a Hugging Face hub id "
                              "(like Salesforce/codegen2-1B_P)")
    from huggingface_hub import snapshot_download  # core dependency; imported here to keep start-up fast

    patterns = ["*.json", "*.txt", "*.safetensors"]
    try:
        local = Path(snapshot_download(text, allow_patterns=patterns))
        if not any((local / f).exists() for f in WEIGHT_FILES[:2]):  # the official repos ship only .bin
            local = Path(snapshot_download(text, allow_patterns=patterns + ["*.bin"]))
    except Exception as e:  # offline, unknown repo, gated, ...: one clear message for all
        raise CheckpointError(
            f"cannot get '{text}' from the Hugging Face hub and it is not in the local hub cache "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Weights are downloaded on first "
            f"use, which needs internet; otherwise download the repository elsewhere "
            f"(`huggingface-cli download {text} --local-dir DIR`) and pass that directory: --model DIR") from None
    return local


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json in the model directory")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


class _Weights:
    """Lazy access to the tensors of a (possibly sharded) checkpoint, by Hugging Face name."""

    def __init__(self, directory: Path, keep_open: bool = True) -> None:
        # keep_open=False: each tensor opens its file afresh, so its memory map goes away with the tensor (a
        # safetensors handle keeps the whole file mapped, and every page read stays in our RSS until it closes).
        self.keep_open = keep_open
        found = [f for f in WEIGHT_FILES if (directory / f).is_file()]
        if not found:
            raise CheckpointError(f"{directory}: no weights found (looked for {', '.join(WEIGHT_FILES)})")
        first = directory / found[0]
        if first.name.endswith(".index.json"):
            try:
                weight_map = json.loads(first.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{first}: not a valid shard index ({e!r})") from None
            self.location = {name: directory / f for name, f in weight_map.items()}
        else:
            self.location = None
            self.single = first
        self._open: dict[Path, object] = {}

    def _file(self, path: Path):
        if path not in self._open:
            if not path.is_file():
                raise CheckpointError(f"{path}: shard named in the index does not exist")
            try:
                if path.suffix == ".safetensors":
                    from safetensors import safe_open
                    handle = safe_open(str(path), framework="pt")
                    self._open[path] = {k: (lambda k=k, h=handle: h.get_tensor(k)) for k in handle.keys()}
                else:
                    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                    self._open[path] = {k: (lambda t=t: t) for k, t in sd.items()}
            except CheckpointError:
                raise
            except Exception as e:  # truncated or corrupt file
                raise CheckpointError(f"{path}: cannot read the weights file ({type(e).__name__}: {e})") from None
        return self._open[path]

    def names(self) -> dict[str, Path]:
        if self.location is not None:
            return dict(self.location)
        return {name: self.single for name in self._file(self.single)}

    def get(self, name: str, path: Path) -> torch.Tensor:
        getter = self._file(path).get(name)
        if not self.keep_open and path.suffix == ".safetensors":  # a .bin's torch.load is kept: it is the slow part
            self._open.pop(path, None)
        if getter is None:
            raise CheckpointError(f"{path}: tensor '{name}' is listed in the index but missing from the file")
        try:
            return getter()
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor '{name}' ({type(e).__name__}: {e})") from None


# --- loading -----------------------------------------------------------------------------------------------------

def load_model(model: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               mp_num: int | None = None, on_block: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """Load a checkpoint directory or hub id into our model, in eval mode, without gradients.

    dtype: None keeps the checkpoint's stored dtype. mp_num overrides CodeGen2's qkv layout detection.
    on_block: called on each transformer block (``model.layers[i]``) as soon as its weights are in, before the
    next block is read; it may replace the block's submodules (a weight format: codegen2.kernels.quantizer). The
    checkpoint's memory maps are then released block by block, so only one block's weights as stored are in
    memory at a time. Checking the whole checkpoint still happens before anything is read.
    """
    check_device(device)
    directory = resolve(model)
    hf = read_config(directory)
    try:
        cfg = convert.config_from_hf(hf, str(directory / "config.json"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(str(e)) from None
    weights = _Weights(directory, keep_open=on_block is None)
    available = weights.names()
    expected = convert.name_map(cfg)
    with torch.device("meta"):
        model_ = build(cfg)
    shapes = {k: tuple(v.shape) for k, v in model_.state_dict().items()}
    missing = [n for n in expected if n not in available]
    if missing:
        raise CheckpointError(f"{directory}: checkpoint is missing {len(missing)} tensor(s) the config requires, "
                              f"first '{missing[0]}'")
    unexpected = [n for n in available if n not in expected and not convert.IGNORED.match(n)]
    if unexpected:
        raise CheckpointError(f"{available[unexpected[0]]}: unexpected tensor '{unexpected[0]}' "
                              "(does config.json match these weights?)")
    target = parse_dtype(dtype)
    layout = convert.qkv_mp_num(hf, mp_num) if cfg.family == "codegen2" else None

    def read(hf_name: str) -> torch.Tensor:
        """One tensor, checked, in our layout and the target dtype (no copy when nothing changes)."""
        nonlocal target
        ours, path = expected[hf_name], available[hf_name]
        t = weights.get(hf_name, path)
        if tuple(t.shape) != shapes[ours]:
            raise CheckpointError(f"{path}: tensor '{hf_name}' has shape {tuple(t.shape)}, "
                                  f"expected {shapes[ours]} from config.json")
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: tensor '{hf_name}' has non-float dtype {t.dtype}")
        target = target or t.dtype
        if ours.endswith("attention.wqkv.weight"):
            t = convert.qkv_from_hf(t, layout)
        return t.to(target)

    state = {}
    blocks: dict[int, list[str]] = {}  # with on_block: block index -> its tensors' names, read block by block
    for hf_name, ours in expected.items():
        if on_block is not None and ours.startswith("layers."):
            blocks.setdefault(int(ours.split(".")[1]), []).append(hf_name)
        else:
            state[ours] = read(hf_name)
    for i, names in blocks.items():
        block_state = {expected[n].split(".", 2)[2]: read(n) for n in names}  # "layers.3.x.weight" -> "x.weight"
        model_.layers[i].load_state_dict(block_state, strict=True, assign=True)
        del block_state  # the block now holds the only references: on_block may free them
        on_block(model_.layers[i].to(device))
    if cfg.tie_word_embeddings:  # the file has no output weight of its own; the module still lists one
        state["output.weight"] = state["tok_embeddings.weight"]
    if on_block is None:
        model_.load_state_dict(state, strict=True, assign=True)
    else:  # the blocks are in (and may hold other modules now); the rest must be exactly what is left
        missing, unexpected = model_.load_state_dict(state, strict=False, assign=True)
        assert not unexpected and all(k.startswith("layers.") for k in missing), (missing, unexpected)
    if cfg.tie_word_embeddings:
        model_.output.weight = model_.tok_embeddings.weight
    model_.reset_rotary()
    return model_.to(device).eval().requires_grad_(False)


# --- saving --------------------------------------------------------------------------------------------------------

def save_model(model: nn.Module, directory: str | Path, dtype: str | torch.dtype | None = None,
               tokenizer_dir: str | Path | None = None, max_shard_size: str | int = "5GB") -> Path:
    """Write a Hugging Face directory (config.json, safetensors, tokenizer files) that transformers'
    CodeGenForCausalLM (mp_num 4 layout) or LlamaForCausalLM load with the same logits.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    target = parse_dtype(dtype)
    state = convert.to_hf_state_dict(model.state_dict(), cfg)
    if target is not None:
        state = {k: v.to(target) for k, v in state.items()}
    hf = convert.config_to_hf(cfg)
    hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _write_tokenizer(out, cfg, Path(tokenizer_dir) if tokenizer_dir else None)
    return out


def _write_tokenizer(out: Path, cfg: ModelConfig, source: Path | None) -> None:
    copied = False
    if source is not None and source.resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
                copied = True
    if copied:
        return
    if cfg.family == "codegen2":
        bundled = Path(__file__).resolve().parent.parent / "data" / "codegen2-tokenizer"
        for name in TOKENIZER_FILES:
            shutil.copyfile(bundled / name, out / name)
    else:
        # CodeGen2.5's official tokenizer is remote code; this names it so load_tokenizer builds ours.
        config = {"tokenizer_class": "CodeGen25Tokenizer", "eos_token": "<|endoftext|>", "pad_token": None}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
