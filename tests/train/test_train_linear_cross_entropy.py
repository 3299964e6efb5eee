"""The LM head and its cross-entropy in one function: the loss and gradients of the plain path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llavactl.train import linear_cross_entropy as lce


def plain(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


def loss_and_grads(fn, head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor):
    head.zero_grad(set_to_none=True)
    hidden = hidden.detach().requires_grad_()
    loss = fn(head, hidden, targets)
    (loss * 0.5).backward()  # a scaled loss, as the loop divides by the supervised tokens
    grads = [p.grad for p in head.parameters()]
    return loss.detach(), hidden.grad, grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 37])
def test_fused_head_gives_the_plain_loss_and_gradients(bias: bool, rows: int):
    generator = torch.Generator().manual_seed(rows)
    head = nn.Linear(24, 301, bias=bias)
    hidden = torch.randn(rows, 24, generator=generator) * 3
    targets = torch.randint(0, 301, (rows,), generator=generator)
    expected = loss_and_grads(plain, head, hidden, targets)
    got = loss_and_grads(lce.summed_cross_entropy, head, hidden, targets)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    for grad, expected_grad in zip(got[2], expected[2], strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_a_frozen_head_passes_gradients_to_the_hidden_states_only():
    head = nn.Linear(8, 50).requires_grad_(False)
    hidden = torch.randn(5, 8, requires_grad=True)
    lce.summed_cross_entropy(head, hidden, torch.tensor([0, 1, 2, 3, 49])).backward()
    assert hidden.grad is not None and head.weight.grad is None


def test_the_fused_path_is_taken_only_where_it_computes_the_plain_one(monkeypatch: pytest.MonkeyPatch):
    calls: list[int] = []
    apply = lce._LinearCrossEntropy.apply
    monkeypatch.setattr(lce._LinearCrossEntropy, "apply", lambda *args: calls.append(1) or apply(*args))
    head, hidden, targets = nn.Linear(8, 50), torch.randn(3, 8), torch.tensor([1, 2, 3])
    lce.summed_cross_entropy(head, hidden, targets)
    assert calls == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 logits, as the plain path makes them
        lce.summed_cross_entropy(head, hidden, targets)
    lce.summed_cross_entropy(head.to(torch.bfloat16), hidden.to(torch.bfloat16), targets)
    hooked = nn.Linear(8, 50)
    hooked.register_forward_hook(lambda *args: None)
    lce.summed_cross_entropy(hooked, hidden, targets)
    assert calls == [1]


def test_a_head_with_backward_hooks_takes_the_plain_path():
    head, hidden = nn.Linear(8, 50), torch.randn(3, 8, requires_grad=True)
    fired: list[bool] = []
    head.register_full_backward_hook(lambda *args: fired.append(True))
    lce.summed_cross_entropy(head, hidden, torch.tensor([1, 2, 3])).backward()
    assert fired == [True]


def test_differentiating_the_fused_gradient_again_is_an_error_not_a_wrong_answer():
    head, hidden = nn.Linear(8, 50), torch.randn(3, 8, requires_grad=True)
    loss = lce.summed_cross_entropy(head, hidden, torch.tensor([1, 2, 3]))
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError, match=r"does not require grad|once_differentiable"):
        grad.sum().backward()
