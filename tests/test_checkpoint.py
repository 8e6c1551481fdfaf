"""Checkpoint reading, the mp_num 8 qkv layout, bad checkpoints, hub ids, export and `codegen2 convert`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import hf_codegen, hf_llama, save_bin
from safetensors.torch import load_file, save_file

from codegen2.models.checkpoint import CheckpointError, load_model, resolve, save_model

X = torch.randint(0, 51200, (2, 19), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    """Logits of ours (which returns them directly) or of a transformers model."""
    return model(X) if hasattr(model, "tok_embeddings") else model(X).logits.float()


@pytest.mark.parametrize("family", ["codegen", "llama"])
@pytest.mark.parametrize("layout", ["bin", "sharded-safetensors", "sharded-bin", "bf16", "fp16"])
def test_file_layouts_and_dtypes(tmp_path, family, layout):
    hf = hf_codegen() if family == "codegen" else hf_llama()
    ref = logits(hf)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(layout)
    if dtype is not None:
        hf = hf.to(dtype)
        ref = logits(hf)
    shard = "1MB" if "sharded" in layout else "5GB"
    if "bin" in layout:
        save_bin(hf, tmp_path, max_shard_size=shard)
    else:
        hf.save_pretrained(tmp_path, max_shard_size=shard)
    names = os.listdir(tmp_path)
    assert any(n.endswith(".bin" if "bin" in layout else ".safetensors") for n in names), names
    if "sharded" in layout:
        assert any(n.endswith(".index.json") for n in names), names
    model = load_model(tmp_path)
    assert model.tok_embeddings.weight.dtype == (dtype or torch.float32)
    tol = 1e-5 if dtype is None else 0.05
    assert (logits(model) - ref).abs().max() <= tol


def test_ignored_buffers_in_the_checkpoint(tmp_path):
    """Official CodeGen2 files carry attn.causal_mask; old Llama files carry rotary_emb.inv_freq."""
    hf = hf_codegen()
    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["transformer.h.0.attn.causal_mask"] = torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.bool))
    sd["transformer.h.1.attn.causal_mask"] = torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.bool))
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert (logits(load_model(tmp_path)) - logits(hf)).abs().max() <= 1e-5

    llama_dir = tmp_path / "llama"
    hf = hf_llama()
    hf.save_pretrained(llama_dir)
    sd = load_file(llama_dir / "model.safetensors")
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, llama_dir / "model.safetensors", metadata={"format": "pt"})
    assert (logits(load_model(llama_dir)) - logits(hf)).abs().max() <= 1e-5


# --- the mp_num 8 layout of CodeGen2-1B / 3.7B -------------------------------------------------------------------

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mp: int) -> torch.Tensor:
    """The official 1B / 3.7B layout written out row block by row block: for each shard m, its q, v, k rows."""
    E = q.shape[0]
    block = E // mp
    rows = []
    for m in range(mp):
        sl = slice(m * block, (m + 1) * block)
        rows += [q[sl], v[sl], k[sl]]
    return torch.cat(rows, dim=0)


def test_mp_num_8_layout(tmp_path):
    """Independent q, k, v weights, fused once the mp 8 way (our checkpoint) and once the mp 4 way (read by
    transformers' own CodeGen code); both must give the same logits."""
    hf = hf_codegen(n_head=8, n_embd=64)  # head_dim 8; n_head divisible by 8 and by 4
    E = hf.config.n_embd
    g = torch.Generator().manual_seed(7)
    qkv = {}
    for i, block in enumerate(hf.transformer.h):
        q, k, v = (torch.randn(E, E, generator=g) * 0.1 for _ in range(3))
        qkv[i] = (q, k, v)
        with torch.no_grad():
            block.attn.qkv_proj.weight.copy_(fuse_qkv(q, k, v, 4))
    ref = logits(hf)
    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    for i, (q, k, v) in qkv.items():
        sd[f"transformer.h.{i}.attn.qkv_proj.weight"] = fuse_qkv(q, k, v, 8)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["head_dim"] = E // 8  # as in the official 1B / 3.7B config.json: this key marks the mp 8 layout
    (tmp_path / "config.json").write_text(json.dumps(config))

    ours = load_model(tmp_path)
    assert (logits(ours) - ref).abs().max() <= 1e-5
    # The wrong layout scrambles q, k and v: forcing mp 4 must give different logits.
    assert (logits(load_model(tmp_path, mp_num=4)) - ref).abs().max() > 1e-3
    # Exported, it is a checkpoint transformers' built-in (mp 4) class reads with the same logits.
    from transformers import CodeGenForCausalLM
    save_model(ours, tmp_path / "export")
    again = CodeGenForCausalLM.from_pretrained(tmp_path / "export")
    assert (logits(again) - ref).abs().max() <= 1e-5


# --- export ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["codegen", "codegen-tied", "llama", "llama-gqa", "llama-tied"])
def test_export_loads_in_transformers_with_same_logits(tmp_path, family):
    from transformers import AutoModelForCausalLM
    hf = {"codegen": hf_codegen, "llama": hf_llama,
          "codegen-tied": lambda: hf_codegen(tie_word_embeddings=True),
          "llama-tied": lambda: hf_llama(tie_word_embeddings=True),
          "llama-gqa": lambda: hf_llama(num_key_value_heads=2)}[family]()
    if family.endswith("tied"):  # the output layer really is the embedding (CodeGen's lm_head keeps its bias)
        assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    hf.save_pretrained(tmp_path / "src")
    ours = load_model(tmp_path / "src")
    assert (ours.output.weight is ours.tok_embeddings.weight) == family.endswith("tied")
    save_model(ours, tmp_path / "out", max_shard_size="1MB")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (logits(again) - logits(hf)).abs().max() <= 1e-5
    assert (logits(load_model(tmp_path / "out")) - logits(hf)).abs().max() <= 1e-5


def test_convert_cli_bin_fp32_to_bf16_safetensors(tmp_path):
    hf = hf_codegen()
    save_bin(hf, tmp_path / "src")
    assert (tmp_path / "src" / "pytorch_model.bin").is_file()
    out = subprocess.run([sys.executable, "-m", "codegen2", "convert", str(tmp_path / "src"), str(tmp_path / "dst"),
                          "--dtype", "bf16"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    sd = load_file(tmp_path / "dst" / "model.safetensors")
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    assert (tmp_path / "dst" / "tokenizer.json").is_file()
    converted = load_model(tmp_path / "dst")
    direct = load_model(tmp_path / "src", dtype="bf16")
    assert torch.equal(logits(converted), logits(direct))


# --- bad checkpoints ----------------------------------------------------------------------------------------------

@pytest.fixture
def good(tmp_path, codegen_dir):
    path = tmp_path / "ckpt"
    shutil.copytree(codegen_dir, path)
    return path


def _edit_tensors(path: Path, edit) -> None:
    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(good):
    _edit_tensors(good, lambda sd: sd.pop("transformer.h.1.mlp.fc_in.bias"))
    with pytest.raises(CheckpointError, match=r"missing .*transformer\.h\.1\.mlp\.fc_in\.bias"):
        load_model(good)


def test_wrong_shape(good):
    _edit_tensors(good, lambda sd: sd.__setitem__("lm_head.bias", torch.zeros(7)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'lm_head\.bias' has shape \(7,\)"):
        load_model(good)


def test_unexpected_tensor(good):
    _edit_tensors(good, lambda sd: sd.__setitem__("transformer.h.9.ln_1.weight", torch.zeros(64)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'transformer\.h\.9"):
        load_model(good)


def test_truncated_file(good):
    data = (good / "model.safetensors").read_bytes()
    (good / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read"):
        load_model(good)


def test_truncated_bin(tmp_path):
    save_bin(hf_codegen(), tmp_path)
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot read"):
        load_model(tmp_path)


def test_missing_shard(tmp_path):
    hf_llama().save_pretrained(tmp_path, max_shard_size="1MB")
    shard = sorted(p for p in tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: shard named in the index does not exist"):
        load_model(tmp_path)


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_unknown_architecture(good):
    _edit_config(good, lambda c: c.__setitem__("model_type", "gpt_neox"))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown model_type 'gpt_neox'"):
        load_model(good)


def test_config_missing_field(good):
    _edit_config(good, lambda c: c.pop("rotary_dim"))
    with pytest.raises(CheckpointError, match=r"config\.json: config is missing the field 'rotary_dim'"):
        load_model(good)


def test_no_weights_and_no_config(tmp_path, codegen_dir):
    shutil.copyfile(codegen_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_not_a_directory_nor_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="neither a model directory nor a Hugging Face hub id"):
        resolve(tmp_path / "does-not-exist")


def test_offline_hub_id_is_one_clear_error(tmp_path):
    """Offline with an empty hub cache: the CLI prints one line naming the id and how to pass a directory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-m", "codegen2", "complete", "--model", "Salesforce/codegen2-1B_P",
                          "def f():"], capture_output=True, text=True, env=env)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert "'Salesforce/codegen2-1B_P'" in out.stderr and "--model DIR" in out.stderr


def test_hub_id_resolves_through_the_hub_cache(tmp_path, codegen_dir):
    """A hub id already in huggingface_hub's cache loads offline, through the same code path as a download."""
    repo = tmp_path / "hf" / "hub" / "models--Salesforce--codegen2-1B_P"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(codegen_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    code = ("import sys; from codegen2.models.checkpoint import resolve; "
            "print(resolve('Salesforce/codegen2-1B_P'))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == snapshot


def test_load_makes_no_second_copy(tmp_path):
    """Peak RSS while loading a ~190 MB fp32 checkpoint stays near one copy of the weights (a second copy
    would double it)."""
    hf = hf_llama(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=8)
    hf.save_pretrained(tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    del hf
    code = ("import torch\n"
            "from codegen2.models.checkpoint import load_model\n"
            "def hwm():\n"  # VmHWM starts afresh at exec, unlike getrusage's ru_maxrss
            "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
            "before = hwm()\n"
            f"m = load_model({str(tmp_path)!r})\n"
            "with torch.inference_mode():\n"
            "    m(torch.tensor([[1, 2, 3]]))\n"  # touches every weight page
            "print(hwm() - before)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.strip())
    assert 0.5 * size < grown < 1.4 * size, f"RSS grew by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB checkpoint"
