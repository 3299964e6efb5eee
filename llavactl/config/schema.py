"""The profile schema: every key a profile may set, its type, default and meaning.

The key names follow LLaVA's ``train.py`` arguments (and so the CPU guide's commands) wherever
such a name exists. ``docs/profiles.md`` is generated from this module
(``python -m llavactl.config.docgen``), so a field's ``description`` is its documentation.

Cross-field rules are methods named ``_rule_*`` next to the fields they relate; each returns
the problems it finds as :class:`RuleViolation` values, so that the loader can report all of
them at once with the place each value came from.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin, overload

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

Stage = Literal["projector", "lora", "qlora", "full"]


def uses_lora(stage: Stage) -> bool:
    """Whether ``stage`` trains LoRA adapters on the LLM (QLoRA's on its quantized weights)."""
    return stage in ("lora", "qlora")
Template = Literal["plain", "vicuna_v1", "llama_2", "llama_3", "chatml", "tokenizer"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Reporter = Literal["tensorboard", "wandb"]

LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
# The CPU guide's overrides that turn every quantized path off, and with it the `qlora` stage.
QUANTIZATION_OFF = "model.use_qlora=false model.load_in_4bit=false model.load_in_8bit=false"
QLORA_OFF = f"stage=lora {QUANTIZATION_OFF}"

# PIL's own `MAX_IMAGE_PIXELS`, the size it warns about as a possible decompression bomb: a quarter
# GiB decoded as RGB (9459 px square), nearly twice a 50 MP camera photo and 2.7 times an 8K frame,
# while a tower sees 224-768 px. PIL itself refuses only twice this, which left 0.5 GiB per image
# (and with `pad`, ratio times more) to a DataLoader worker.
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
# At 20:1 `pad` gives the picture a twentieth of the tower's square (17 of 336 px); beyond it a
# record is a strip of pixels, and its padded square takes 20 times the decoded image's memory.
MAX_IMAGE_ASPECT_RATIO = 20.0


@dataclass(frozen=True)
class RuleViolation:
    """A cross-field rule that does not hold: the key paths involved, what is wrong, the fix."""

    paths: tuple[str, ...]
    message: str
    fix: str


def _accepts(annotation: Any, kinds: tuple[type, ...]) -> bool:
    """Whether a field's type is one of ``kinds`` or an optional/union of them."""
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_accepts(a, kinds) for a in get_args(annotation))
    return annotation in kinds


class _Checked(BaseModel):
    """Strict where lax parsing would silently mean something else.

    Numbers must be finite (`learning_rate: .inf` trains nothing), a boolean is not a number
    (pydantic reads `max_steps: true` as 1), a path or name is not empty (`output_dir: ""`
    would write into the current folder) and text is text (no lone surrogate, `"\\ud800"`).
    Strings like `2e-4`, which YAML 1.1 leaves unparsed, still become numbers.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers_or_empty_strings(cls, value: object, info: ValidationInfo) -> object:
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and _accepts(annotation, (int, float)) and not _accepts(annotation, (bool,)):
            raise PydanticCustomError("bool_not_number", "Input should be a number, not a boolean")
        if isinstance(value, str) and not value.strip() and info.field_name in _NON_EMPTY:
            raise PydanticCustomError("empty_string", "Input should be a path or name, not an empty string")
        texts = value if isinstance(value, list) else [value]
        if any(isinstance(t, str) and not _encodable(t) for t in texts):
            # YAML's "\ud800": no file name, terminal or log can hold half of a UTF-16 pair.
            raise PydanticCustomError("lone_surrogate", "Input holds a lone surrogate (half of a UTF-16 pair)")
        return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# String keys that name a file, folder, model or tokenizer: empty, they would name the current folder.
_NON_EMPTY = frozenset(
    {
        "model_name_or_path",
        "vision_tower",
        "tokenizer_name_or_path",
        "pretrain_mm_mlp_adapter",
        "data_path",
        "image_folder",
        "eval_data_path",
        "output_dir",
    }
)


class _Section(_Checked):
    def rule_violations(self) -> list[RuleViolation]:
        """Every cross-field rule of this section that does not hold."""
        problems: list[RuleViolation] = []
        for name in sorted(dir(type(self))):
            if name.startswith("_rule_"):
                problems.extend(getattr(self, name)())
        return problems


class ModelConfig(_Section):
    """Where the vision tower, LLM and projector come from, and which parts are adapted."""

    model_name_or_path: str = Field(
        description="The causal LM: `builtin:<name>`, a Hugging Face hub id (read from the local "
        "cache) or a local folder."
    )
    vision_tower: str = Field(
        description="The vision tower (CLIP or SigLIP): `builtin:<name>`, a hub id or a local folder."
    )
    tokenizer_name_or_path: str | None = Field(
        default=None, description="The tokenizer; `null` uses `model_name_or_path`."
    )
    mm_projector_type: Literal["mlp2x_gelu", "linear"] = Field(
        default="mlp2x_gelu",
        description="Projector from vision features to LLM embeddings: LLaVA-1.5's two-layer MLP "
        "with GELU, or one linear layer.",
    )
    mm_vision_select_layer: int = Field(
        default=-2,
        description="Hidden layer of the tower whose patch features feed the projector (-2: the "
        "penultimate, as in LLaVA-1.5). The CLS token is dropped. The tower runs no layer after this one.",
    )
    pretrain_mm_mlp_adapter: str | None = Field(
        default=None,
        description="A projector from a stage-1 (projector) run to start from: a safetensors or "
        "`.bin` file in LLaVA or llava-hf key names, or a llavactl checkpoint folder.",
    )
    projector_from_scratch: bool = Field(
        default=False,
        description="Stages lora, qlora and full start the projector from random weights on purpose, "
        "without `pretrain_mm_mlp_adapter` (doctor warns otherwise: LLaVA-1.5 trains it first, in stage 1).",
    )
    freeze_vision_tower: bool = Field(
        default=True,
        description="Keep the vision tower frozen (run under no_grad). `false` trains it too.",
    )
    use_qlora: bool = Field(
        default=False,
        description="Train LoRA adapters on a 4- or 8-bit quantized LLM (bitsandbytes, CUDA only). "
        "Goes with `stage: qlora` and one of `load_in_4bit` / `load_in_8bit`.",
    )
    load_in_4bit: bool = Field(default=False, description="Load the LLM in 4 bits (QLoRA only).")
    load_in_8bit: bool = Field(default=False, description="Load the LLM in 8 bits (QLoRA only).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type for QLoRA.")
    bnb_4bit_use_double_quant: bool = Field(
        default=True, description="Quantize the 4-bit quantization constants too (QLoRA)."
    )
    lora_r: int = Field(default=16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="LLM module names that get LoRA adapters (matched by suffix).",
    )

    def _rule_one_quantization(self) -> list[RuleViolation]:
        if self.load_in_4bit and self.load_in_8bit:
            return [
                RuleViolation(
                    ("model.load_in_4bit", "model.load_in_8bit"),
                    "4-bit and 8-bit loading are both requested; a model is loaded one way.",
                    "set one of them to false, e.g. `model.load_in_8bit=false`",
                )
            ]
        return []

    def _rule_qlora_needs_quantized_load(self) -> list[RuleViolation]:
        quantized = self.load_in_4bit or self.load_in_8bit
        if self.use_qlora and not quantized:
            return [
                RuleViolation(
                    ("model.use_qlora", "model.load_in_4bit", "model.load_in_8bit"),
                    "QLoRA is requested but the LLM is not loaded quantized.",
                    "add `model.load_in_4bit=true`, or turn QLoRA off with `model.use_qlora=false`",
                )
            ]
        if quantized and not self.use_qlora:
            return [
                RuleViolation(
                    ("model.load_in_4bit", "model.load_in_8bit", "model.use_qlora"),
                    "A quantized (4/8-bit) load is requested without QLoRA; a quantized LLM can "
                    "only be trained through adapters.",
                    "add `model.load_in_4bit=false model.load_in_8bit=false`, or `stage=qlora model.use_qlora=true`",
                )
            ]
        return []


class DataConfig(_Section):
    """Which records to train on and how they become token ids and pixels."""

    data_path: str = Field(
        description="LLaVA-format records: a JSON list or JSONL file; Parquet/Arrow shards (a shard, a "
        "folder or a glob of them, or `ORG/NAME` of a Hub data set in the HF cache; see docs/data.md); a "
        "mixture YAML listing several of them with LLaVA-NeXT's sampling forms (`first:10%`, `end:5000`, "
        "`random:50%`); or `builtin:shapes` (the synthetic data set of the `tiny` profile, made on first use)."
    )
    image_folder: str | None = Field(
        default=None, description="Folder that the records' `image` paths are relative to."
    )
    eval_data_path: str | None = Field(
        default=None,
        description="Held-out records for `llavactl eval` (images relative to `image_folder`, or to "
        "the file's folder): a JSON/JSONL file, or `builtin:shapes-eval` (shapes images that "
        "training never sees).",
    )
    image_size: int | None = Field(
        default=None,
        ge=8,
        description="Square input size in pixels; `null` uses the vision tower's native size.",
    )
    image_aspect_ratio: Literal["pad", "resize"] = Field(
        default="pad",
        description="`pad`: expand to a square filled with the processor's mean colour, as "
        "LLaVA-1.5 does; `resize`: stretch to a square.",
    )
    max_image_pixels: int = Field(
        default=MAX_IMAGE_PIXELS,
        ge=1,
        description="Largest image in pixels (width x height, read from the file's header before "
        "decoding); larger images are bad records (`image_too_large`). The default is PIL's own "
        "decompression-bomb threshold, a quarter GiB decoded.",
    )
    max_image_aspect_ratio: float = Field(
        default=MAX_IMAGE_ASPECT_RATIO,
        ge=1.0,
        description="Largest ratio of an image's longer side to its shorter, read from the header; "
        "beyond it an image is a bad record (`image_aspect_ratio`): `pad` would make it a square "
        "this many times its own size, mostly padding.",
    )
    conversation_template: Template = Field(
        default="vicuna_v1",
        description="How turns are rendered and which tokens are supervised: `plain` (stage 1), "
        "`vicuna_v1`, `llama_2`, `llama_3`, `chatml`, or `tokenizer` (the tokenizer's own chat "
        "template).",
    )
    max_seq_len: int = Field(
        default=2048,
        ge=16,
        description="Longest sequence in tokens, image tokens included; longer records are cut.",
    )
    group_by_modality_length: bool = Field(
        default=False,
        description="Batch image and text-only records apart, grouped by length (LLaVA's sampler).",
    )
    on_error: Literal["raise", "skip"] = Field(
        default="raise",
        description="A bad record met during training: stop with an error naming it, or skip it and count it.",
    )
    padding_free: bool = Field(
        default=False,
        description="Lay each micro-batch's records end to end in one row, without pad tokens; every "
        "record still attends only to itself (position ids restart with each record). Trains on the "
        "same records with the same loss; saves the work spent on padding when records differ in "
        "length and `per_device_train_batch_size` > 1.",
    )
    max_tokens_per_batch: int | None = Field(
        default=None,
        ge=16,
        description="With `padding_free`: micro-batches of as many records as fit this many tokens "
        "(image tokens included), instead of `per_device_train_batch_size` records; binned "
        "first-fit decreasing within megabatches of 512 records, seeded. At least `max_seq_len`. "
        "Needs every record's exact length: the records are tokenized once before training.",
    )

    def _rule_token_budget(self) -> list[RuleViolation]:
        if self.max_tokens_per_batch is None:
            return []
        if not self.padding_free:
            return [
                RuleViolation(
                    ("data.max_tokens_per_batch", "data.padding_free"),
                    "A token budget per micro-batch packs records into one row, which needs padding-free batches.",
                    "add `data.padding_free=true`, or remove `data.max_tokens_per_batch`",
                )
            ]
        if self.max_tokens_per_batch < self.max_seq_len:
            return [
                RuleViolation(
                    ("data.max_tokens_per_batch", "data.max_seq_len"),
                    f"A micro-batch of {self.max_tokens_per_batch} tokens cannot hold a record of "
                    f"data.max_seq_len={self.max_seq_len} tokens.",
                    f"set `data.max_tokens_per_batch` to at least {self.max_seq_len}, or lower `data.max_seq_len`",
                )
            ]
        return []


class TrainingConfig(_Section):
    """The optimisation loop, precision, checkpoints and logging."""

    output_dir: str = Field(
        default="./checkpoints/run",
        description="Where checkpoints, `metrics.jsonl` and `run.json` are written.",
    )
    device: Device = Field(default="auto", description="`auto` picks CUDA, then MPS, then CPU.")
    per_device_train_batch_size: int = Field(default=1, ge=1, description="Micro-batch size per device.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(default=2e-5, gt=0.0, description="Peak learning rate.")
    mm_projector_lr: float | None = Field(
        default=None,
        gt=0.0,
        description="Learning rate of the projector; `null` uses `learning_rate`.",
    )
    weight_decay: float = Field(
        default=0.0, ge=0.0, description="AdamW weight decay (never applied to biases and norms)."
    )
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="Gradient clipping norm; 0 turns clipping off.")
    num_train_epochs: int = Field(default=1, ge=1, description="Passes over the data.")
    max_steps: int = Field(
        default=-1,
        ge=-1,
        description="Optimizer steps to run (a positive number); -1 runs `num_train_epochs` epochs instead.",
    )
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Learning-rate decay after warmup."
    )
    warmup_ratio: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Share of the steps spent warming up linearly."
    )
    warmup_steps: int = Field(default=0, ge=0, description="Warmup in steps; use this or `warmup_ratio`, not both.")
    logging_steps: int = Field(default=1, ge=1, description="Log every N optimizer steps.")
    save_steps: int = Field(default=500, ge=1, description="Save a checkpoint every N optimizer steps.")
    save_total_limit: int | None = Field(
        default=None, ge=1, description="Keep at most this many checkpoints; `null` keeps all."
    )
    bf16: bool = Field(default=False, description="bfloat16 autocast (CUDA with bf16, or a CPU with native bf16).")
    fp16: bool = Field(default=False, description="float16 autocast with a gradient scaler (CUDA only).")
    tf32: bool = Field(default=False, description="TensorFloat-32 matmuls (NVIDIA Ampere or newer).")
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute LLM activations in the backward pass: less memory, about a third "
        "more compute. A frozen vision tower is never recomputed.",
    )
    dataloader_num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes that decode images.")
    distributed: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="How several processes (started by torchrun or `--nproc-per-node`) share the "
        "work: `ddp` keeps the whole model on each; `fsdp` (FSDP2, stage `full` only) shards "
        "weights, gradients and optimizer states across them, one LLM decoder layer at a time. "
        "Ignored on one process.",
    )
    report_to: list[Reporter] = Field(
        default_factory=list,
        description="Where metrics go besides `metrics.jsonl`: `tensorboard`, `wandb`, a list of them, or `none`.",
    )
    max_bad_steps: int = Field(
        default=10,
        ge=1,
        description="Non-finite losses in a row after which the run stops (the last good checkpoint is kept).",
    )
    memory_probe: bool | None = Field(
        default=None,
        description="Before the first step, run the epoch's most demanding micro-batch (its longest records, "
        "or its fullest token budget) forward and backward once, without an update, print its measured peak "
        "beside dry-run's estimate, and stop at once if it does not fit. `null`: on CUDA only. The run "
        "trains exactly as without it.",
    )

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, value: int) -> int:
        if value == 0:
            raise PydanticCustomError("zero_steps", "0 steps would train nothing")
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_as_list(cls, value: object) -> object:
        # LLaVA's scripts pass `--report_to none` or `--report_to wandb`: accept the scalar forms.
        if value is None or value == "none":
            return []
        if isinstance(value, str):
            return [value]
        return value

    # How long the run is: one rule, read by the recipe, its token-budget sampler and dry-run.
    def steps_per_epoch(self, batches_per_epoch: int) -> int:
        """Optimizer steps of an epoch of ``batches_per_epoch`` micro-batches (the last step may have fewer)."""
        return math.ceil(batches_per_epoch / self.gradient_accumulation_steps)

    @overload
    def total_steps(self, steps_per_epoch: int) -> int: ...
    @overload
    def total_steps(self, steps_per_epoch: None) -> int | None: ...
    def total_steps(self, steps_per_epoch: int | None) -> int | None:
        """The run's optimizer steps: ``max_steps`` when set, else ``num_train_epochs`` epochs
        (None: epochs whose length is not known)."""
        if self.max_steps > 0:
            return self.max_steps
        return None if steps_per_epoch is None else self.num_train_epochs * steps_per_epoch

    def epochs(self, steps_per_epoch: int) -> int:
        """The epochs the run reads, the last one perhaps in part."""
        return math.ceil(self.total_steps(steps_per_epoch) / steps_per_epoch)

    def _rule_one_half_precision(self) -> list[RuleViolation]:
        if self.bf16 and self.fp16:
            return [
                RuleViolation(
                    ("training.bf16", "training.fp16"),
                    "bf16 and fp16 are both on; a run uses one autocast dtype.",
                    "set one of them to false, e.g. `training.fp16=false`",
                )
            ]
        return []

    def _rule_one_warmup(self) -> list[RuleViolation]:
        if self.warmup_ratio and self.warmup_steps:
            return [
                RuleViolation(
                    ("training.warmup_ratio", "training.warmup_steps"),
                    "Both warmup_ratio and warmup_steps are set; they describe the same thing.",
                    "keep one, e.g. `training.warmup_steps=0`",
                )
            ]
        return []


class Profile(_Checked):
    """A resolved training profile: what to train, on what data, and how."""

    description: str = Field(default="", description="One line shown by `llavactl profiles list`.")
    stage: Stage = Field(
        default="lora",
        description="What is trained: `projector` (tower and LLM frozen; LLaVA stage 1), `lora` "
        "(LoRA adapters on the LLM plus the projector), `qlora` (LoRA on a 4/8-bit LLM, CUDA "
        "only), `full` (the whole LLM plus the projector).",
    )
    seed: int = Field(default=42, ge=0, description="Seed for weights, data order and dropout.")
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    def rule_violations(self) -> list[RuleViolation]:
        """Every cross-field rule of the profile that does not hold, sections included."""
        problems = [*self.model.rule_violations(), *self.data.rule_violations()]
        problems += self.training.rule_violations()
        problems += self._rule_stage_matches_qlora()
        problems += self._rule_lora_keys_need_lora_stage()
        return problems

    def _rule_stage_matches_qlora(self) -> list[RuleViolation]:
        if self.stage == "qlora" and not self.model.use_qlora:
            return [
                RuleViolation(
                    ("stage", "model.use_qlora"),
                    "stage is `qlora` but `model.use_qlora` is false.",
                    "for plain LoRA add `stage=lora`; for QLoRA add `model.use_qlora=true model.load_in_4bit=true`",
                )
            ]
        if self.model.use_qlora and self.stage != "qlora":
            return [
                RuleViolation(
                    ("model.use_qlora", "stage"),
                    f"`model.use_qlora` is true on stage `{self.stage}`; QLoRA is its own stage.",
                    f"add `{QUANTIZATION_OFF}` (the CPU guide's overrides), or `stage=qlora`",
                )
            ]
        return []

    def _rule_lora_keys_need_lora_stage(self) -> list[RuleViolation]:
        if self.uses_lora:
            return []
        set_keys = [k for k in LORA_KEYS if k in self.model.model_fields_set]
        if not set_keys:
            return []
        paths = tuple(f"model.{k}" for k in set_keys)
        return [
            RuleViolation(
                ("stage", *paths),
                f"LoRA keys ({', '.join(paths)}) are set, but stage `{self.stage}` trains no "
                "LoRA adapters, so they would be ignored.",
                "remove them (e.g. `" + " ".join(f"{p}=null" for p in paths) + "`), or add `stage=lora`",
            )
        ]

    # Derived values used across commands; kept here so that every command agrees on them.
    @property
    def uses_lora(self) -> bool:
        return uses_lora(self.stage)

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step on one process (the distributed world multiplies it)."""
        return self.training.per_device_train_batch_size * self.training.gradient_accumulation_steps
