"""Fixtures: tiny random checkpoints saved by transformers' own CodeGen and Llama classes, owned here.

transformers is a test-only dependency; it is the independent reference our models are compared against. Every
test that needs a standard tiny checkpoint takes it from ``checkpoints`` (or ``codegen_dir`` / ``llama_dir``), so
each is built once per session; tests that need an unusual one (sharded, tied, biased) build it themselves.
"""

from __future__ import annotations

import os

import pytest
import torch

# The engine's thread governor (engine/threads.py) changes torch's thread count while other processes are busy,
# and torch's own fp32 kernels may round differently at another count; tests compare runs token for token, so
# the whole suite (and every process it starts) keeps the count fixed. tests/test_threads.py tests the governor.
os.environ["CODEGEN2_ADAPT_THREADS"] = "0"

VOCAB = 51200  # the real vocabulary size, so the real tokenizers work with these models


def hf_codegen(seed: int = 0, **overrides):
    from transformers import CodeGenConfig, CodeGenForCausalLM

    fields = dict(vocab_size=VOCAB, n_positions=256, n_ctx=256, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                  bos_token_id=50256, eos_token_id=50256)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = CodeGenForCausalLM(CodeGenConfig(**fields)).eval()
    _randomize(model)
    return model


def hf_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
                  bos_token_id=50256, eos_token_id=50256, pad_token_id=0)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    _randomize(model)
    return model


def _randomize(model) -> None:
    # transformers initialises norms to 1 and biases to 0; random values make parity tests see every tensor.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.normal_(0.0, 0.08)


# The standard tiny checkpoints by name: CodeGen (mp_num 4 layout), Llama, and Llama with grouped-query attention.
TINY = {"codegen2": hf_codegen, "llama": hf_llama, "llama-gqa": lambda: hf_llama(num_key_value_heads=2)}


class Checkpoints:
    """Directory per name, saved by transformers (fp32 safetensors) on first use; ``reference(name)`` is a
    fresh transformers model loaded from it."""

    def __init__(self, factory) -> None:
        self.factory, self.dirs = factory, {}

    def __call__(self, name: str):
        if name not in self.dirs:
            path = self.factory.mktemp(f"hf_{name}")
            TINY[name]().save_pretrained(path)
            self.dirs[name] = path
        return self.dirs[name]

    def reference(self, name: str):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self(name)).float().eval()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory)


@pytest.fixture(scope="session")
def codegen_dir(checkpoints):
    return checkpoints("codegen2")


@pytest.fixture(scope="session")
def llama_dir(checkpoints):
    return checkpoints("llama")


def save_bin(model, path, max_shard_size: str | None = None) -> None:
    """Save the way the official CodeGen2 / CodeGen2.5 repos are stored: PyTorch pickles, maybe sharded.

    (transformers 5 writes only safetensors, so the .bin layout is written here by hand.)
    """
    import json
    from pathlib import Path

    from huggingface_hub import split_torch_state_dict_into_shards

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    split = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size=max_shard_size or "50GB")
    for filename, names in split.filename_to_tensors.items():
        torch.save({n: state[n] for n in names}, path / filename)
    if split.is_sharded:
        index = {"metadata": {}, "weight_map": split.tensor_to_filename}
        (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
