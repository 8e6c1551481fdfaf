"""Hugging Face <-> codegen2: config fields, tensor names and CodeGen2's fused qkv layout, in one place.

Every checkpoint quirk is fixed here, once, so the model files stay pure math:

- Hugging Face's config fields (``n_layer``, ``n_embd``, ``hidden_size``, ...) and tensor names become our one
  vocabulary (``n_layers``, ``dim``, ``layers.{i}.attention.wqkv``, ...) here and nowhere else.
- CodeGen2's ``qkv_proj.weight`` (3E, E) is stored shard-major: rows ordered (shard m < mp_num, part in q, v, k,
  row < E / mp_num), i.e. ``W.view(mp, 3, E / mp, E)[:, 0]`` are the query rows, ``[:, 1]`` the value rows and
  ``[:, 2]`` the key rows, each head-major once the shards are concatenated. We turn it into plain head-major
  ``[q; k; v]`` rows, and back on export.
- ``mp_num`` is 8 for the 1B / 3.7B checkpoints (their remote ``modeling_codegen.py`` hard-codes it; a wrong
  split scrambles q, k and v) and 4 for 7B / 16B and for transformers' built-in CodeGen. Only the 1B / 3.7B
  config.json files carry a ``head_dim`` key, so that key decides (as CTranslate2 does); checkpoints we export
  carry an explicit ``codegen2_qkv_mp_num``; a caller may override both.
- Buffers that are not weights (``attn.causal_mask``, ``attn.masked_bias``, ``rotary_emb.inv_freq``) are dropped.
- The official CodeGen2 configs set ``eos_token_id = 2``, which is ``#``: exported configs name 50256
  (``<|endoftext|>``) instead, so generate() elsewhere does not stop at the first comment.

What it is not: file reading or writing; ``checkpoint.py`` does that.
"""

from __future__ import annotations

import re

import torch

from codegen2.models import ModelConfig
from codegen2.models.codegen2 import CodeGen2Config
from codegen2.models.llama import LlamaConfig

IGNORED = re.compile(r".*(attn\.causal_mask|attn\.masked_bias|attn\.bias|rotary_emb\.inv_freq)$")


class ConfigError(ValueError):
    pass


# --- configs -------------------------------------------------------------------------------------------------

def _need(hf: dict, key: str, source: str):
    if key not in hf or hf[key] is None:
        raise ConfigError(f"{source}: config is missing the field '{key}'")
    return hf[key]


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Our config from a Hugging Face config.json dict; ``source`` names the file in errors."""
    model_type = hf.get("model_type")
    if model_type == "codegen":
        return CodeGen2Config(
            n_layers=_need(hf, "n_layer", source), dim=_need(hf, "n_embd", source),
            n_heads=_need(hf, "n_head", source), rotary_dim=_need(hf, "rotary_dim", source),
            intermediate_size=hf.get("n_inner"), vocab_size=_need(hf, "vocab_size", source),
            max_seq_len=_need(hf, "n_positions", source), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if model_type == "llama":
        if hf.get("rope_scaling"):
            raise ConfigError(f"{source}: rope_scaling {hf['rope_scaling']} is not supported")
        head_dim = hf.get("head_dim")
        dim, n_heads = _need(hf, "hidden_size", source), _need(hf, "num_attention_heads", source)
        if head_dim is not None and head_dim * n_heads != dim:
            raise ConfigError(f"{source}: head_dim {head_dim} * heads {n_heads} != hidden_size {dim}")
        return LlamaConfig(
            n_layers=_need(hf, "num_hidden_layers", source), dim=dim, n_heads=n_heads,
            intermediate_size=_need(hf, "intermediate_size", source), n_kv_heads=hf.get("num_key_value_heads"),
            vocab_size=_need(hf, "vocab_size", source),
            max_seq_len=_need(hf, "max_position_embeddings", source), norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta") or 10000.0,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
    raise ConfigError(f"{source}: unknown model_type {model_type!r}; codegen2 reads 'codegen' (CodeGen2) "
                      "and 'llama' (CodeGen2.5) checkpoints")


def qkv_mp_num(hf: dict, override: int | None = None) -> int:
    """The mp_num of a CodeGen2 checkpoint's fused qkv weight (see the module docstring)."""
    if override is not None:
        return override
    if "codegen2_qkv_mp_num" in hf:
        return int(hf["codegen2_qkv_mp_num"])
    return 8 if "head_dim" in hf else 4


def config_to_hf(cfg: ModelConfig) -> dict:
    """A config.json that transformers' CodeGenForCausalLM / LlamaForCausalLM load, for our exported layout."""
    if cfg.family == "codegen2":
        return {
            "architectures": ["CodeGenForCausalLM"], "model_type": "codegen",
            "n_layer": cfg.n_layers, "n_embd": cfg.dim, "n_head": cfg.n_heads, "rotary_dim": cfg.rotary_dim,
            "n_inner": cfg.intermediate_size, "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len,
            "n_ctx": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
            "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            # The configs' eos id 2 is '#'; generation must stop at <|endoftext|>.
            "bos_token_id": 50256, "eos_token_id": 50256,
            # We always export the mp_num 4 layout that transformers' built-in class reads; this key says so.
            "codegen2_qkv_mp_num": 4,
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": cfg.n_layers, "hidden_size": cfg.dim, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "hidden_act": "silu", "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 50256, "eos_token_id": 50256,
    }


# --- tensor names ----------------------------------------------------------------------------------------------

_CODEGEN2_NAMES = {
    "transformer.wte.weight": "tok_embeddings.weight",
    "transformer.ln_f.weight": "norm.weight",
    "transformer.ln_f.bias": "norm.bias",
    "lm_head.weight": "output.weight",
    "lm_head.bias": "output.bias",
    "transformer.h.{}.ln_1.weight": "layers.{}.norm.weight",
    "transformer.h.{}.ln_1.bias": "layers.{}.norm.bias",
    "transformer.h.{}.attn.qkv_proj.weight": "layers.{}.attention.wqkv.weight",
    "transformer.h.{}.attn.out_proj.weight": "layers.{}.attention.wo.weight",
    "transformer.h.{}.mlp.fc_in.weight": "layers.{}.feed_forward.w1.weight",
    "transformer.h.{}.mlp.fc_in.bias": "layers.{}.feed_forward.w1.bias",
    "transformer.h.{}.mlp.fc_out.weight": "layers.{}.feed_forward.w2.weight",
    "transformer.h.{}.mlp.fc_out.bias": "layers.{}.feed_forward.w2.bias",
}

_LLAMA_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
}


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """Every Hugging Face tensor name the checkpoint must hold -> our parameter name."""
    table = {"codegen2": _CODEGEN2_NAMES, "llama": _LLAMA_NAMES}[cfg.family]
    out = {}
    for hf, ours in table.items():
        if "{}" in hf:
            out.update({hf.format(i): ours.format(i) for i in range(cfg.n_layers)})
        else:
            out[hf] = ours
    if cfg.tie_word_embeddings:
        del out["lm_head.weight"]  # tied: the output shares the embedding (CodeGen2 keeps lm_head.bias)
    return out


# --- CodeGen2's fused qkv -----------------------------------------------------------------------------------

def qkv_from_hf(w: torch.Tensor, mp_num: int) -> torch.Tensor:
    """(3E, E) rows (shard, [q, v, k], local row) -> plain [q; k; v] rows, each head-major."""
    three_e, e = w.shape
    if three_e % (3 * mp_num):
        raise ValueError(f"qkv weight of {three_e} rows cannot be split into {mp_num} shards of q, v, k")
    w4 = w.view(mp_num, 3, three_e // (3 * mp_num), e)
    q, v, k = w4[:, 0].reshape(-1, e), w4[:, 1].reshape(-1, e), w4[:, 2].reshape(-1, e)
    return torch.cat([q, k, v], dim=0)


def qkv_to_hf(w: torch.Tensor, mp_num: int = 4) -> torch.Tensor:
    """Inverse of qkv_from_hf: plain [q; k; v] rows -> shard-major (shard, [q, v, k], local row)."""
    three_e, e = w.shape
    q, k, v = w.view(3, mp_num, three_e // (3 * mp_num), e).unbind(0)  # each (mp, E/mp, E)
    return torch.stack([q, v, k], dim=1).reshape(three_e, e)


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> Hugging Face names and layout (CodeGen2 qkv in the mp_num 4 layout)."""
    inverse = {ours: hf for hf, ours in name_map(cfg).items()}
    out = {}
    for ours, hf in inverse.items():
        t = state[ours]
        if ours.endswith("attention.wqkv.weight"):
            t = qkv_to_hf(t, 4)
        out[hf] = t.contiguous()
    return out
