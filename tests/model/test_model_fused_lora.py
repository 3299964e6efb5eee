"""The fused LoRA forward (update added into the base output in place) against peft's own forward:
same outputs and gradients, and peft's path wherever the fused one does not apply."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from helpers import collated
from helpers import tiny_config as tiny
from peft.tuners.lora import Linear as LoraLinear

from llavactl.model.assembly import AssembledModel, build_llava
from llavactl.model.fused_lora import fused_forward
from llavactl.train.loss import summed_token_loss


def lora_layers(assembled: AssembledModel) -> list[LoraLinear]:
    return [m for m in assembled.model.modules() if isinstance(m, LoraLinear)]


def built(dropout: float = 0.0) -> AssembledModel:
    assembled = build_llava(tiny(lora_dropout=dropout), "lora", image_size=None, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(assembled):  # peft starts B at zero: the update would be zero too
            layer.lora_B["default"].weight.normal_(0.0, 0.05, generator=generator)
    assembled.model.train()
    return assembled


@contextlib.contextmanager
def peft_forward(assembled: AssembledModel) -> Iterator[None]:
    """peft's own `Linear.forward` on every LoRA layer for the duration."""
    layers = lora_layers(assembled)
    saved = [layer.__dict__.pop("forward") for layer in layers]
    try:
        yield
    finally:
        for layer, forward in zip(layers, saved, strict=True):
            layer.forward = forward


def loss_and_grads(assembled: AssembledModel, batch: dict, seed: int = 0) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)
    loss = summed_token_loss(assembled.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in assembled.model.named_parameters() if p.grad is not None}
    assembled.model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_every_lora_linear_gets_the_fused_forward():
    assembled = built()
    layers = lora_layers(assembled)
    assert len(layers) == 4 * assembled.model.config.text_config.num_hidden_layers  # q/k/v/o
    assert all(layer.forward.__func__ is fused_forward for layer in layers)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_forward_gives_peft_s_loss_and_gradients(dropout):
    assembled = built(dropout)
    batch = collated(assembled)
    fused_loss, fused_grads = loss_and_grads(assembled, batch)
    with peft_forward(assembled):
        peft_loss, peft_grads = loss_and_grads(assembled, batch)
    torch.testing.assert_close(fused_loss, peft_loss, rtol=1e-6, atol=1e-5)
    assert fused_grads.keys() == peft_grads.keys() and any(".lora_B." in n for n in fused_grads)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_disabled_and_merged_adapters_take_peft_s_path():
    assembled = built()
    batch = collated(assembled)
    model, peft_model = assembled.model, assembled.peft_model
    model.eval()
    with torch.no_grad():
        adapted = summed_token_loss(model, batch)
        with peft_model.disable_adapter():
            base = summed_token_loss(model, batch)
        peft_model.merge_adapter()
        merged = summed_token_loss(model, batch)
        peft_model.unmerge_adapter()
        with peft_forward(assembled), peft_model.disable_adapter():
            peft_base = summed_token_loss(model, batch)
    assert not torch.isclose(adapted, base)  # the adapters change the output...
    torch.testing.assert_close(base, peft_base)  # ...and are left out when disabled
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-4)  # merged: not added twice


def test_autocast_takes_peft_s_path():
    assembled = built()
    batch = collated(assembled)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = summed_token_loss(assembled.model, batch)
        with peft_forward(assembled):
            peft = summed_token_loss(assembled.model, batch)
    assert torch.equal(fused, peft)


def test_a_hooked_base_layer_sees_its_own_output():
    # A forward hook on the base layer may keep its output: the update must not be added into it.
    assembled = built()
    layer = lora_layers(assembled)[0]
    seen: list[torch.Tensor] = []
    layer.base_layer.register_forward_hook(lambda module, args, out: seen.append(out))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        out = layer(x)
        base = torch.nn.functional.linear(x, layer.base_layer.weight)
    torch.testing.assert_close(seen[0], base)
    assert not torch.allclose(out, base)  # the update is there, in the layer's own output
