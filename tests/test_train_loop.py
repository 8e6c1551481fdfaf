"""codegen2 train: config, schedule, exact resume after SIGKILL, 2 processes == 1, export, fine-tuning."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codegen2.train.config import OptimSection, load_config
from codegen2.train.data import build_corpus
from codegen2.train.loop import lr_at

MIT = "MIT License\n\nPermission is hereby granted, free of charge, to any person obtaining a copy of this software " \
      "and associated documentation files (the \"Software\"), to deal in the Software without restriction...\n" \
      "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND.\n"


def write_tree(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "LICENSE").write_text(MIT)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def small_files(n: int) -> dict[str, str]:
    """Distinct little Python modules (distinct enough that near-dedup keeps them all)."""
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda_", "zeta"]
    files = {}
    for i in range(n):
        a, b = words[i % 10], words[(i * 7 + 3) % 10]
        files[f"mod_{i}.py"] = (f'"""Module {i}: {a} and {b} number {i * 37 % 101}."""\n\n\n'
                                f"def {a}_{i}(x, y={i}):\n    total = x * {i % 9 + 2} + y\n"
                                f"    for k in range({i % 5 + 1}):\n        total += k * {b!r}.count('a')\n"
                                f"    return total - {i * 13 % 17}\n\n\nclass {b.title()}{i}:\n"
                                f"    value = {i * 3}\n\n    def get(self):\n        return self.value + {i}\n")
    return files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("corpus")
    src = write_tree(base / "src", small_files(40))
    out = base / "tokens"
    build_corpus([src], out, val_fraction=0.1, workers=1, progress=False)
    return out


TINY = {"n_layers": 2, "dim": 32, "n_heads": 4, "rotary_dim": 4, "max_seq_len": 256}


def write_config(path: Path, corpus: Path, out: Path, lora_base: Path | None = None, **sections) -> Path:
    """The tiny run used throughout; with lora_base, LoRA (rank 4) on that checkpoint instead of a new model."""
    model = ['family = "codegen2"', "shape = { " + ", ".join(f"{k} = {v}" for k, v in TINY.items()) + " }"]
    if lora_base is not None:
        model = [f'init_from = "{lora_base}"', "[lora]", "rank = 4", "alpha = 8.0"]
    lines = ["[model]", *model,
             "[data]", f'corpus = "{corpus}"', "seq_len = 128",
             "[optim]", "lr = 3e-3", "warmup_steps = 2", "max_steps = 8", "batch_size = 4", "micro_batch_size = 2",
             "[run]", f'out_dir = "{out}"', "log_every = 1", "eval_every = 4", "eval_rows = 4", "infill_examples = 2",
             "checkpoint_every = 1", "keep_checkpoints = 2", 'export_dtype = "fp32"']
    for section, values in sections.items():
        lines += [f"[{section}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_train(*args: str, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    # No time limit: how long a run takes depends on how loaded the machine is, never on whether it is right.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "codegen2.train", *args], env=env, capture_output=True, text=True,
                          check=False, **kw)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    if (out / "adapter").is_dir():  # a LoRA run
        return load_file(str(out / "adapter" / "adapter_model.safetensors"))
    return load_file(str(out / "model" / "model.safetensors"))


# --- config ---


def test_config_file_overrides_and_errors(tmp_path, corpus):
    path = write_config(tmp_path / "c.toml", corpus, tmp_path / "run")
    cfg = load_config(path, ["optim.lr=1e-2", "run.out_dir=123", "model.shape.n_layers=3", "objective.causal_prob=1"])
    assert cfg.optim.lr == 1e-2 and cfg.run.out_dir == "123" and cfg.model.shape["n_layers"] == 3
    assert cfg.objective.causal_prob == 1.0 and cfg.data.seq_len == 128
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("optim:\n  lr: 0.5\n  max_steps: 3\n")
    assert load_config(yaml_path).optim.max_steps == 3
    with pytest.raises(ValueError, match="unknown setting optim.learning_rate"):
        load_config(path, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="optim.max_steps must be int"):
        load_config(path, ["optim.max_steps=many"])
    with pytest.raises(ValueError, match="not of the form"):
        load_config(path, ["lr=1"])
    with pytest.raises(ValueError, match="unknown config section"):
        load_config(path, ["optimizer.lr=1"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_lr_schedule_hand_computed():
    o = OptimSection(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    assert [lr_at(s, o) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, o) == 1.0
    assert lr_at(9, o) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, o) == pytest.approx(0.1) and lr_at(100, o) == pytest.approx(0.1)


def test_bad_run_settings_are_refused(tmp_path, corpus):
    path = write_config(tmp_path / "c.toml", corpus, tmp_path / "run")
    r = run_train("--config", str(path), "optim.batch_size=3")
    assert r.returncode != 0 and "must be a multiple" in r.stderr
    r = run_train("--config", str(path), "data.seq_len=4096")
    assert r.returncode != 0 and "more than the model's 256 positions" in r.stderr
    r = run_train("--config", str(path), "data.corpus=/nonexistent/corpus")
    assert r.returncode != 0 and "/nonexistent/corpus" in r.stderr


# --- exact resume, checkpoints, export ---


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, corpus, codegen_dir, kind):
    lora_base = codegen_dir if kind == "lora" else None
    ref = tmp_path / "ref"
    r = run_train("--config", str(write_config(tmp_path / "ref.toml", corpus, ref, lora_base)))
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed"
    cfg = write_config(tmp_path / "killed.toml", corpus, killed, lora_base)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "codegen2.train", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it somewhere after step 3 was logged, mid-run
        m = killed / "metrics.jsonl"
        if m.is_file() and any(json.loads(x).get("step", 0) >= 3 for x in m.read_text().splitlines()):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = max(json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines())
    assert steps_done < 8, "the run finished before it could be killed"
    assert not (killed / "model").exists() and not (killed / "adapter").exists()
    r = run_train("--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    a, b = final_weights(ref), final_weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda out: [(m["step"], m["loss"]) for m in metrics(out) if "loss" in m]
    assert losses(ref) == losses(killed) and len(losses(ref)) == 8
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_00000007.pt", "step_00000008.pt"]
    assert (ref / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if kind == "lora":  # the checkpoints hold the adapters (2 layers x 4 linears x A, B) and nothing else
        state = torch.load(killed / "checkpoints" / "step_00000008.pt", weights_only=True)
        assert len(state["model"]) == 16 and all(k.endswith((".lora_A", ".lora_B")) for k in state["model"])
        assert len(state["optimizer"]["state"]) == 16 and len(a) == 16


def test_export_loads_in_codegen2_and_transformers(tmp_path, corpus):
    from transformers import CodeGenForCausalLM

    from codegen2.models.checkpoint import load_model
    from codegen2.tokenizer import load_tokenizer

    out = tmp_path / "run"
    r = run_train("--config", str(write_config(tmp_path / "c.toml", corpus, out)), "optim.max_steps=2")
    assert r.returncode == 0, r.stderr
    ours = load_model(out / "model", dtype="fp32")
    hf = CodeGenForCausalLM.from_pretrained(out / "model").eval()
    ids = torch.tensor([load_tokenizer(out / "model").encode("def hello(name):\n    return name\n")])
    assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4
    # The final checkpoint holds the same weights as the export.
    ckpt = torch.load(out / "checkpoints" / "step_00000002.pt", weights_only=True)["model"]
    assert torch.equal(ckpt["layers.1.feed_forward.w2.weight"], ours.layers[1].feed_forward.w2.weight)


@pytest.mark.slow
def test_tied_model_with_row_workers_trains_and_exports(tmp_path, corpus):
    # The codegen2-mini layout: output layer tied to the embedding. Rows made by 2 worker processes give the
    # in-process run's losses; the export has no lm_head.weight and loads in codegen2 and transformers alike.
    from transformers import CodeGenForCausalLM

    from codegen2.models.checkpoint import load_model
    from codegen2.train.loop import Trainer

    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        path = write_config(tmp_path / f"w{workers}.toml", corpus, out)
        r = run_train("--config", str(path), "optim.max_steps=4", f"run.data_workers={workers}",
                      "model.shape.tie_word_embeddings=true")
        assert r.returncode == 0, r.stderr
        runs[workers] = [m["loss"] for m in metrics(out) if "loss" in m]
    assert len(runs[0]) == 4 and runs[0] == runs[2]
    export = tmp_path / "w2" / "model"
    stored = load_file(str(export / "model.safetensors"))
    assert "lm_head.weight" not in stored and "lm_head.bias" in stored
    ours = load_model(export, dtype="fp32")
    assert ours.output.weight is ours.tok_embeddings.weight
    hf = CodeGenForCausalLM.from_pretrained(export).eval()
    ids = torch.tensor([[5, 77, 1000, 50256, 42]])
    assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4
    # MFU counts the tied output layer's matrix product, which is real work: 2 blocks + 32 x 51,200.
    t = Trainer(load_config(tmp_path / "w0.toml", ["model.shape.tie_word_embeddings=true"]))
    E, V = 32, 51200
    block = 3 * E * E + E * E + 2 * 4 * E * E + 4 * E + E + 2 * E  # wqkv, wo, w1, w2, their biases, norm
    assert t.n_matmul == 2 * block + 2 * E + E * V + V  # + final norm, output weight and bias


@pytest.mark.slow
def test_activation_checkpointing_and_compile_keep_the_trajectory(tmp_path, corpus):
    # Recomputing each block's activations in the backward pass is the same arithmetic: identical losses and
    # weights. Compiled blocks (inductor's fused kernels) round differently: losses and weights within 1e-4.
    runs = {}
    for name, extra in (("plain", []), ("ckpt", ["run.activation_checkpointing=true"]),
                        ("compiled", ["run.compile=true"])):
        out = tmp_path / name
        r = run_train("--config", str(write_config(tmp_path / f"{name}.toml", corpus, out)), "optim.max_steps=4",
                      "run.eval_every=0", *extra)
        assert r.returncode == 0, r.stderr
        runs[name] = ([m["loss"] for m in metrics(out)], final_weights(out))
    (plain, w_plain), (ckpt, w_ckpt), (compiled, w_compiled) = runs["plain"], runs["ckpt"], runs["compiled"]
    assert len(plain) == 4 and plain == ckpt
    assert all(torch.equal(w_plain[k], w_ckpt[k]) for k in w_plain)
    assert max(abs(a - b) for a, b in zip(plain, compiled)) < 1e-4
    assert all((w_plain[k] - w_compiled[k]).abs().max() < 1e-4 for k in w_plain)


def test_evaluation_does_not_depend_on_the_training_dtype(tmp_path, corpus, monkeypatch):
    # Greedy infill evaluation runs in fp32 whatever the training autocast: the explicit-mask attention keeps
    # fp32 scores by design (under CUDA bf16 autocast its masking overflowed; on CPU it silently rounded).
    from codegen2.train import evaluate, loop

    path = write_config(tmp_path / "c.toml", corpus, tmp_path / "run")
    generated = {}
    real = evaluate.greedy
    for dtype in ("fp32", "bf16"):
        t = loop.Trainer(load_config(path, [f"run.dtype={dtype}", "run.infill_examples=4"]))
        calls = []
        monkeypatch.setattr(evaluate, "greedy", lambda *a, calls=calls, **k: calls.append(real(*a, **k)) or calls[-1])
        evaluate.infill_exact_match(t, max_new=24)
        generated[dtype] = calls[0]
    assert len(generated["fp32"]) == 4 and generated["fp32"] == generated["bf16"]


# --- distributed ---


@pytest.mark.slow
def test_two_gloo_processes_follow_one_process(tmp_path, corpus):
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["optim.max_steps=5", "run.eval_every=0", "run.checkpoint_every=100"]
    r = run_train("--config", str(write_config(tmp_path / "one.toml", corpus, one)), *extra)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous (port 0 is not accepted by torchrun)
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        port, "-m", "codegen2.train", "--config", str(write_config(tmp_path / "two.toml", corpus, two)),
                        *extra], env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 x cpu" in r.stdout
    a, b = [m["loss"] for m in metrics(one)], [m["loss"] for m in metrics(two)]
    assert len(a) == len(b) == 5 and a[0] > a[-1]
    # Same global batch, loss normalised by the global token count: only summation order differs.
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    wa, wb = final_weights(one), final_weights(two)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


# --- fine-tuning ---


@pytest.fixture(scope="module")
def corpus25(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("corpus25")
    out = base / "tokens"
    build_corpus([write_tree(base / "src", small_files(40))], out, val_fraction=0.1, workers=1, progress=False,
                 tokenizer_kind="codegen25")
    return out


def finetune_config(path: Path, source: Path, corpus: Path, out: Path) -> Path:
    path.write_text(f'[model]\ninit_from = "{source}"\n[data]\ncorpus = "{corpus}"\nseq_len = 128\n'
                    f'[optim]\nmax_steps = 2\nbatch_size = 4\nmicro_batch_size = 4\nwarmup_steps = 1\n'
                    f'[run]\nout_dir = "{out}"\neval_every = 0\nlog_every = 1\nexport_dtype = "fp32"\n')
    return path


@pytest.mark.parametrize("family", ["codegen", "llama"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_finetune_starts_from_the_checkpoint(tmp_path, corpus, corpus25, family, kind, codegen_dir, llama_dir):
    """The first logged loss equals transformers' loss of the same checkpoint on the same first batch (with LoRA
    too: its B starts at zero), and the export of the fine-tuned model loads in transformers as the same
    architecture. LoRA: the merged export is the base plus scale * B A in Hugging Face's own layout, everything
    else untouched, and has the logits of transformers + peft loading the adapter, and of codegen2 with it."""
    from transformers import AutoModelForCausalLM

    from codegen2.tokenizer import load_tokenizer
    from codegen2.train.corpus import TokenCorpus
    from codegen2.train.objective import RowStream

    source, data = (codegen_dir, corpus) if family == "codegen" else (llama_dir, corpus25)
    out = tmp_path / "ft"
    path = finetune_config(tmp_path / "ft.toml", source, data, out)
    lora = ["lora.rank=4", "lora.alpha=8", "lora.merge=true", "optim.lr=1e-2"] if kind == "lora" else []
    r = run_train("--config", str(path), *lora)
    assert r.returncode == 0, r.stderr
    cfg = load_config(path)
    tok = load_tokenizer(source)
    rows, valid = RowStream(TokenCorpus(data, "train"), tok, cfg.objective, 128, cfg.run.seed).next_rows(4)
    hf = AutoModelForCausalLM.from_pretrained(source).float().eval()
    with torch.no_grad():
        logits = hf(rows[:, :-1]).logits
    targets = rows[:, 1:].masked_fill(~valid[:, 1:], -100)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert metrics(out)[0]["loss"] == pytest.approx(expected.item(), rel=1e-4)
    tuned = AutoModelForCausalLM.from_pretrained(out / "model")
    assert type(tuned) is type(hf)
    if kind == "full":
        assert not torch.equal(tuned.lm_head.weight, hf.lm_head.weight)  # it trained
        return
    from peft import PeftModel

    from codegen2.models.checkpoint import load_model
    from codegen2.models.lora import apply_adapter

    base, merged = load_file(str(source / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    adapter = final_weights(out)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert len(adapter) == 2 * len(changed) == {"codegen": 16, "llama": 28}[family]
    for key in changed:  # every adapted weight, and only those
        prefix = "base_model.model." + key.removesuffix(".weight")
        delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
        assert (merged[key] - base[key] - 2.0 * delta).abs().max() < 1e-6 and delta.abs().max() > 1e-4, key
    ids = rows[:2, :40]
    with torch.no_grad():
        ours = apply_adapter(load_model(source, dtype="fp32"), out / "adapter", source)(ids)
        assert (PeftModel.from_pretrained(hf, out / "adapter")(ids).logits - ours).abs().max() < 1e-4
        assert (tuned.eval()(ids).logits - ours).abs().max() < 1e-4


def test_finetune_refuses_a_corpus_of_the_other_tokenizer(tmp_path, corpus, llama_dir):
    r = run_train("--config", str(finetune_config(tmp_path / "ft.toml", llama_dir, corpus, tmp_path / "ft")))
    assert r.returncode != 0 and "tokenized with the codegen2 tokenizer but this model uses codegen25" in r.stderr


# --- a real learning check ---

BODIES = {"square": "    return x * x", "double": "    return x + x", "negate": "    return -x"}
WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "ember", "frost", "cedar", "lotus", "amber"]


def pattern_names() -> tuple[list[str], list[str]]:
    """(training names, held-out names): ordered word pairs, 6 of the 132 never appear in the corpus."""
    import itertools
    import random

    names = [f"{a}_{b}" for a, b in itertools.permutations(WORDS, 2)]
    random.Random(0).shuffle(names)
    return names[6:], names[:6]


LEARN_CONFIG = """[data]\ncorpus = "{corpus}"\nseq_len = 64\n[objective]\ncausal_prob = 0.2\nmax_spans = 1\n
[optim]\nlr = {lr}\nmin_lr = {min_lr}\nwarmup_steps = 20\nmax_steps = {steps}\nbatch_size = 16\nmicro_batch_size = 16
weight_decay = 0.0\n[run]\nout_dir = "{out}"\nlog_every = 50\neval_every = {eval_every}\neval_rows = 16
infill_examples = 8\ncheckpoint_every = 1000\nexport_dtype = "fp32"\n"""


def pattern_corpus(root: Path, kinds: dict[str, str]) -> tuple[Path, str]:
    """A corpus of ``def {kind}_{name}(x):`` + its body for every training name; (its directory, its text)."""
    files = {f"{k}_{n}.py": f"def {k}_{n}(x):\n{body}\n" for k, body in kinds.items() for n in pattern_names()[0]}
    src = write_tree(root / "src", files)
    # The files differ only in their names, so near-duplicate removal must not merge them.
    build_corpus([src], root / "tokens", val_fraction=0.05, workers=1, progress=False, near_dup_threshold=0.99)
    return root / "tokens", "".join(files.values())


def infill_bodies(kinds: dict[str, str], loose: bool = False, **model) -> tuple[list[bool], list[str]]:
    """Greedy infills of the body of ``def {kind}_{name}(x):`` for the held-out names, through the engine
    (Engine.from_pretrained: ``model=`` and maybe ``adapter=``): (right or not, the texts), name-major. Right:
    exactly the body, or with ``loose`` the body give or take line breaks around it (the hole sits between two
    lines, so ``"\n    return -x"`` makes the same program)."""
    from codegen2.engine.engine import Engine
    from codegen2.engine.sampling import SamplingParams
    from codegen2.infill import Infill

    engine = Engine.from_pretrained(dtype="fp32", max_batch=8, **model)
    cases = [(Infill(f"def {k}_{n}(x):\n", "\n"), body) for n in pattern_names()[1] for k, body in kinds.items()]
    texts = [o.outputs[0].text for o in engine.generate([c for c, _ in cases], SamplingParams(max_tokens=16))]
    return [(text.strip("\n") if loose else text) == want for (_, want), text in zip(cases, texts)], texts


@pytest.fixture(scope="module")
def pattern_model(tmp_path_factory) -> tuple[Path, str]:
    """About three minutes of CPU training from scratch on 378 one-function files, ``def {kind}_{name}(x):`` +
    the body its kind calls for (square, double, negate), 400 steps: (the run directory, the corpus text)."""
    root = tmp_path_factory.mktemp("pattern")
    corpus_dir, text = pattern_corpus(root, BODIES)
    path = root / "c.toml"
    path.write_text("[model]\nshape = { n_layers = 2, dim = 64, n_heads = 2, rotary_dim = 32, max_seq_len = 128 }\n"
                    + LEARN_CONFIG.format(corpus=corpus_dir, lr=1e-2, min_lr=1e-3, steps=400, out=root / "run",
                                          eval_every=200))
    r = run_train("--config", str(path), env_extra={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    return root / "run", text


@pytest.mark.slow
def test_tiny_model_learns_a_pattern_and_infills_held_out_instances(pattern_model):
    """Trained from scratch (pattern_model), the validation loss falls from the uniform ln(51200) = 10.8 to a
    small fraction of it, and then the model infills the body of functions whose names it has never seen,
    through the engine, in the infill format. The kind is in the name, so a model that learned it starts each body
    the way that kind's body starts; one that did not would pick a kind by chance (6 of 18).

    Measured with this seed, training in fp32 on two CPUs (torch's kernels round differently with AVX2 and with
    AVX-512, so the trajectories part): AMD Zen 3 (AVX2): validation loss 10.81 -> 0.72 -> 0.65 and 12 of the 18
    held-out bodies exactly right (6 of 18 with run.seed = 1). Intel Xeon with AVX-512 / AMX: 10.85 -> 0.72 ->
    0.65, all 18 bodies begin as their kind's does, but only 2 are exactly right (4 give or take line breaks):
    the others stop one token short (``return x +``) or put the line break on the wrong side of the hole. So the
    test asks for the kind on 12 of 18 and a few whole bodies, which both CPUs' models meet."""
    out, corpus_text = pattern_model
    val = [m["val_loss"] for m in metrics(out) if "val_loss" in m]
    assert len(val) == 3 and val[0] > 10.0
    assert val[2] < val[1] < val[0] and val[2] < 0.1 * val[0], val
    assert not any(n in corpus_text for n in pattern_names()[1])  # truly unseen
    exact, texts = infill_bodies(BODIES, loose=True, model=out / "model")
    # What tells the kinds apart: "    return x *" (square), "    return x +" (double), "    return -" (negate).
    starts = {"    return x * x": "    return x *", "    return x + x": "    return x +",
              "    return -x": "    return -"}
    wants = [body for _ in pattern_names()[1] for body in BODIES.values()]  # infill_bodies' order
    right_kind = [t.strip("\n").startswith(starts[body]) and body.startswith(t.strip("\n"))
                  for body, t in zip(wants, texts)]
    assert sum(right_kind) >= 12 and sum(exact) >= 3, texts


@pytest.mark.slow
def test_lora_learns_a_new_kind_about_as_well_as_full_finetuning(pattern_model, tmp_path):
    """The pattern model as a pre-trained base (model.init_from), fine-tuned on a corpus that adds a fourth kind
    it has never seen (triple: ``return x + x + x``), once in full and once with LoRA (rank 8, alpha 16, every
    block linear; base, embeddings and output layer frozen); each then infills the held-out functions of all
    four kinds (LoRA: the base with ``adapter=``, unmerged). Measured: base 16 of 24 right (0 of the 6 triples);
    full (lr 3e-3, 150 steps) 24 of 24; LoRA (lr 1e-2, 600 steps: LoRA learns more slowly per step) 21 of 24
    with 6 of 6 triples. A LoRA step here is only ~13% cheaper (1,830 against 1,600 tokens/s), as the frozen
    output layer's forward pass dominates. Also measured: LoRA at 150 steps (lr 3e-2) 11 of 24 (1 triple), rank
    32 at 300 steps 18 of 24 (4 triples); lr 1e-1 diverges. The margin, 4 of 24, is the measured gap of 3 plus
    one body of room for another CPU's rounding. On an AMD Zen 5 (AVX-512; fp32 training rounds differently, so
    the trajectories part) the same seeds give base 9 of 24, full 22 (4 of 6 triples), LoRA 21 (3 of 6; the
    misses stop one token short, ``return x + x + ``): so LoRA must write at least half the triples and at most
    one fewer than full fine-tuning."""
    base = pattern_model[0] / "model"
    kinds = {**BODIES, "triple": "    return x + x + x"}
    corpus_dir, _ = pattern_corpus(tmp_path, kinds)
    runs = {}
    for kind, lr, steps, lora in (("full", 3e-3, 150, ""), ("lora", 1e-2, 600, "[lora]\nrank = 8\nalpha = 16.0\n")):
        path = tmp_path / f"{kind}.toml"
        path.write_text(f'[model]\ninit_from = "{base}"\n{lora}' + LEARN_CONFIG.format(
            corpus=corpus_dir, lr=lr, min_lr=lr / 10, steps=steps, out=tmp_path / kind, eval_every=0))
        r = run_train("--config", str(path), env_extra={"OMP_NUM_THREADS": "2"})
        assert r.returncode == 0, r.stderr
        runs[kind] = tmp_path / kind
    scores = {"base": infill_bodies(kinds, True, model=base),
              "full": infill_bodies(kinds, True, model=runs["full"] / "model"),
              "lora": infill_bodies(kinds, True, model=base, adapter=runs["lora"] / "adapter")}
    right = {k: sum(v[0]) for k, v in scores.items()}
    new = {k: sum(v[0][3::4]) for k, v in scores.items()}  # the kind only the fine-tuning corpus has
    assert new["base"] == 0, (right, new, scores)  # the base never writes the new kind's body
    assert new["full"] >= 4 and right["full"] >= 18, (right, new, scores)
    assert new["lora"] >= max(3, new["full"] - 1) and right["lora"] >= right["full"] - 4, (right, new, scores)
