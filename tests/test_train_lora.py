"""codegen2 train with LoRA: a frozen int8 base trained in bf16 on CPU resumes exactly, bad LoRA settings are
refused with their names, and (slow) LoRA on a pre-trained tiny base learns a new pattern as well as a full
fine-tune. Exact resume after SIGKILL and the exports against transformers + peft are in test_train_loop.py."""

from __future__ import annotations

import pytest
import torch

from codegen2.train.config import load_config
from codegen2.train.data import build_corpus
from test_train_loop import (  # noqa: F401  (corpus: a fixture)
    BODIES,
    corpus,
    final_weights,
    metrics,
    pattern_names,
    run_train,
    write_config,
    write_tree,
)


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


@pytest.mark.slow
def test_lora_on_a_pretrained_base_learns_as_well_as_full_finetuning(tmp_path):
    """A tiny model is pre-trained from scratch on functions of two kinds (square, double) for 300 steps; then
    both a full fine-tune and LoRA (rank 8 on every block linear, base frozen) train 150 steps on a corpus that
    adds a third kind (negate), and infill the bodies of held-out functions of all three kinds, names never
    seen, through the engine (LoRA: the base plus ``adapter=``, unmerged). Measured: see the assertion."""
    from codegen2.engine.engine import Engine
    from codegen2.engine.sampling import SamplingParams
    from codegen2.infill import Infill

    train_names, held_out = pattern_names()
    def corpus_of(kinds: list[str], name: str):
        files = {f"{k}_{n}.py": f"def {k}_{n}(x):\n{BODIES[k]}\n" for k in kinds for n in train_names}
        src = write_tree(tmp_path / f"src_{name}", files)
        build_corpus([src], tmp_path / name, val_fraction=0.05, workers=1, progress=False, near_dup_threshold=0.99)
        return tmp_path / name

    def config(name: str, corpus_dir, model: str, steps: int, lr: float, extra: str = "") -> str:
        path = tmp_path / f"{name}.toml"
        path.write_text(f'[model]\n{model}\n{extra}[data]\ncorpus = "{corpus_dir}"\nseq_len = 64\n'
                        f'[objective]\ncausal_prob = 0.2\nmax_spans = 1\n'
                        f'[optim]\nlr = {lr}\nmin_lr = {lr / 10}\nwarmup_steps = 20\nmax_steps = {steps}\n'
                        f'batch_size = 16\nmicro_batch_size = 16\nweight_decay = 0.0\n'
                        f'[run]\nout_dir = "{tmp_path / name}"\nlog_every = 50\neval_every = 0\n'
                        f'checkpoint_every = 1000\nexport_dtype = "fp32"\n')
        r = run_train("--config", str(path), env_extra={"OMP_NUM_THREADS": "2"})
        assert r.returncode == 0, r.stderr
        return tmp_path / name

    shape = "shape = { n_layers = 2, dim = 64, n_heads = 2, rotary_dim = 32, max_seq_len = 128 }"
    base = config("base", corpus_of(["square", "double"], "two"), shape, 300, 1e-2) / "model"
    three = corpus_of(list(BODIES), "three")
    full = config("full", three, f'init_from = "{base}"', 150, 3e-3)
    lora = config("lora", three, f'init_from = "{base}"', 150, 1e-2, "[lora]\nrank = 8\nalpha = 16.0\n")

    cases = [(Infill(f"def {k}_{n}(x):\n", "\n"), body) for n in held_out for k, body in BODIES.items()]
    def exact(**model) -> list[bool]:
        engine = Engine.from_pretrained(dtype="fp32", max_batch=8, **model)
        results = engine.generate([c for c, _ in cases], SamplingParams(max_tokens=16))
        return [o.outputs[0].text == want for (_, want), o in zip(cases, results)]

    scores = {"base": exact(model=base), "full": exact(model=full / "model"),
              "lora": exact(model=base, adapter=lora / "adapter")}
    negate = {k: sum(v[2::3]) for k, v in scores.items()}  # the kind only the fine-tuning corpus has
    totals = {k: sum(v) for k, v in scores.items()}
    assert negate["base"] == 0, (totals, negate)
    assert totals["full"] >= 6 and totals["lora"] >= totals["full"] - 3, (totals, negate)
