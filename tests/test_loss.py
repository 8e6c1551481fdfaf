"""The chunked output-layer cross-entropy against torch's plain one: value and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codegen2.models import CodeGen2, CodeGen2Config, Llama, LlamaConfig
from codegen2.models.loss import linear_cross_entropy


def reference(h, w, b, t):
    return F.cross_entropy(F.linear(h, w, b).float().flatten(0, -2), t.flatten(), ignore_index=-100,
                           reduction="sum")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("vocab", [1000, 51200])  # 51,200: several chunks of 81 rows and a ragged last one
def test_value_and_gradients_equal_plain_cross_entropy(bias, vocab):
    g = torch.Generator().manual_seed(vocab + bias)
    h = torch.randn(3, 70, 32, generator=g)
    w = torch.randn(vocab, 32, generator=g) * 0.1
    b = torch.randn(vocab, generator=g) if bias else None
    t = torch.randint(0, vocab, (3, 70), generator=g)
    t[0, :5] = -100  # padding: no target
    t[2, -17:] = -100
    grads = []
    for fn in (reference, linear_cross_entropy):
        params = [x.clone().requires_grad_() for x in (h, w) + ((b,) if bias else ())]
        loss = fn(params[0], params[1], params[2] if bias else None, t)
        (loss * 0.37).backward()  # a scale, as the training loop applies one
        grads.append((loss.detach(), [p.grad for p in params]))
    (ref_loss, ref_grads), (loss, got) = grads
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-3)
    for r, x in zip(ref_grads, got):
        torch.testing.assert_close(x, r, rtol=1e-4, atol=1e-6)


def test_padding_rows_get_no_gradient_and_no_loss():
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    t = torch.full((2, 5), -100)
    t[1, 2] = 7
    loss = linear_cross_entropy(h, w, None, t)
    loss.backward()
    expected = F.cross_entropy(F.linear(h[1, 2:3], w), torch.tensor([7]), reduction="sum")
    torch.testing.assert_close(loss, expected)
    mask = torch.zeros(2, 5, 1, dtype=torch.bool)
    mask[1, 2] = True
    assert not h.grad.masked_select(~mask).any()
    t[1, 2] = -100
    assert float(linear_cross_entropy(h, w, None, t).detach()) == 0.0


def test_no_grad_path_equals_reference_and_shape_is_checked():
    h, w, t = torch.randn(4, 9, 16), torch.randn(300, 16), torch.randint(0, 300, (4, 9))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, None, t), reference(h, w, None, t))
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(h, w, None, t[:, :-1])


@pytest.mark.parametrize("family", ["codegen2", "llama"])
def test_model_with_targets_equals_loss_of_its_logits(family):
    torch.manual_seed(0)
    if family == "codegen2":
        model = CodeGen2(CodeGen2Config(n_layers=2, dim=32, n_heads=4, rotary_dim=4, vocab_size=500, max_seq_len=64))
    else:
        model = Llama(LlamaConfig(n_layers=2, dim=32, n_heads=4, intermediate_size=64, vocab_size=500, max_seq_len=64))
    model.train()
    x = torch.randint(0, 500, (2, 20))
    t = torch.randint(0, 500, (2, 20))
    t[1, :6] = -100
    runs = []
    for use_targets in (False, True):
        model.zero_grad()
        loss = model(x, targets=t) if use_targets else reference_of_logits(model(x), t)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-4)
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def reference_of_logits(logits, t):
    return F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=-100, reduction="sum")
