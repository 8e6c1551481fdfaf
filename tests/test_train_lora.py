"""codegen2 train with LoRA: a frozen int8 base trained in bf16 on CPU resumes exactly, and bad LoRA settings are
refused with their names. In test_train_loop.py: exact resume after SIGKILL, the exports against transformers +
peft, and LoRA's learning check against full fine-tuning."""

from __future__ import annotations

import pytest
import torch

from codegen2.train.config import load_config
from test_train_loop import corpus, final_weights, metrics, run_train, write_config  # noqa: F401 (a fixture)


def test_int8_base_in_bf16_resumes_exactly(tmp_path, corpus, codegen_dir):
    """3 steps with a checkpoint after each; then the last checkpoint and the export are deleted, as if the run
    had been killed after step 2, and the rerun continues to the same adapters and losses. (bf16 on this CPU is
    10x slower than fp32: hence small steps.)"""
    out = tmp_path / "run"
    path = write_config(tmp_path / "c.toml", corpus, out, codegen_dir)
    extra = ["lora.quant=int8", "run.dtype=bf16", "optim.max_steps=3", "optim.batch_size=2", "run.keep_checkpoints=3",
             "run.eval_every=0"]
    r = run_train("--config", str(path), *extra)
    assert r.returncode == 0, r.stderr
    assert "(LoRA rank 4 on an int8 base: 0.01M trained) on 1 x cpu (bf16)" in r.stdout
    first, losses = final_weights(out), [(m["step"], m.get("loss"), m.get("val_loss")) for m in metrics(out)]
    (out / "checkpoints" / "step_00000003.pt").unlink()
    for f in (out / "adapter").iterdir():
        f.unlink()
    r = run_train("--config", str(path), *extra)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "step_00000002.pt" in r.stdout
    again = final_weights(out)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert [(m["step"], m.get("loss"), m.get("val_loss")) for m in metrics(out)] == losses and len(losses) == 3
    assert any(first[k].abs().max() > 0 for k in first if "lora_B" in k)  # it trained


def test_bad_lora_settings(tmp_path, corpus, codegen_dir):
    from codegen2.train.loop import Trainer

    path = write_config(tmp_path / "c.toml", corpus, tmp_path / "run")  # a new model, no init_from
    with pytest.raises(ValueError, match="LoRA \\(rank >= 1\\) adapts a trained model: set model.init_from"):
        load_config(path, ["lora.rank=8"])
    with pytest.raises(ValueError, match="apply to LoRA runs: set lora.rank >= 1"):
        load_config(path, ["lora.quant=int8"])
    lora = write_config(tmp_path / "l.toml", corpus, tmp_path / "run", codegen_dir)
    with pytest.raises(ValueError, match="lora.quant must be none or int8 \\(got 'int4'\\)"):
        load_config(lora, ["lora.quant=int4"])
    with pytest.raises(ValueError, match="unknown LoRA target\\(s\\) 'q_proj': codegen2 models adapt wqkv, wo, w1, w2"):
        Trainer(load_config(lora, ['lora.targets=["wqkv", "q_proj"]']))
