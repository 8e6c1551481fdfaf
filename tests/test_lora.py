"""LoRA adapters (models/lora.py, train/lora.py): the layer by hand, targets, merging, peft's format against the
real peft + transformers in both directions, a frozen int8 base's gradients, and ``--adapter`` in the engine and
the command line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from codegen2.models.checkpoint import load_model, save_model
from codegen2.models.lora import LoRALinear, adapter_state, add_lora, apply_adapter, merge_adapters, save_adapter
from codegen2.train.lora import FrozenLinear, prepare_lora

IDS = torch.tensor([[5, 77, 1000, 50256, 42, 9, 300, 2], [11, 12, 13, 14, 15, 16, 17, 18]])


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """B starts at zero (the adapter is a no-op); random B makes every comparison below see the adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_lora_layer_is_hand_computed_and_starts_as_the_base():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=3, alpha=12.0)
    x = torch.randn(2, 4, 6)
    assert torch.equal(layer(x), base(x))  # B = 0: exactly the base
    with torch.no_grad():
        layer.lora_B.normal_()
    A, B, W, b = layer.lora_A, layer.lora_B, base.weight, base.bias
    xa = torch.einsum("btk,rk->btr", x, A)  # (2, 4, rank)
    want = torch.einsum("btk,nk->btn", x, W) + b + 4.0 * torch.einsum("btr,nr->btn", xa, B)
    assert (layer(x) - want).abs().max() < 1e-5
    assert layer.lora_A.shape == (3, 6) and layer.lora_B.shape == (5, 3) and layer.scale == 4.0


@pytest.mark.parametrize("name", ["codegen2", "llama"])
def test_targets_and_bad_input(checkpoints, name):
    model = load_model(checkpoints(name), dtype="fp32")
    expected = {"codegen2": ["attention.wqkv", "feed_forward.w1"], "llama": ["attention.wq", "feed_forward.w3"]}[name]
    add_lora(model, rank=2, alpha=4.0, targets=[t.split(".")[1] for t in expected])
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == sorted(f"layers.{i}.{t}" for i in range(2) for t in expected)
    assert not isinstance(model.output, LoRALinear)
    valid = {"codegen2": "wqkv, wo, w1, w2", "llama": "wq, wk, wv, wo, w1, w2, w3"}[name]
    with pytest.raises(ValueError, match=f"target\\(s\\) 'q_proj', 'output': {name} models adapt {valid}$"):
        add_lora(load_model(checkpoints(name)), rank=2, alpha=4.0, targets=["q_proj", "output"])
    with pytest.raises(ValueError, match="rank >= 1 and alpha > 0"):
        add_lora(load_model(checkpoints(name)), rank=0, alpha=4.0)
    default = add_lora(load_model(checkpoints(name)), rank=2, alpha=4.0)
    per_block = {"codegen2": 4, "llama": 7}[name]
    assert sum(isinstance(m, LoRALinear) for m in default.modules()) == 2 * per_block


@pytest.mark.parametrize("name", ["codegen2", "llama", "llama-gqa"])
def test_peft_format_both_ways_and_merged(checkpoints, tmp_path, name):
    """Ours -> peft: transformers + peft load our adapter with our logits; peft -> ours: an adapter made by peft
    itself gives peft's logits in codegen2; merged (base + B A) saved as a plain directory: the same logits in
    transformers. CodeGen's fused qkv makes the first two differ unless B's rows follow the weight's layout."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = checkpoints(name)
    torch.manual_seed(1)
    ours = add_lora(load_model(base_dir, dtype="fp32"), rank=4, alpha=8.0)
    randomize_adapters(ours)
    save_adapter(adapter_state(ours), ours.config, tmp_path / "ours", rank=4, alpha=8.0, base_model=str(base_dir))
    with torch.no_grad():
        logits = ours(IDS)
        theirs = PeftModel.from_pretrained(checkpoints.reference(name), tmp_path / "ours").eval()
        assert (theirs(IDS).logits - logits).abs().max() < 1e-4
        assert (load_model(base_dir, dtype="fp32")(IDS) - logits).abs().max() > 1e-2  # the adapter matters

        targets = {"codegen2": ["qkv_proj", "fc_out"], "llama": ["k_proj", "v_proj", "down_proj"]}[name.split("-")[0]]
        made = get_peft_model(checkpoints.reference(name), LoraConfig(r=3, lora_alpha=5, target_modules=targets))
        for n, p in made.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
        made.save_pretrained(tmp_path / "peft")
        loaded = apply_adapter(load_model(base_dir, dtype="fp32"), tmp_path / "peft", base_dir)
        assert (loaded(IDS) - made.eval()(IDS).logits).abs().max() < 1e-4

        merged = merge_adapters(load_model(base_dir, dtype="fp32"), adapter_state(ours), 8.0 / 4)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        save_model(merged, tmp_path / "merged", tokenizer_dir=base_dir)
        hf_merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert (hf_merged(IDS).logits - logits).abs().max() < 1e-4


def test_bad_adapter_directories(tmp_path, codegen_dir, llama_dir):
    with pytest.raises(ValueError, match="is not a LoRA adapter directory: it needs adapter_config.json"):
        apply_adapter(load_model(codegen_dir), tmp_path, codegen_dir)
    ours = add_lora(load_model(llama_dir, dtype="fp32"), rank=2, alpha=2.0, targets=["wq"])
    save_adapter(adapter_state(ours), ours.config, tmp_path / "a", rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj.lora_A.weight' is not a LoRA weight of a "
                                         "linear layer this codegen2 model can adapt"):
        apply_adapter(load_model(codegen_dir), tmp_path / "a", codegen_dir)  # a Llama adapter on CodeGen
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="only plain LoRA adapters.*'use_dora': True"):
        apply_adapter(load_model(llama_dir), tmp_path / "a", llama_dir)


def test_a_frozen_output_layer_gets_no_weight_gradient_formed():
    """LoRA freezes the output layer: the chunked loss (models/loss.py) must not form its (V, E) fp32 gradient
    (840 MB at the 7B shape), and the hidden states' gradient stays plain cross-entropy's."""
    from codegen2.models.loss import linear_cross_entropy

    torch.manual_seed(0)
    h, w, b = torch.randn(6, 8, requires_grad=True), torch.randn(300, 8), torch.randn(300)
    t = torch.randint(0, 300, (6,))
    loss = linear_cross_entropy(h, w, b, t)
    assert [tuple(x.shape) for x in loss.grad_fn.saved_tensors if x is not None] == [(6, 8)]
    loss.backward()
    h2 = h.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(torch.nn.functional.linear(h2, w, b), t, reduction="sum").backward()
    assert (h.grad - h2.grad).abs().max() < 1e-5
    trained = linear_cross_entropy(h, w.requires_grad_(True), b, t)  # a trained one: its gradient is formed
    assert [tuple(x.shape) for x in trained.grad_fn.saved_tensors if x is not None] == [(6, 8), (300, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_linear_is_the_linear_with_autograd_gradients(dtype):
    """FrozenLinear: the same forward as nn.Linear, the input gradient of torch's autograd (by another route)."""
    torch.manual_seed(0)
    linear = nn.Linear(48, 40).to(dtype).requires_grad_(False)
    frozen = FrozenLinear(linear)
    x = torch.randn(3, 5, 48, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = frozen(x), linear(x2)
    tol = 1e-5 if dtype == torch.float32 else 0.05  # bf16: the bias is added apart, rounded once more
    assert (y - y2).abs().max() < tol
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert x.grad.dtype == dtype and (x.grad - x2.grad).abs().max() < tol
    assert not frozen.weight.requires_grad and frozen.weight.grad is None


def test_int8_base_gradients_match_its_dequantized_weights():
    """int8 FrozenLinear's forward and input gradient against a plain fp32 Linear holding q * scale, by autograd."""
    torch.manual_seed(0)
    linear = nn.Linear(48, 40)
    q8 = FrozenLinear(linear, "int8")
    assert q8.weight.dtype == torch.int8 and q8.state_dict().keys() == {"bias"}
    plain = nn.Linear(48, 40)
    with torch.no_grad():
        plain.weight.copy_(q8.weight.float() * q8.scale[:, None])
        plain.bias.copy_(linear.bias)
    assert (plain.weight - linear.weight).abs().max() <= q8.scale.max() / 2 + 1e-7
    x = torch.randn(3, 5, 48, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = q8(x), plain(x2)
    assert (y - y2).abs().max() < 1e-5
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert (x.grad - x2.grad).abs().max() < 1e-5


def test_int8_base_trains_the_adapters_like_its_dequantized_fp32_base(codegen_dir):
    """prepare_lora(quant=int8): the adapters' gradients equal those over an fp32 base with the same (dequantized)
    weights; nothing in the base gets a gradient or a state-dict entry."""
    torch.manual_seed(3)
    q8 = prepare_lora(load_model(codegen_dir), 2, 4.0, None, "int8", torch.float32).train()
    ref = load_model(codegen_dir, dtype="fp32")
    for name, m in q8.named_modules():
        if isinstance(m, FrozenLinear):
            target = ref.get_submodule(name.removesuffix(".base"))
            target.weight = nn.Parameter(m.weight.float() * m.scale[:, None])
    torch.manual_seed(3)
    ref = prepare_lora(ref, 2, 4.0, None, "none", torch.float32).train()
    randomize_adapters(q8)
    randomize_adapters(ref)
    targets = IDS.roll(-1, dims=1)
    for model in (q8, ref):
        model(IDS, targets=targets).backward()
    grads = {n: p.grad for n, p in q8.named_parameters() if p.requires_grad}
    assert grads.keys() == {n for n, p in ref.named_parameters() if p.requires_grad} and len(grads) == 16
    assert all(n.endswith(("lora_A", "lora_B")) for n in grads)
    ref_grads = dict(ref.named_parameters())
    assert max((grads[n] - ref_grads[n].grad).abs().max() / ref_grads[n].grad.abs().max() for n in grads) < 1e-4
    assert set(q8.state_dict()) - set(adapter_state(q8)) <= {n for n, _ in q8.named_parameters()}  # no int8 buffers


def test_engine_and_cli_take_an_adapter_without_merging(tmp_path, codegen_dir, capsys):
    from codegen2.__main__ import main
    from codegen2.engine.engine import Engine
    from codegen2.kernels import DecodeLinear

    torch.manual_seed(2)
    ours = add_lora(load_model(codegen_dir, dtype="fp32"), rank=4, alpha=8.0)
    randomize_adapters(ours)
    save_adapter(adapter_state(ours), ours.config, tmp_path / "adapter", rank=4, alpha=8.0)
    save_model(merge_adapters(load_model(codegen_dir, dtype="fp32"), adapter_state(ours), 2.0), tmp_path / "merged",
               tokenizer_dir=codegen_dir)
    engine = Engine.from_pretrained(codegen_dir, dtype="fp32", adapter=tmp_path / "adapter")
    assert isinstance(engine.model.layers[0].attention.wqkv, LoRALinear)
    with torch.no_grad():
        assert (engine.model(IDS) - ours(IDS)).abs().max() < 1e-5
    int8 = Engine.from_pretrained(codegen_dir, dtype="bf16", quant="int8", adapter=tmp_path / "adapter")
    wqkv = int8.model.layers[0].attention.wqkv
    assert isinstance(wqkv, LoRALinear) and isinstance(wqkv.base, DecodeLinear) and wqkv.lora_A.dtype == torch.float32

    outputs = []
    for model, adapter in ((codegen_dir, ["--adapter", str(tmp_path / "adapter")]), (tmp_path / "merged", [])):
        main(["complete", "--model", str(model), *adapter, "--dtype", "fp32", "--max-tokens", "12", "def add(a, b):"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0]) > 1
    with pytest.raises(SystemExit, match="error: .*nope is not a LoRA adapter directory"):
        main(["infill", "--model", str(codegen_dir), "--adapter", str(tmp_path / "nope"), "--prefix", "x"])
