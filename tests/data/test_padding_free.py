"""Padding-free batches (`data.padding_free`): the same records and loss as padded batches, each
record's attention kept to itself, on a CPU exactly."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import interrupt_at, profile, record, train_recipe

from llavactl.data.dataset import Collator, build_dataset
from llavactl.data.packing import records_in, sequence_lengths, tokens_in
from llavactl.data.source import open_source
from llavactl.data.templates import IGNORE_INDEX
from llavactl.errors import ConfigError
from llavactl.model.assembly import build_llava
from llavactl.model.causal_attention import causal_attention
from llavactl.model.flops import attention_pairs, flop_counter
from llavactl.train.loss import TokenLoss, llava_of


@pytest.fixture(scope="module")
def mixed(shapes_data: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 records of mixed lengths: shapes records with one image, text-only records of 10 to 150
    tokens, and records with two images; images are the shapes set's."""
    shapes = shapes_data(16)
    records: list[dict[str, Any]] = json.loads(shapes.read_text())
    images = [r["image"] for r in records]
    for k in range(5):
        records.append(
            record(("human", "Tell me a story. " * (k + 1)), ("gpt", "Once upon a time. " * (3 * k + 1)), rid=f"t{k}")
        )
    for k in range(3):
        records.append(
            record(
                ("human", "<image>\n<image>\nWhich picture is brighter?"),
                ("gpt", "The first one is brighter." * (k + 1)),
                image=[images[k], images[k + 3]],
                rid=f"two{k}",
            )
        )
    random.Random(0).shuffle(records)
    path = tmp_path_factory.mktemp("mixed") / "mixed.json"
    path.write_text(json.dumps(records))
    return path


def _image_folder(mixed: Path, shapes_data: Callable[..., Path]) -> str:
    return f"data.image_folder={shapes_data(16).parent}"


@pytest.fixture(scope="module")
def items(mixed: Path, shapes_data: Callable[..., Path]) -> tuple[Any, list[dict[str, Any]]]:
    """The tiny model's tokenizer and image spec, and the first 6 items of the mixed data set."""
    loaded = profile("tiny", f"data.data_path={mixed}", _image_folder(mixed, shapes_data))
    prof = loaded.profile
    assembled = build_llava(prof.model, prof.stage, image_size=prof.data.image_size, seed=prof.seed)
    dataset = build_dataset(
        open_source(prof.data, 0), prof.data, assembled.tokenizer, assembled.image_token_id, assembled.image_spec
    )
    return assembled, [dataset[i] for i in range(6)]


def test_the_collator_lays_records_end_to_end_with_positions_restarting(items: tuple[Any, list]) -> None:
    assembled, good = items
    padded = Collator(assembled.tokenizer.pad_token_id)(good)
    packed = Collator(assembled.tokenizer.pad_token_id, padding_free=True)(good)
    lengths = [len(it["input_ids"]) for it in good]
    assert len(set(lengths)) > 2  # the records differ in length: padding had work to do
    assert set(packed) == {"input_ids", "labels", "position_ids", "pixel_values"}  # no attention mask, no pads
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])  # images in record order
    assert sequence_lengths(packed) == lengths and sequence_lengths(padded) == [max(lengths)] * len(good)
    assert records_in(packed) == records_in(padded) == len(good)
    assert tokens_in(packed) == tokens_in(padded) == sum(lengths)
    start = 0
    for row, it in enumerate(good):
        n = len(it["input_ids"])
        assert torch.equal(packed["input_ids"][0, start : start + n], padded["input_ids"][row, :n])
        # The same targets: a record's first label is never one (no token of it comes before it).
        assert packed["labels"][0, start] == IGNORE_INDEX
        assert torch.equal(packed["labels"][0, start + 1 : start + n], padded["labels"][row, 1:n])
        start += n


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = TokenLoss(model)(batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["stage=lora", "model.lora_dropout=0"],  # dropout masks depend on the layout
        ["stage=projector"],
        ["model.freeze_vision_tower=true", "training.gradient_checkpointing=true"],
    ],
    ids=["full", "lora", "projector", "frozen-tower-checkpointed"],
)
def test_one_packed_row_gives_the_padded_batch_s_loss_and_gradients(
    mixed: Path, shapes_data: Callable[..., Path], overrides: list[str]
) -> None:
    prof = profile("tiny", f"data.data_path={mixed}", _image_folder(mixed, shapes_data), *overrides).profile
    assembled = build_llava(
        prof.model,
        prof.stage,
        image_size=prof.data.image_size,
        seed=prof.seed,
        gradient_checkpointing=prof.training.gradient_checkpointing,
    )
    dataset = build_dataset(
        open_source(prof.data, 0), prof.data, assembled.tokenizer, assembled.image_token_id, assembled.image_spec
    )
    # Text-only, one-image and two-image records in one batch.
    good = [dataset[i] for i in range(8)]
    assert {0, 1, 2} <= {len(it["pixel_values"]) if it["pixel_values"] is not None else 0 for it in good}
    pad = assembled.tokenizer.pad_token_id
    padded_loss, padded = _loss_and_grads(assembled.model, Collator(pad)(good))
    packed_loss, packed = _loss_and_grads(assembled.model, Collator(pad, padding_free=True)(good))
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert packed.keys() == padded.keys() and padded
    # Within 1e-5 of the gradients' scale (a tower's key bias has none in exact arithmetic, only
    # float noise of ~1e-7 that differs between the two layouts).
    scale = max(g.abs().max().item() for g in padded.values())
    for name, grad in padded.items():
        torch.testing.assert_close(packed[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_changing_one_packed_record_leaves_the_others_logits_exactly_unchanged(items: tuple[Any, list]) -> None:
    assembled, good = items
    llava = llava_of(assembled.model)
    collate = Collator(assembled.tokenizer.pad_token_id, padding_free=True)
    batch = collate(good[:3])
    changed = [dict(it) for it in good[:3]]
    ids = changed[1]["input_ids"].clone()
    text = ids != assembled.image_token_id
    ids[text] = (ids[text] + 7) % assembled.tokenizer.vocab_size
    changed[1]["input_ids"] = ids
    other = collate(changed)
    lengths = sequence_lengths(batch)
    keep = torch.ones(sum(lengths), dtype=torch.bool)
    keep[lengths[0] : lengths[0] + lengths[1]] = False

    def logits(b: dict[str, torch.Tensor]) -> torch.Tensor:
        # Gradients on, as in training: the CPU attention kernel runs then.
        inputs = {k: b[k] for k in ("input_ids", "position_ids", "pixel_values") if k in b}
        return llava(**inputs, use_cache=False).logits[0].detach()

    before, after = logits(batch), logits(other)
    assert not torch.equal(before[~keep], after[~keep])  # the changed record did change
    assert torch.equal(before[keep], after[keep])


@pytest.mark.parametrize("lengths", [[5, 130, 70], [1, 64, 1, 200], [300]])
def test_the_cpu_kernel_runs_each_packed_record_as_its_own_causal_attention(lengths: list[int]) -> None:
    generator = torch.Generator().manual_seed(0)
    total = sum(lengths)
    query, key, value = (torch.randn(1, h, total, 16, generator=generator, requires_grad=True) for h in (6, 2, 2))
    out, _ = causal_attention(query, key, value, 0.3, lengths)
    grad = torch.randn(out.shape, generator=generator)
    out.backward(grad)
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        q, k, v = (t.detach()[:, :, rows].clone().requires_grad_() for t in (query, key, value))
        alone, _ = causal_attention(q, k, v, 0.3)
        alone.backward(grad[:, :, rows])
        assert torch.equal(out[:, :, rows], alone)
        # Each record's gradients: its own keys and values get nothing from another record's queries.
        for packed, single in ((query, q), (key, k), (value, v)):
            torch.testing.assert_close(packed.grad[:, :, rows], single.grad, rtol=1e-6, atol=1e-6)
        start += n
    torch.library.opcheck(causal_attention, (query.detach(), key.detach(), value.detach(), 0.3, lengths))


def test_packed_attention_is_credited_with_each_record_s_causal_pairs() -> None:
    lengths = [100, 40, 60]
    query, key, value = (torch.randn(1, h, sum(lengths), 16) for h in (4, 2, 2))
    with flop_counter() as counter:
        causal_attention(query, key, value, 0.25, lengths)
    pairs = sum(attention_pairs(n, n, True) for n in lengths)
    assert counter.get_total_flops() == 2 * 4 * pairs * (16 + 16)


def test_the_llm_s_attention_in_training_calls_the_kernel_with_the_record_lengths(
    items: tuple[Any, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    import llavactl.model.causal_attention as module

    assembled, good = items
    seen: list[list[int] | None] = []
    op = module.causal_attention

    def recorded(query, key, value, scale, lengths=None):  # type: ignore[no-untyped-def]
        seen.append(lengths)
        return op(query, key, value, scale, lengths)

    monkeypatch.setattr(module, "causal_attention", recorded)
    batch = Collator(assembled.tokenizer.pad_token_id, padding_free=True)(good[:4])
    TokenLoss(assembled.model)(batch).backward()
    assert seen and all(lengths == sequence_lengths(batch) for lengths in seen)


def test_an_llm_whose_attention_mixes_packed_records_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import LlamaConfig, LlamaModel

    from llavactl.model.attention import check_records_stay_apart

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    model = LlamaModel(config)
    check_records_stay_apart(model)  # transformers' packed mask keeps them apart
    # A model that ignores the position ids' record boundaries, as one building its own mask would.
    monkeypatch.setattr("transformers.masking_utils.find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ConfigError, match="does not keep packed records apart") as info:
        check_records_stay_apart(model)
    assert "data.padding_free=false" in (info.value.fix or "")


def _train(mixed: Path, shapes_data: Callable[..., Path], out: Path, *extra: str, resume: str | None = None) -> Any:
    return _train_and_say(mixed, shapes_data, out, *extra, resume=resume)[0]


def _train_and_say(
    mixed: Path, shapes_data: Callable[..., Path], out: Path, *extra: str, resume: str | None = None
) -> tuple[Any, str]:
    return train_recipe(
        [
            f"data.data_path={mixed}",
            _image_folder(mixed, shapes_data),
            f"training.output_dir={out}",
            "training.per_device_train_batch_size=4",
            "training.gradient_accumulation_steps=2",
            "training.learning_rate=1e-3",
            "training.max_steps=20",
            "training.warmup_ratio=null",
            "training.warmup_steps=2",
            "training.logging_steps=1",
            "training.save_steps=100",
            *extra,
        ],
        resume=resume,
    )


@pytest.mark.slow
def test_twenty_steps_of_tiny_train_as_the_padded_run_does(
    mixed: Path, shapes_data: Callable[..., Path], tmp_path: Path
) -> None:
    padded = _train(mixed, shapes_data, tmp_path / "padded")
    packed, said = _train_and_say(mixed, shapes_data, tmp_path / "packed", "data.padding_free=true")
    assert "batches of 4 per epoch, each packed into one row (data.padding_free)" in said
    assert packed.status == padded.status == "completed"
    assert packed.losses[0] == pytest.approx(padded.losses[0], rel=1e-5)
    assert packed.losses == pytest.approx(padded.losses, rel=1e-4)
    assert packed.losses[-1] < packed.losses[0]
    metrics = [json.loads(x) for x in (tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()]
    padded_metrics = [json.loads(x) for x in (tmp_path / "padded" / "metrics.jsonl").read_text().splitlines()]

    # The same records and tokens each step (tokens per record, from the logged rates): pads not counted.
    def tokens_per_record(rows: list[dict[str, float]]) -> list[float]:
        return [m["tokens_per_s"] / m["samples_per_s"] for m in rows]

    assert tokens_per_record(metrics) == pytest.approx(tokens_per_record(padded_metrics), rel=1e-9)


@pytest.mark.slow
def test_a_padding_free_run_resumes_exactly(
    mixed: Path, shapes_data: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    whole = _train(mixed, shapes_data, tmp_path / "whole", "data.padding_free=true", "training.max_steps=8")
    with monkeypatch.context() as m:
        interrupt_at(m, 4, signal.SIGINT)
        first = _train(mixed, shapes_data, tmp_path / "split", "data.padding_free=true", "training.max_steps=8")
    assert (first.status, first.step) == ("interrupted", 4)
    second = _train(
        mixed, shapes_data, tmp_path / "split", "data.padding_free=true", "training.max_steps=8", resume="auto"
    )
    assert first.losses + second.losses == whole.losses


# ------------------------------------------------------------------ token-budget micro-batches


def test_first_fit_decreasing_fills_bins_up_to_the_budget() -> None:
    from llavactl.data.packing import first_fit_decreasing

    lengths = [700, 300, 650, 120, 90, 400, 1024, 60, 333, 512]
    bins = first_fit_decreasing(range(len(lengths)), lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    # Longest first into the first bin with room: 1024 alone; 700+300; 650+333; 512+400+90; 120+60.
    assert [sorted(b) for b in bins] == [[6], [0, 1], [2, 8], [4, 5, 9], [3, 7]]
    assert first_fit_decreasing([0, 1], [2000, 10], 1024) == [[0], [1]]  # too long: a bin of its own


def test_token_budget_batches_are_seeded_shared_out_and_resume_where_they_stopped() -> None:
    from llavactl.data.dataset import TokenBudgetBatches

    lengths = [random.Random(k).randint(20, 900) for k in range(1200)]
    one = TokenBudgetBatches(lengths, 2048, seed=3)
    assert one.batches(0) == TokenBudgetBatches(lengths, 2048, seed=3).batches(0)
    assert one.batches(0) != one.batches(1) and one.batches(0) != TokenBudgetBatches(lengths, 2048, seed=4).batches(0)
    assert sorted(i for b in one.batches(0) for i in b) == list(range(1200))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in one.batches(0))
    # Tightly filled: at most a few bins of each 512-record megabatch are not nearly full.
    filled = sum(lengths) / (len(one.batches(0)) * 2048)
    assert filled > 0.95, filled
    # Two processes: alternate batches of one order, as many each, the odd one left out.
    ranks = [TokenBudgetBatches(lengths, 2048, seed=3, rank=r, world_size=2) for r in (0, 1)]
    whole = one.batches(0)
    half = len(whole) // 2
    assert ranks[0].order(0) == whole[0 : half * 2 : 2] and ranks[1].order(0) == whole[1 : half * 2 : 2]
    assert len(ranks[0]) == len(ranks[1]) == len(whole) // 2
    assert ranks[0].dropped_per_epoch == sum(len(b) for b in whole[len(whole) // 2 * 2 :])
    # Resume: the records used so far, saved and loaded into a fresh sampler, continue the order.
    sampler = TokenBudgetBatches(lengths, 2048, seed=3)
    sampler.set_epoch(1)
    seen = []
    for batch in sampler:
        seen.append(batch)
        sampler.advance(len(batch))
        if len(seen) == 5:
            break
    resumed = TokenBudgetBatches(lengths, 2048, seed=3)
    resumed.load_state_dict(sampler.state_dict())
    assert seen + list(resumed) == one.batches(1)
    assert len(resumed) == len(one.batches(1)) - 5


def test_every_planned_epoch_of_a_token_budget_has_as_many_batches_and_every_record() -> None:
    from llavactl.data.dataset import TokenBudgetBatches

    lengths = [random.Random(k).randint(20, 900) for k in range(1200)]
    sampler = TokenBudgetBatches(lengths, 2048, seed=4)
    raw = [len(sampler._binned(e)) for e in range(4)]
    assert len(set(raw)) > 1  # binning another order takes another number of bins ...
    sampler.plan_epochs(4)
    assert sampler.per_epoch == max(raw)
    for epoch in range(4):  # ... but every epoch of the run is as long, and loses no record
        batches = sampler.batches(epoch)
        assert len(batches) == max(raw)
        assert sorted(i for b in batches for i in b) == list(range(1200))
        assert all(sum(lengths[i] for i in b) <= 2048 for b in batches)
        sampler.set_epoch(epoch)
        assert sampler.dropped_per_epoch == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.max_tokens_per_batch=4096"], "needs padding-free batches"),
        (["data.padding_free=true", "data.max_tokens_per_batch=256"], "cannot hold a record of data.max_seq_len=384"),
    ],
)
def test_a_token_budget_needs_packing_and_room_for_the_longest_record(overrides: list[str], message: str) -> None:
    from llavactl.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        profile("tiny", *overrides)


@pytest.mark.slow
def test_token_budget_training_varies_records_per_step_and_resumes_exactly(
    mixed: Path, shapes_data: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    # 24 records of ~300 tokens, ~3 a micro-batch of 1,000 tokens, 2 a step: 4 steps an epoch; 10
    # steps cross two epochs, whose binning may differ.
    budget = ("data.padding_free=true", "data.max_tokens_per_batch=1000", "training.max_steps=10")
    whole, said = _train_and_say(mixed, shapes_data, tmp_path / "whole", *budget)
    # The global batch in records and tokens, on average: records per micro-batch vary.
    assert "micro-batches of up to 1,000 tokens per epoch" in said and "tokens each on average" in said
    assert "records, " in said.split("global batch ")[1] and "x 2 accumulation" in said
    metrics = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert whole.status == "completed" and len(whole.losses) == 10
    # Records per step vary with their lengths (tokens per record, from the logged rates).
    assert len({round(m["tokens_per_s"] / m["samples_per_s"]) for m in metrics}) > 1
    with monkeypatch.context() as m:
        interrupt_at(m, 5, signal.SIGINT)
        first = _train(mixed, shapes_data, tmp_path / "split", *budget)
    second = _train(mixed, shapes_data, tmp_path / "split", *budget, resume="auto")
    assert first.losses + second.losses == whole.losses


# ------------------------------------------------------------------ seen before the run


def test_the_pad_fraction_and_average_micro_batch_of_a_batching() -> None:
    from llavactl.data.dataset import Batching, micro_batch_work, padding_summary

    lengths, text_only = [10, 20, 30, 40], [False] * 4
    grouped = Batching(2, seed=0, group_by_modality_length=True)
    # Grouped by length: (40, 30) and (20, 10), padded to 2 x 40 + 2 x 20 = 120 tokens for 100.
    summary = padding_summary(lengths, text_only, grouped)
    assert (summary["tokens"], summary["padded_tokens"]) == (100, 120)
    assert summary["pad_fraction"] == pytest.approx(1 / 6)
    padded = micro_batch_work(lengths, text_only, grouped)
    assert (padded.records, padded.tokens, padded.pairs) == (2, 60, (2 * 40 * 40 + 2 * 20 * 20) / 2)
    packed = micro_batch_work(lengths, text_only, Batching(2, seed=0, padding_free=True))
    assert (packed.records, packed.tokens) == (2, 50)
    assert packed.pairs == sum(n * (n + 1) // 2 for n in lengths) / 2  # each record's causal pairs
    budget = micro_batch_work(lengths, text_only, Batching(2, 0, padding_free=True, max_tokens_per_batch=50))
    assert (budget.records, budget.tokens) == (2, 50)  # 40+10 and 30+20


def test_data_check_reports_the_profile_s_pad_fraction(mixed: Path, shapes_data: Callable[..., Path]) -> None:
    from helpers import run_cli

    args = ["data", "check", "--profile", "tiny", f"data.data_path={mixed}", _image_folder(mixed, shapes_data)]
    code, out, _ = run_cli([*args, "--json", "training.per_device_train_batch_size=4"])
    assert code == 0, out
    padding = json.loads(out)["stats"]["padding"]
    assert padding["batch_size"] == 4 and padding["padding_free"] is False
    assert 0.1 < padding["pad_fraction"] < 0.9  # text-only records of 20-150 tokens beside ~300-token ones
    # The records' own tokens as training cuts them (at data.max_seq_len), fewer than those padded batches compute.
    length = json.loads(out)["stats"]["length"]
    assert padding["padded_tokens"] > padding["tokens"] >= 24 * length["min"]
    assert padding["tokens"] <= 24 * min(length["mean"], 384)
    code, out, _ = run_cli([*args, "data.padding_free=true"])
    assert code == 0 and "are pad tokens" in out and "data.padding_free is on" in out


@pytest.mark.slow  # 6 s: two dry-runs with real steps
def test_dry_run_times_the_average_micro_batch_and_plans_memory_for_the_largest(
    mixed: Path, shapes_data: Callable[..., Path]
) -> None:
    from helpers import CPU, ONE

    from llavactl.plan import build as P
    from llavactl.resolve import resolve

    def plan(*overrides: str) -> Any:
        loaded = profile("tiny", f"data.data_path={mixed}", _image_folder(mixed, shapes_data), *overrides)
        return P.build_plan(resolve(loaded, CPU, ONE), runtime_bytes=0)

    padded, packed = plan(), plan("data.padding_free=true")
    # Without a budget, whole batches of the profile's size: 24 records in batches of 5 are 5 steps of 5.
    odd = plan("training.per_device_train_batch_size=5")
    assert (odd.steps_per_epoch, odd.global_batch) == (5, 5)
    assert padded.tokens.pad_fraction == packed.tokens.pad_fraction > 0.1
    assert packed.tokens.micro_batch.tokens < padded.tokens.micro_batch.tokens
    assert packed.flops_per_step < padded.flops_per_step
    assert packed.memory.total == padded.memory.total  # four of the longest records can meet in one row
    budget = plan("data.padding_free=true", "data.max_tokens_per_batch=2000")
    assert budget.global_batch == pytest.approx(budget.tokens.micro_batch.records) and budget.global_batch > 4
    assert budget.steps_per_epoch == math.ceil(24 / budget.tokens.micro_batch.records)


def test_preview_shows_a_packed_row_with_its_record_boundaries(mixed: Path, shapes_data: Callable[..., Path]) -> None:
    from helpers import run_cli

    args = ["data", "preview", "--profile", "tiny", f"data.data_path={mixed}", _image_folder(mixed, shapes_data)]
    code, out, _ = run_cli([*args, "-n", "3", "--packed", "--json"])
    assert code == 0, out
    rows = json.loads(out)
    assert [r["packed"]["start"] for r in rows] == [0, rows[0]["packed"]["end"], rows[1]["packed"]["end"]]
    code, out, _ = run_cli([*args, "-n", "3", "--packed"])
    assert f"One padding-free row of 3 records, {rows[2]['packed']['end']:,} tokens" in out
    assert out.count("── tokens ") == 3


def test_on_cuda_packed_rows_take_flash_attention_s_varlen_kernel_when_it_can(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from llavactl.model.attention import use_varlen_kernel

    switched: list[str] = []

    class Model:
        config = type("Config", (), {"_attn_implementation": "sdpa"})()

        def set_attn_implementation(self, name: str) -> None:
            if name == "broken":
                raise ImportError("flash_attn: undefined symbol")
            switched.append(name)

    assert use_varlen_kernel(Model(), "cpu", half_precision=True) is None  # the CPU has llavactl's own kernel
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    # The kernel takes bf16/fp16 only: an fp32 run keeps SDPA's packed mask.
    assert "keeps SDPA's packed mask" in (use_varlen_kernel(Model(), "cuda", half_precision=False) or "")
    assert not switched
    assert use_varlen_kernel(Model(), "cuda", half_precision=True) == "the LLM runs flash-attention 2's varlen kernel"
    assert switched == ["flash_attention_2"]
    broken = Model()
    broken.set_attn_implementation = lambda name: Model.set_attn_implementation(broken, "broken")  # type: ignore[method-assign]
    assert "could not be used (flash_attn: undefined symbol)" in (
        use_varlen_kernel(broken, "cuda", half_precision=True) or ""
    )
