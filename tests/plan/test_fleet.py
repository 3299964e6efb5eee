"""Planning a run on GPUs that are not here: the GPU table, memory per GPU by strategy, the
communication and its overlap, the step FLOPs of a 7B LLM, the comparison of fleets."""

from __future__ import annotations

import math

import pytest
from helpers import CPU, ONE

from llavactl.config.loader import load_profile
from llavactl.errors import ConfigError
from llavactl.plan import build as P
from llavactl.plan import fleet as F
from llavactl.plan.memory import MemoryEstimate, component_params
from llavactl.resolve import resolve
from llavactl.resolve.gpus import GPUS, custom_gpu, find_gpu

GIB = 1024**3

# ---------------------------------------------------------------------------- the GPU table


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("a100-80gb", "a100-80gb"),
        ("A100 80GB", "a100-80gb"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("a100_40GB", "a100-40gb"),
        ("h100", "h100-sxm"),
        ("H100 SXM", "h100-sxm"),
        ("h100 pcie", "h100-pcie"),
        ("H200", "h200"),
        ("Tesla T4", "t4"),
        ("4090", "rtx4090"),
        ("GeForce RTX 4090", "rtx4090"),
        ("l40s", "l40s"),
        ("L4", "l4"),
        ("a10g", "a10g"),
    ],
)
def test_gpu_names_are_matched_leniently(name: str, key: str) -> None:
    assert find_gpu(name).key == key


def test_the_table_has_the_gpus_the_planner_promises() -> None:
    keys = {g.key for g in GPUS}
    wanted = {"a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "b200", "l40s", "l4", "a10g", "rtx4090"}
    assert wanted | {"t4", "v100"} <= keys
    for gpu in GPUS:
        # Dense tensor rates exceed the plain FP32 rate; TF32 is half of bf16 where both exist.
        assert gpu.fp16 > gpu.fp32 and (gpu.bf16 is None) == (gpu.tf32 is None) == (gpu.capability < (8, 0))
        if gpu.bf16 is not None and gpu.tf32 is not None:
            assert gpu.tf32 == pytest.approx(gpu.bf16 / 2, rel=0.02)
    # The A100's dense bf16 is 312 TFLOP/s (624 is the sparse figure).
    assert find_gpu("a100-80gb").bf16 == 312e12 and find_gpu("a100-40gb").memory_bytes == 40 * GIB


@pytest.mark.parametrize(("name", "said"), [("mi300x", "no GPU is called `mi300x`"), ("a100", "could be a100-40gb")])
def test_an_unknown_or_ambiguous_gpu_is_answered_with_the_list(name: str, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        find_gpu(name)
    assert said in caught.value.message
    assert all(g.key in caught.value.message for g in GPUS)
    assert "--gpu-spec" in (caught.value.fix or "")


def test_a_custom_gpu_is_described_by_its_memory_rates_and_link(write_yaml) -> None:
    gpu = custom_gpu("name=mi300x,memory_gib=192,bf16_tflops=1307,tf32_tflops=653,link_gbps=448")
    assert (gpu.memory_bytes, gpu.bf16, gpu.fp16, gpu.tf32) == (192 * GIB, 1307e12, 1307e12, 653e12)
    assert gpu.link_bytes_per_s == 448e9 and gpu.efficiency == 0.30
    from_file = custom_gpu(
        str(write_yaml("gpu.yaml", "memory_gib: 24\nfp16_tflops: 65\nlink_gbps: 16\nefficiency: 0.4\n"))
    )
    assert from_file.bf16 is None and from_file.fp16 == 65e12 and from_file.efficiency == 0.4
    with pytest.raises(ConfigError) as caught:
        custom_gpu("memory_gib=24,bf16_tflops=100,link_gbps=16,flops=3")
    assert "`flops`" in caught.value.message


# ---------------------------------------------------------------------------- memory per GPU

# vicuna-7b-v1.5 with CLIP ViT-L/14-336 and the 2-layer projector, as the finetune profile builds it.
SEVEN_B = F.Shards(total=7_062_910_976, trainable=6_759_403_520, layers=32, layer_params=202_383_360)


def _seven_b_step(activations: int) -> MemoryEstimate:
    """The one-process estimate of a full fine-tune with AdamW: fp32 weights, gradients, two moments."""
    return MemoryEstimate(
        runtime=0,
        weights=4 * SEVEN_B.total,
        gradients=4 * SEVEN_B.trainable,
        optimizer=8 * SEVEN_B.trainable,
        activations=activations,
    )


def test_fsdp_memory_per_gpu_of_a_7b_full_finetune_on_8_gpus_is_the_arithmetic() -> None:
    act = 12 * GIB
    m = F.fsdp_memory(_seven_b_step(act), SEVEN_B, 8, gather_bytes=2, accumulation=1)
    # ZeRO-3: 16 bytes a trainable parameter (fp32 weight, gradient, two Adam moments) over 8 GPUs,
    # the frozen tower's fp32 weights too; gathered in bf16: the root group and two decoder layers.
    sharded = (4 * SEVEN_B.total + 12 * SEVEN_B.trainable) / 8
    root = SEVEN_B.total - 32 * SEVEN_B.layer_params
    gathered = (root + 2 * SEVEN_B.layer_params) * 2
    rest = F.CUDA_CONTEXT_BYTES + sharded + gathered + act
    assert m.total == pytest.approx(rest * (1 + F.ALLOCATOR_RESERVE), abs=8)
    assert m.weights + m.gradients + m.optimizer == pytest.approx(sharded, abs=3)
    # About 13.2 GiB of states, 1.8 GiB gathered: with 12 GiB of activations it fits 40 GB with the margin.
    assert 28 * GIB < m.total < 0.8 * 40 * GIB
    # Accumulating keeps the unsharded fp32 gradients between reduce-scatters.
    accumulating = F.fsdp_memory(_seven_b_step(act), SEVEN_B, 8, gather_bytes=2, accumulation=4)
    assert accumulating.buffers - m.buffers == 4 * SEVEN_B.trainable


def test_ddp_keeps_a_full_replica_and_a_second_copy_of_the_gradients() -> None:
    step = _seven_b_step(GIB)
    m = F.ddp_memory(step, 8)
    assert (m.weights, m.gradients, m.optimizer, m.buffers) == (
        step.weights,
        step.gradients,
        step.optimizer,
        step.gradients,
    )
    assert F.ddp_memory(step, 1).buffers == 0  # one process: no DDP, no buckets


def test_shards_group_the_decoder_layers() -> None:
    named = [
        ("model.language_model.layers.0.mlp.weight", 10, True),
        ("model.language_model.layers.1.mlp.weight", 10, True),
        ("model.language_model.embed_tokens.weight", 7, True),
        ("model.vision_tower.x.weight", 5, False),
    ]
    shards = F.shards_of(named)
    assert (shards.total, shards.trainable, shards.layers, shards.layer_params, shards.root_params) == (
        32,
        27,
        2,
        10,
        12,
    )


# ---------------------------------------------------------------------------- communication


def _fleet(gpu: str = "a100-80gb", n: int = 8, nodes: int = 1, gbps: float = 400.0) -> F.Fleet:
    return F.Fleet(find_gpu(gpu), n, nodes, gbps)


@pytest.mark.parametrize("world", [2, 8, 16])
def test_ring_collectives_send_the_textbook_volumes(world: int) -> None:
    size = 1_000_000
    assert F.ring_bytes("all_reduce", size, world) == pytest.approx(2 * (world - 1) / world * size)
    assert F.ring_bytes("all_gather", size, world) == pytest.approx((world - 1) / world * size)
    assert F.ring_bytes("reduce_scatter", size, world) == pytest.approx((world - 1) / world * size)


def test_ddp_all_reduces_the_fp32_gradients_once_a_step() -> None:
    fleet = _fleet()
    comm = F.ddp_communication(SEVEN_B.trainable, fleet)
    volume = 2 * 7 / 8 * 4 * SEVEN_B.trainable
    assert comm.per_step_bytes == pytest.approx(volume) and comm.per_micro_batch_bytes == 0
    assert comm.per_step_seconds == pytest.approx(volume / 300e9)  # NVLink 3: 300 GB/s one way


def test_fsdp_gathers_each_micro_batch_and_reduce_scatters_once() -> None:
    fleet = _fleet()
    comm = F.fsdp_communication(SEVEN_B, fleet, gather_bytes=2)
    layers = SEVEN_B.layers * SEVEN_B.layer_params
    assert comm.per_micro_batch_bytes == pytest.approx(7 / 8 * (SEVEN_B.total + layers) * 2)
    assert comm.per_step_bytes == pytest.approx(7 / 8 * 4 * SEVEN_B.trainable)
    # With everything in decoder layers and one dtype, FSDP sends 1.5x DDP's volume (ZeRO-3's 3 vs 2).
    flat = F.Shards(total=32 * 100, trainable=32 * 100, layers=32, layer_params=100)
    fsdp = F.fsdp_communication(flat, fleet, gather_bytes=4)
    ddp = F.ddp_communication(flat.trainable, fleet)
    assert fsdp.per_micro_batch_bytes + fsdp.per_step_bytes == pytest.approx(1.5 * ddp.per_step_bytes)


def test_across_nodes_a_collective_also_crosses_the_network() -> None:
    size = 8_000_000_000
    two = _fleet(nodes=2, gbps=800)
    inside = 2 * 7 / 8 * size / 300e9
    across = 2 * 1 / 2 * size / (800e9 / 8)
    assert F.collective_seconds("all_reduce", size, two) == pytest.approx(inside + across)
    assert F.collective_seconds("all_reduce", size, _fleet()) == pytest.approx(inside)


def test_communication_that_the_backward_hides_costs_nothing() -> None:
    hidden = F.Communication(0.0, 1.0, 0.0, 1.0)
    exposed = F.Communication(0.0, 5.0, 0.0, 5.0)
    assert F.step_seconds("ddp", 3.0, 4, hidden) == 12.0
    assert F.step_seconds("ddp", 3.0, 4, exposed) == pytest.approx(12.0 + 5.0 - 2 / 3 * 3.0)
    gathers = F.Communication(1.0, 0.0, 4.0, 0.0)
    assert F.step_seconds("fsdp", 3.0, 2, gathers) == 8.0  # each micro-batch waits for its gathers


# ---------------------------------------------------------------------------- the step FLOPs of a 7B LLM


def _seven_b_flops(stage: str) -> tuple[int, int, dict[str, int]]:
    """(traced FLOPs, attention's share, parameters by component) of one 2048-token record of the
    finetune profile's models in ``stage``, without checkpointing."""
    overrides = [f"stage={stage}", "training.gradient_checkpointing=false", "training.per_device_train_batch_size=1"]
    profile = load_profile("finetune", overrides).profile
    tokens = P.TokenPlan("test", None, None, 576, 1, 2048, 2048, 2048, 1024)
    assembled = P.build_meta(profile, gradient_checkpointing=False)
    params = {c.name: c.total for c in component_params(assembled)}
    _, trace, _ = P._estimate(profile, tokens, runtime_bytes=0, device="cuda", assembled=assembled)
    return trace.flops, trace.attention_flops, params


LLAMA_7B = {"layers": 32, "hidden": 4096, "vocab": 32000}


@pytest.mark.slow
def test_a_7b_full_step_is_6NT_plus_attention_and_a_frozen_llm_step_4NT_plus_attention() -> None:
    tokens = 2048
    pairs = tokens * (tokens + 1) // 2  # a lone record: causal attention
    # Attention's score and output matmuls: 4 d FLOPs a query-key pair a layer forward, twice that backward.
    attention = 12 * LLAMA_7B["layers"] * LLAMA_7B["hidden"] * pairs
    full, full_attention, params = _seven_b_flops("full")
    # N: the LLM's parameters less the input embedding (a lookup, no FLOPs); the head counts.
    n = params["llm"] - (LLAMA_7B["vocab"] + 1) * LLAMA_7B["hidden"]
    assert full == pytest.approx(6 * n * tokens + attention, rel=0.05)
    assert full_attention == pytest.approx(attention, rel=0.2)  # the CPU kernel's backward recomputes scores
    # Projector stage: the LLM runs forward (2NT) and backward through its activations only, to reach
    # the image tokens (2NT, no weight gradients): 4NT, plus attention forward and backward.
    frozen, _, _ = _seven_b_flops("projector")
    assert frozen == pytest.approx(4 * n * tokens + attention, rel=0.05)


# ---------------------------------------------------------------------------- plans and their comparison


@pytest.fixture(scope="module")
def tiny_planner(shapes_data) -> F.FleetPlanner:
    loaded = load_profile("tiny", [f"data.data_path={shapes_data(24)}"])
    return F.FleetPlanner(resolve(loaded, CPU, ONE))


def test_a_fleet_plan_keeps_the_global_batch_and_prints_its_launch_line(tiny_planner: F.FleetPlanner) -> None:
    plan = tiny_planner.plan(_fleet("l4", 2), price_per_gpu_hour=0.8)
    c = plan.choice
    assert c is not None and c.micro_batch * c.accumulation * 2 == plan.global_batch == 4
    assert plan.total_steps == 6 * math.ceil(math.ceil(24 / (c.micro_batch * 2)) / c.accumulation)
    assert plan.run_hours == pytest.approx(plan.total_steps * c.seconds_per_step / 3600)
    assert plan.cost_usd == pytest.approx(plan.run_hours * 2 * 0.8)
    assert plan.launch == {"command": f"llavactl train --profile tiny --nproc-per-node 2 {' '.join(plan.overrides)}"}
    assert "training.device=cuda" in plan.overrides and f"training.distributed={c.strategy}" in plan.overrides
    data = plan.as_json()
    assert data["fleet"] == {
        "gpu": "l4",
        "gpus_per_node": 2,
        "nodes": 1,
        "network_gbps": 400.0,
        "gpu_memory_bytes": 24 * GIB,
    }
    assert data["memory_per_gpu"]["total"] == c.memory.total and data["fits"] is True


def test_several_nodes_get_a_torchrun_line_and_a_slurm_script(tiny_planner: F.FleetPlanner) -> None:
    plan = tiny_planner.plan(_fleet("h100", 2, nodes=2))
    assert plan.launch is not None
    assert plan.launch["torchrun"].startswith("torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d")
    assert "HEAD_NODE:29500" in plan.launch["torchrun"]
    assert "#SBATCH --nodes=2" in plan.launch["slurm"] and "-m llavactl train --profile tiny" in plan.launch["slurm"]


def test_a_strategy_the_profile_sets_is_kept_and_the_other_weighed(shapes_data) -> None:
    loaded = load_profile("tiny", [f"data.data_path={shapes_data(24)}", "training.distributed=fsdp"])
    plan = F.FleetPlanner(resolve(loaded, CPU, ONE)).plan(_fleet("a100-80gb", 4))
    assert plan.strategy == "fsdp" and plan.strategy_kept
    assert plan.others["ddp"].startswith("would fit")
    lora = load_profile("tiny", [f"data.data_path={shapes_data(24)}", "stage=lora"])
    plan = F.FleetPlanner(resolve(lora, CPU, ONE)).plan(_fleet("a100-80gb", 4))
    assert plan.strategy == "ddp" and "not for this profile" in plan.others["fsdp"]


def test_compare_sorts_by_cost_and_marks_the_cheapest_that_fits(tiny_planner: F.FleetPlanner) -> None:
    small = custom_gpu("name=small,memory_gib=0.1,bf16_tflops=100,tf32_tflops=50,link_gbps=10")
    fleets = [_fleet("h100", 8), _fleet("l4", 1), F.Fleet(small, 1), _fleet("a100-80gb", 2)]
    prices = {"h100-sxm": 3.0, "l4": 0.8, "small": 0.01, "a100-80gb": 1.8}
    comparison = F.compare([tiny_planner.plan(f, prices[f.gpu.key]) for f in fleets], max_hours=None)
    costs = [p.cost_usd for p in comparison.plans if p.fits]
    assert costs == sorted(costs) and comparison.by == "cost"
    assert comparison.plans[-1].fleet.gpu.key == "small" and not comparison.plans[-1].fits  # the context alone is over
    assert comparison.cheapest == 0 and comparison.plans[0].cost_usd == min(costs)
    fastest = min(p.run_hours for p in comparison.plans if p.fits)
    in_time = F.compare(comparison.plans, max_hours=fastest)
    assert in_time.plans[in_time.cheapest_in_time].run_hours == fastest
    assert [p.fleet.name for p in in_time.plans] == [p.fleet.name for p in comparison.plans]


def test_the_largest_micro_batch_that_fits_with_the_margin_wins_over_a_tight_one(
    tiny_planner: F.FleetPlanner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without checkpointing 4 and 2 records fit only within the estimate's error, 1 with its margin.
    fits = {(4, False): "tight", (2, False): "tight", (1, False): "fits"}
    memory = F.GpuMemory(0, 0, 0, 0, 0, 0, 0)

    def choice(strategy, fleet, b, a, checkpointing, peak):  # type: ignore[no-untyped-def]
        fit = fits.get((b, checkpointing), "over")
        return F.Choice(strategy, b, a, checkpointing, memory, fit, 1.0, F._NO_COMMUNICATION, 1.0 * a, 1, 1.0)

    monkeypatch.setattr(tiny_planner, "_choice", choice)
    best = tiny_planner._best("ddp", _fleet("l4", 1), [(4, 1), (2, 2), (1, 4)], 1.0)
    assert isinstance(best, F.Choice) and (best.micro_batch, best.fit, best.checkpointing) == (1, "fits", False)
    # When nothing fits with the margin, the largest tight micro-batch does.
    fits[(1, False)] = "over"
    best = tiny_planner._best("ddp", _fleet("l4", 1), [(4, 1), (2, 2), (1, 4)], 1.0)
    assert isinstance(best, F.Choice) and (best.micro_batch, best.fit) == (4, "tight")


def test_a_fleet_plan_batches_the_exact_token_counts_that_data_check_kept(cache, shapes) -> None:
    from llavactl.data.check import check_dataset
    from llavactl.data.dataset import Batching, micro_batch_work
    from llavactl.data.tokens import TokenContext

    loaded = load_profile("tiny", [f"data.data_path={shapes}"])
    profile = loaded.profile
    assembled = P.build_meta(profile, gradient_checkpointing=False)
    context = TokenContext(assembled.tokenizer, assembled.image_token_id, assembled.image_spec)
    check_dataset(shapes, shapes.parent, "vicuna_v1", profile.data.max_seq_len, context)
    planner = F.FleetPlanner(resolve(loaded, CPU, ONE))
    assert planner.tokens.source == "all 8 of 8 records (token counts kept by `data check`)"
    plan = planner.plan(_fleet("l4", 2))
    c = plan.choice
    assert c is not None and planner.lengths is not None
    # The run's batching (its seed's shuffle) recut into the fleet's micro-batches of records.
    batching = Batching(c.micro_batch, profile.seed, profile.data.group_by_modality_length, profile.data.padding_free)
    work = micro_batch_work(planner.lengths.lengths, planner.lengths.text_only, batching)
    assert c.tokens_per_step == pytest.approx(work.tokens * c.accumulation * 2)
    assert plan.tokens_per_second_per_gpu == pytest.approx(c.tokens_per_step / c.seconds_per_step / 2)


@pytest.mark.parametrize(
    ("device", "key"),
    [
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", "l40s"),
        ("Tesla T4", "t4"),
        ("Tesla V100-SXM2-32GB", "v100"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ],
)
def test_torchs_device_names_find_the_table_mfu_and_the_planner_share(device: str, key: str) -> None:
    from llavactl.resolve.gpus import gpu_of_device

    gpu = gpu_of_device(device)
    assert gpu is not None and gpu.key == key
    assert gpu_of_device("Some New GPU") is None
