"""Every CUDA path of llavactl, on a real GPU: autocast with and without the gradient scaler, QLoRA,
fused AdamW, the fused LM-head loss, NCCL with DDP and FSDP2, out-of-memory, dry-run's memory
estimate, CUDA random states in checkpoints, and the export of a CUDA-trained run.

Skipped without CUDA. `make gpu-check` (benchmarks/gpu_check.py, docs/gpu.md) runs them with a
short benchmark and prints one JSON summary.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from helpers import train_recipe

# cuBLAS is deterministic with a fixed workspace only; read when its first handle is made, so before any test runs.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shapes64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llavactl.data.synth import write_shapes

    # 64 records: batches of 4 make one epoch of 16 steps, so a run of 16 steps sees every record.
    return write_shapes(tmp_path_factory.mktemp("shapes"), n=64, seed=0, image_size=32)


@pytest.fixture(autouse=True)
def fp32_matmuls_and_free_cache() -> Iterator[None]:
    """Each test starts with exact fp32 matmuls (the recipe sets TF32 from the profile) and an empty cache."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _overrides(shapes64: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.data_path={shapes64}",
        f"training.output_dir={output_dir}",
        "training.device=cuda",
        "training.report_to=none",
        "training.warmup_ratio=0",
        "training.warmup_steps=1",
        "training.logging_steps=1",
        *extra,
    ]


def _train(
    overrides: list[str], *, profile: str = "tiny", resume: str | None = None, random_weights: bool = False
) -> object:
    return train_recipe(overrides, name=profile, resume=resume, random_weights=random_weights)[0]


def _falls(losses: list[float]) -> bool:
    """The mean of the last three losses is below 90% of the first."""
    return sum(losses[-3:]) / 3 < 0.9 * losses[0]


def _llavactl(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "llavactl", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _random_batch(assembled: object, records: int = 2, text_tokens: int = 24) -> dict[str, torch.Tensor]:
    """Records of an image's tokens after BOS and random text whose second half is supervised, on CUDA."""
    spec = assembled.image_spec  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (records, 1 + spec.num_tokens + text_tokens), generator=generator)
    ids[:, 1 : 1 + spec.num_tokens] = assembled.image_token_id  # type: ignore[attr-defined]
    labels = ids.clone()
    labels[:, : 1 + spec.num_tokens + text_tokens // 2] = -100
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.rand(records, 3, spec.size, spec.size, generator=generator),
    }
    return {k: v.cuda() for k, v in batch.items()}


# ---------------------------------------------------------------- autocast, the scaler, resume


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_tiny_trains_under_cuda_autocast_and_resumes(
    precision: str, shapes64: Path, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """20 steps of `tiny` under bf16 autocast, or fp16 with the gradient scaler: no bad step, the loss
    falls, the checkpoint keeps the CUDA random states (and the scaler); a run resumed from step 10
    repeats steps 11-20 exactly where torch's deterministic mode found every kernel deterministic,
    else within 2% (nondeterministic kernels sum in another order, and Adam amplifies tiny gradients)."""
    from llavactl.train import checkpoint

    common = [f"training.{precision}=true", "training.max_steps=20", "training.save_steps=10"]
    whole_dir, resumed_dir = tmp_path / "whole", tmp_path / "resumed"
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            whole = _train(_overrides(shapes64, whole_dir, *common))
            resumed = _train(_overrides(shapes64, resumed_dir, *common), resume=str(whole_dir / "checkpoint-10"))
    finally:
        torch.use_deterministic_algorithms(False)

    assert whole.status == "completed" and whole.bad_steps == 0
    assert all(math.isfinite(x) for x in whole.losses), whole.losses
    assert _falls(whole.losses), whole.losses
    training_state, rng = checkpoint.read_training_state(whole_dir / "checkpoint-10", 0)
    assert len(rng["cuda"]) == torch.cuda.device_count()
    if precision == "fp16":
        assert training_state["scaler"]["scale"] > 0
    assert len(resumed.losses) == 10
    nondeterministic = sorted({str(w.message).split("\n")[0] for w in caught if "deterministic" in str(w.message)})
    record_property("resume", "tolerance" if nondeterministic else "exact")
    record_property("nondeterministic_ops", "; ".join(nondeterministic)[:500])
    if nondeterministic:
        # Step 11's forward reads only the reloaded weights; only the later steps carry the difference.
        assert resumed.losses[0] == pytest.approx(whole.losses[10], rel=1e-5)
        assert resumed.losses == pytest.approx(whole.losses[10:], rel=2e-2)
    else:
        assert resumed.losses == whole.losses[10:]


# ---------------------------------------------------------------- kernels


def test_adamw_is_fused_on_cuda() -> None:
    from llavactl.config.schema import TrainingConfig
    from llavactl.train.optimizer import build_optimizer

    weight = torch.nn.Parameter(torch.ones(8, 8, device="cuda"))
    optimizer = build_optimizer(
        {"llm": [("layer.weight", weight)]}, TrainingConfig(learning_rate=0.1, weight_decay=0.0)
    )
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert optimizer.defaults["fused"] is True
    assert torch.allclose(weight, torch.full_like(weight, 0.9), atol=1e-3)  # Adam's first step: lr x sign


def test_fused_head_loss_equals_cross_entropy_on_cuda_with_less_memory() -> None:
    """local_lite's head: 63 supervised rows, a 49,153-token vocabulary, fp32 outside autocast."""
    from llavactl.train.linear_cross_entropy import summed_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(576, 49153, bias=False, device="cuda")
    rows = torch.randn(63, 576, device="cuda")
    targets = torch.randint(0, 49153, (63,), device="cuda")

    def fused(hidden: torch.Tensor) -> torch.Tensor:
        return summed_cross_entropy(head, hidden, targets)

    def plain(hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")

    def run(
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """The loss, both gradients, and the memory peak of the forward and backward above what existed."""
        head.weight.grad = None
        hidden = rows.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = loss_fn(hidden)
        loss.backward()
        peak = torch.cuda.max_memory_allocated() - before
        return loss.detach(), hidden.grad, head.weight.grad, peak

    (fused_loss, fused_hidden, fused_weight, _), (plain_loss, plain_hidden, plain_weight, _) = run(fused), run(plain)
    assert torch.allclose(fused_loss, plain_loss, rtol=1e-5)
    assert torch.allclose(fused_hidden, plain_hidden, rtol=1e-4, atol=1e-6)
    assert torch.allclose(fused_weight, plain_weight, rtol=1e-4, atol=1e-6)
    # With a frozen head (LoRA) the weight's gradient, the same in both, no longer dominates the peak:
    # the fused path ran if it kept one (rows x vocabulary) buffer where the plain path needs three.
    head.weight.requires_grad_(False)
    fused_peak, plain_peak = run(fused)[3], run(plain)[3]
    assert fused_peak < 0.6 * plain_peak, (fused_peak, plain_peak)


# ---------------------------------------------------------------- QLoRA


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama saved as a pretrained folder: QLoRA quantizes weights from files, not builtin models.
    Width 256 gives bitsandbytes' kernels whole blocks; the vocabulary is the builtin tokenizer's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llavactl.model.builtin import BYTE_VOCAB_SIZE

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    folder = tmp_path_factory.mktemp("small-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _qlora_overrides(small_llama: Path, bits: int) -> list[str]:
    return [
        "stage=qlora",
        "model.use_qlora=true",
        f"model.load_in_4bit={str(bits == 4).lower()}",
        f"model.load_in_8bit={str(bits == 8).lower()}",
        "model.bnb_4bit_quant_type=nf4",
        "model.bnb_4bit_use_double_quant=true",
        f"model.model_name_or_path={small_llama}",
        "model.tokenizer_name_or_path=builtin:tiny-llama",
        "model.lora_target_modules=[q_proj,k_proj,v_proj,o_proj]",
        "training.bf16=true",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_quantizes_the_llm_and_trains(bits: int, small_llama: Path, shapes64: Path, tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from llavactl.config.loader import load_profile
    from llavactl.model.assembly import build_llava

    overrides = _overrides(shapes64, tmp_path, *_qlora_overrides(small_llama, bits), "training.max_steps=20")
    profile = load_profile("tiny", overrides).profile
    assembled = build_llava(profile.model, "qlora", image_size=profile.data.image_size, seed=0, device="cuda")
    layers = assembled.model.model.language_model.layers
    if bits == 4:
        quantized = [m for m in layers.modules() if isinstance(m, bnb.nn.Linear4bit)]
        states = {(m.weight.quant_state.quant_type, m.weight.quant_state.nested) for m in quantized}
        assert states == {("nf4", True)}  # nf4 with double quantization
    else:
        quantized = [m for m in layers.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
        assert {m.weight.dtype for m in quantized} == {torch.int8}
    assert len(quantized) == 7 * len(layers)  # q, k, v, o, gate, up, down
    trainable = [n for n, p in assembled.model.named_parameters() if p.requires_grad]
    llm_trainable = [n for n in trainable if ".language_model." in n]
    assert llm_trainable and all("lora_" in n for n in llm_trainable)
    del assembled

    result = _train(overrides)
    assert result.status == "completed" and result.bad_steps == 0
    assert all(math.isfinite(x) for x in result.losses) and _falls(result.losses), result.losses
    assert (result.checkpoint / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- NCCL


@pytest.fixture
def nccl_group() -> Iterator[None]:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("nccl_group")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_process_trains_over_nccl_with_bf16(strategy: str) -> None:
    """The recipe's wrapper, optimizer, clipping and full-state gathering over an NCCL group of one rank.

    ``wrap`` wraps only when the World has several processes; a second NCCL rank on the same GPU is
    refused, so the World here says two while the group has one rank (DDP and FSDP use the group).
    The two-GPU test below runs the whole recipe under torchrun.
    """
    from llavactl.config.loader import load_profile
    from llavactl.config.schema import TrainingConfig
    from llavactl.model.assembly import build_llava
    from llavactl.resolve import Precision, World
    from llavactl.train import distributed
    from llavactl.train.loss import TokenLoss
    from llavactl.train.optimizer import build_optimizer
    from llavactl.train.step import TrainingStep

    profile = load_profile("tiny", []).profile
    assembled = build_llava(profile.model, "full", image_size=profile.data.image_size, seed=0, device="cuda")
    seen: list[torch.dtype] = []
    q_proj = assembled.model.model.language_model.layers[0].self_attn.q_proj
    q_proj.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    world = World(size=2, local_size=2, rank=0, local_rank=0, backend="nccl", strategy=strategy)
    device = torch.device("cuda", 0)
    wrapped = distributed.wrap(TokenLoss(assembled.model), world, device, find_unused=False, bf16=True)
    optimizer = build_optimizer(assembled.parameter_groups(), TrainingConfig(learning_rate=2e-3))
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    # The training step's unit, over a world that says two processes while its group has one: the
    # loss it reports is still the per-token loss; the gradients are twice theirs (clipped anyway).
    step = TrainingStep(wrapped, optimizer, precision=Precision(autocast="bf16"), device=device, world=world)
    batch = _random_batch(assembled)
    losses = []
    for _ in range(10):
        outcome = step([batch])
        losses.append(outcome.loss)
        assert outcome.good and math.isfinite(outcome.grad_norm)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.9 * losses[0], losses
    assert optimizer.defaults["fused"] is True
    if strategy == "fsdp":
        assert set(seen) == {torch.bfloat16}  # MixedPrecisionPolicy: gathered in bf16
        assert {p.dtype for p in parameters} == {torch.float32}  # the shards, which AdamW updates
        # What a sharded checkpoint writes: every trainable weight, as fp32 shards, and AdamW's states.
        state = distributed.sharded_state(wrapped, optimizer)
        names = {n for n, p in assembled.model.named_parameters() if p.requires_grad}
        assert set(state["weights"]) == names
        assert all(t.dtype == torch.float32 for t in state["weights"].values())
        assert state["optimizer"]["state"]
    else:
        assert set(seen) == {torch.float32}  # autocast casts per op; the module keeps fp32 weights


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_train_over_nccl(strategy: str, shapes64: Path, tmp_path: Path) -> None:
    out = tmp_path / strategy
    overrides = _overrides(
        shapes64, out, f"training.distributed={strategy}", "training.bf16=true", "training.max_steps=8",
        "training.per_device_train_batch_size=2", "training.save_steps=4",
    )  # fmt: skip
    done = _llavactl("train", "--profile", "tiny", *overrides, "--nproc-per-node", "2", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Training on 2 processes ({strategy} over nccl)" in done.stdout
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["world"] == {"size": 2, "backend": "nccl", "strategy": strategy}
    resumed = _llavactl("train", "--profile", "tiny", *overrides, "--nproc-per-node", "2", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr


# ---------------------------------------------------------------- out of memory


@pytest.mark.parametrize("probe", [True, False])
def test_cuda_out_of_memory_is_one_paragraph_with_the_overrides_that_fit(
    probe: bool, shapes64: Path, tmp_path: Path
) -> None:
    """The process may use 128 MiB more than it holds now: the tiny model fits, a batch of 64 records of
    ~300 tokens does not (about 400 MiB of activations). On CUDA the memory probe runs the worst
    micro-batch before step 1 by default, so the run stops there; without it, in step 1."""
    from llavactl.errors import TrainingError

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 128 * 1024**2) / total)
    try:
        with pytest.raises(TrainingError) as raised:
            batch = ["training.per_device_train_batch_size=64", "training.max_steps=2"]
            _train(_overrides(shapes64, tmp_path, *batch, f"training.memory_probe={str(probe).lower()}"))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    error = raised.value
    assert isinstance(error.__cause__, torch.OutOfMemoryError)
    assert "\n" not in error.message
    when = "Before step 1" if probe else "Step 1"
    assert error.message.startswith(f"{when}: the CUDA device ran out of memory with micro-batches of 64 records")
    assert "training.per_device_train_batch_size=32 training.gradient_accumulation_steps=2" in error.fix
    assert "training.gradient_checkpointing=true" in error.fix
    assert "data.max_seq_len" in error.fix


# ---------------------------------------------------------------- dry-run's memory estimate


def _estimated_bytes(profile: str, overrides: list[str]) -> int:
    """dry-run's estimate of the step's tensors: its total less the process and CUDA context."""
    done = _llavactl("dry-run", "--profile", profile, "--json", *overrides)
    assert done.returncode == 0, done.stdout + done.stderr
    memory = json.loads(done.stdout)["memory"]
    return memory["total"] - memory["runtime"]


def _measured_bytes(profile: str, overrides: list[str], *, random_weights: bool) -> int:
    """torch's peak of allocated CUDA memory over a run, less what was allocated before it.

    cuBLAS keeps a workspace per thread and stream in the caching allocator; a matmul forward and
    backward first makes those of this thread and of autograd's, which dry-run does not count.
    """
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.ones(64, 64, device="cuda", dtype=dtype, requires_grad=True)
        (a @ a).sum().backward()
        torch.nn.functional.linear(a, a, a[0]).sum().backward()  # addmm: cuBLASLt's workspace
    del a
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _train(overrides, profile=profile, random_weights=random_weights)
    return torch.cuda.max_memory_allocated() - before


def _estimated_and_measured(
    profile: str, overrides: list[str], record_property: Callable[[str, object], None], *, random_weights: bool
) -> tuple[int, int]:
    """dry-run's estimate and the measured peak, both kept in the test's junit record."""
    estimated = _estimated_bytes(profile, overrides)
    measured = _measured_bytes(profile, overrides, random_weights=random_weights)
    record_property("estimated_bytes", estimated)
    record_property("measured_bytes", measured)
    return estimated, measured


@pytest.mark.slow
def test_dry_run_estimates_tiny_within_15_percent(
    shapes64: Path, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    # One epoch (16 steps of 4): the batch with the longest record, which dry-run plans for, is in it.
    overrides = _overrides(shapes64, tmp_path, "training.max_steps=16", "training.save_steps=100")
    estimated, measured = _estimated_and_measured("tiny", overrides, record_property, random_weights=False)
    assert abs(estimated - measured) <= 0.15 * measured, (estimated, measured)


@pytest.mark.slow
def test_dry_run_estimates_local_lite_shapes_within_15_percent(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """local_lite's models in their shapes with random weights (fp32, LoRA, gradient checkpointing),
    the builtin tokenizer and 16 shapes records: two steps of 8 see every record."""
    from llavactl.data.synth import write_shapes

    data = write_shapes(tmp_path / "shapes", n=16, seed=0, image_size=32)
    overrides = [
        *_overrides(data, tmp_path / "run", "training.max_steps=2", "training.save_steps=100"),
        f"data.image_folder={data.parent}",
        "model.tokenizer_name_or_path=builtin:tiny-llama",
    ]
    estimated, measured = _estimated_and_measured("local_lite", overrides, record_property, random_weights=True)
    assert abs(estimated - measured) <= 0.15 * measured, (estimated, measured)


# ---------------------------------------------------------------- export


@pytest.mark.slow
def test_cuda_trained_run_exports_and_reloads_with_the_same_logits(shapes64: Path, tmp_path: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    from llavactl.config.loader import load_profile
    from llavactl.model.assembly import build_llava
    from llavactl.model.weights import load_trainable

    overrides = _overrides(shapes64, tmp_path / "run", "training.bf16=true", "training.max_steps=8")
    result = _train(overrides)
    done = _llavactl("export", str(tmp_path / "run"), str(tmp_path / "out"), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["max_logit_difference"] <= report["tolerance"]

    profile = load_profile("tiny", overrides).profile
    trained = build_llava(profile.model, "full", image_size=profile.data.image_size, seed=0, device="cuda")
    load_trainable(trained, result.checkpoint)
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).cuda()
    batch = _random_batch(trained)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        expected = trained.model.eval()(**inputs).logits
        reloaded = exported.eval()(**inputs).logits
    assert (reloaded - expected).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- padding-free rows


def test_padding_free_rows_on_cuda_give_the_padded_loss_and_keep_records_apart(shapes64: Path) -> None:
    from helpers import profile

    from llavactl.data.dataset import Collator, build_dataset
    from llavactl.data.source import open_source
    from llavactl.model.assembly import build_llava
    from llavactl.model.attention import check_records_stay_apart, use_varlen_kernel
    from llavactl.train.loss import TokenLoss, llava_of

    prof = profile("tiny", f"data.data_path={shapes64}").profile
    assembled = build_llava(prof.model, prof.stage, image_size=prof.data.image_size, seed=0, device="cuda")
    language_model = llava_of(assembled.model).model.language_model
    # fp32 here, so SDPA's packed mask whether or not flash-attn is installed (it takes bf16/fp16 only).
    use_varlen_kernel(language_model, "cuda", half_precision=False)
    assert language_model.config._attn_implementation != "flash_attention_2"
    check_records_stay_apart(language_model)
    dataset = build_dataset(
        open_source(prof.data, 0), prof.data, assembled.tokenizer, assembled.image_token_id, assembled.image_spec
    )
    items = [dataset[i] for i in range(6)]
    losses = []
    for padding_free in (False, True):
        batch = Collator(assembled.tokenizer.pad_token_id, padding_free=padding_free)(items)
        with torch.no_grad():
            losses.append(TokenLoss(assembled.model)({k: v.cuda() for k, v in batch.items()}).item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_tiny_trains_padding_free_on_cuda(shapes64: Path, tmp_path: Path) -> None:
    result = _train(
        _overrides(shapes64, tmp_path, "training.max_steps=16", "data.padding_free=true", "training.bf16=true")
    )
    assert result.status == "completed" and _falls(result.losses)  # type: ignore[attr-defined]
