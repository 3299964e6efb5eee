"""Export a trained model as a plain transformers LLaVA folder, and prove it computes the same logits.

The folder holds `LlavaForConditionalGeneration` weights (safetensors) and config, a `LlavaProcessor`
(tokenizer with `<image>`, `LlavaImageProcessor` settings, the chat template of the profile's
conversation template, given by the caller), a generation config that stops at the template's end
of turn, and `llavactl.json` (:class:`ExportManifest`: the profile and image spec, so that llavactl
can read the folder back). A
LoRA run is either merged into the LLM or written as the base model plus a peft adapter in
`adapter/`. A model trained at another image size than its tower's own (`data.image_size`) is
written with its position embeddings resized to that size, so transformers runs it as it is.

After writing, the folder is loaded back with transformers' own `from_pretrained` and its logits
on a batch of real records are compared with those of the model in memory, in fp32. For a bf16 or
fp16 export, the model in memory first gets the same rounded weights, so that the comparison tests
the export and not the rounding. Two models that both ignore the image would pass that comparison,
so the reloaded folder's logits for the records' images are also compared with those for blank
images: equal, the export fails.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llavactl.errors import CheckFailed, ModelSourceError, OutputError
from llavactl.model import towers
from llavactl.model.assembly import component
from llavactl.model.weight_files import no_peft_checkpointing_warning, quiet_loading
from llavactl.system import is_full_disk, process_alive

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import LlavaProcessor, PreTrainedTokenizerBase

    from llavactl.config.schema import Stage
    from llavactl.data.images import ImageSpec
    from llavactl.model.assembly import AssembledModel

ExportDtype = Literal["fp32", "bf16", "fp16"]
MANIFEST = "llavactl.json"
# One of these holds an export's weights (the index names the shards of a large model).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
REEXPORT = "export the checkpoint again with `llavactl export RUN OUT_DIR`"
ADAPTER_DIR = "adapter"
TOLERANCE = 1e-5


def inference_stage(stage: Stage) -> Stage:
    """The stage to rebuild a checkpoint in for inference: QLoRA adapters go on the unquantized LLM,
    as merging them always does (4-bit kernels need CUDA; the adapters are the same)."""
    return "lora" if stage == "qlora" else stage


def build_processor(
    tokenizer: PreTrainedTokenizerBase,
    image_spec: ImageSpec,
    aspect_ratio: str,
    chat_template: str,
    *,
    has_cls_token: bool,
) -> LlavaProcessor:
    """A `LlavaProcessor` that prepares images and prompts as llavactl's data pipeline does.

    `image_aspect_ratio: pad` becomes `do_pad` (a square of the mean colour, LLaVA-1.5's
    expand2square), after which resizing the shortest edge gives the square size and the centre
    crop cuts nothing; `resize` stretches to the square size without cropping.
    """
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    side = image_spec.size
    if aspect_ratio == "pad":
        geometry: dict[str, Any] = {"do_pad": True, "size": {"shortest_edge": side}, "do_center_crop": True}
    else:
        geometry = {"do_pad": False, "size": {"height": side, "width": side}, "do_center_crop": False}
    image_processor = LlavaImageProcessorPil(
        crop_size={"height": side, "width": side},
        image_mean=list(image_spec.mean),
        image_std=list(image_spec.std),
        **geometry,
    )
    tokenizer.chat_template = chat_template
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=image_spec.patch_size,
        vision_feature_select_strategy="default" if has_cls_token else "full",
        num_additional_image_tokens=1 if has_cls_token else 0,
        chat_template=chat_template,
    )


def batch_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 logits of ``model`` (a LLaVA model or its peft wrapper) on a collated batch."""
    import torch

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits.float()


def max_difference(a: torch.Tensor, b: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """The largest absolute difference between two logit tensors at the batch's real tokens."""
    return float((a - b).abs()[attention_mask.bool()].max())


def _round_through(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every saved weight except LoRA adapters to ``dtype`` and back, in place (what saving in
    it does). Non-persistent buffers (rotary frequencies) are not saved but recomputed on loading."""
    import torch

    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor.is_floating_point() and component(name) != "lora":
                tensor.data = tensor.data.to(dtype).to(torch.float32)


@dataclass(frozen=True)
class ExportResult:
    """What was written and how closely the reloaded folder reproduces llavactl's model."""

    folder: Path
    dtype: ExportDtype
    merged_lora: bool
    adapter: Path | None  # the peft adapter folder of an unmerged LoRA export
    max_logit_difference: float  # reloaded folder against the model in memory
    merge_logit_difference: float | None  # merged against unmerged LoRA
    source: str = ""  # the checkpoint exported
    checked_records: int = 0  # records the logits were compared on
    image_logit_difference: float | None = None  # real images against blank ones; None: no image in the batch

    def as_json(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "dtype": self.dtype,
            "merged_lora": self.merged_lora,
            "adapter": str(self.adapter) if self.adapter else None,
            "max_logit_difference": self.max_logit_difference,
            "merge_logit_difference": self.merge_logit_difference,
            "tolerance": TOLERANCE,
            "source": self.source,
            "checked_records": self.checked_records,
            "image_logit_difference": self.image_logit_difference,
        }


def _torch_dtype(dtype: ExportDtype) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def _check(difference: float, what: str) -> None:
    if not difference <= TOLERANCE:
        raise CheckFailed(
            f"{what}: logits differ by up to {difference:.3g}, more than {TOLERANCE:g}.",
            fix="report this as a bug with the checkpoint's trainer_state.json (nothing was left in the export folder)",
        )


def image_difference(model: nn.Module, batch: dict[str, torch.Tensor]) -> float | None:
    """How far ``model``'s logits move when the batch's images are replaced by blank ones (every
    pixel the normalisation's mean: zeros), at the real tokens; None without images."""
    import torch

    if "pixel_values" not in batch or not batch["pixel_values"].numel():
        return None
    blank = {**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])}
    return max_difference(batch_logits(model, batch), batch_logits(model, blank), batch["attention_mask"])


def _check_uses_images(difference: float | None) -> None:
    if difference is not None and not difference > TOLERANCE:
        raise CheckFailed(
            f"The exported folder ignores the image: its logits for the records' images and for blank images "
            f"differ by {difference:.3g} at most (not more than {TOLERANCE:g}), so the vision path does not reach "
            "the LLM (a projector or tower of zeros, or image features that never replace the `<image>` tokens).",
            fix="check the checkpoint's projector (`llavactl runs show` for its run; a stage-1 projector handed "
            "over as `model.pretrain_mm_mlp_adapter`); nothing was left in the export folder",
        )


@dataclass(frozen=True)
class ExportManifest:
    """`llavactl.json` in an exported folder: what llavactl needs to read the folder back.

    ``profile`` is the training profile (as JSON), ``image_spec`` the tower's input as trained
    (size, patch size, mean, std), ``source`` the checkpoint exported; ``dtype``, ``merged_lora``
    and ``adapter`` (the peft adapter's folder, or None) describe the export itself."""

    source: str
    profile: dict[str, Any]
    image_spec: ImageSpec
    dtype: ExportDtype = "fp32"
    merged_lora: bool = False
    adapter: str | None = None

    def write(self, folder: Path) -> None:
        spec = self.image_spec
        data = {
            "source": self.source,
            "profile": self.profile,
            "image_spec": {"size": spec.size, "patch_size": spec.patch_size, "mean": spec.mean, "std": spec.std},
            "dtype": self.dtype,
            "merged_lora": self.merged_lora,
            "adapter": self.adapter,
        }
        (folder / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, folder: Path) -> ExportManifest | None:
        """The manifest of an exported folder, or None when ``folder`` is not an export."""
        from llavactl.data.images import ImageSpec

        path = Path(folder) / MANIFEST
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            saved = data["image_spec"]
            spec = ImageSpec(saved["size"], saved["patch_size"], tuple(saved["mean"]), tuple(saved["std"]))
            sides = (spec.size, spec.patch_size)
            if not all(type(n) is int and n > 0 for n in sides) or spec.size % spec.patch_size:
                raise ValueError(f"image_spec size {spec.size!r} and patch_size {spec.patch_size!r} do not fit")
            if not all(len(v) == 3 and all(isinstance(x, (int, float)) for x in v) for v in (spec.mean, spec.std)):
                raise ValueError("image_spec mean and std need three numbers each")
            return cls(
                str(data["source"]),
                dict(data["profile"]),
                spec,
                data.get("dtype", "fp32"),
                bool(data.get("merged_lora", False)),
                data.get("adapter"),
            )
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise ModelSourceError(
                f"`{path}` is not a readable llavactl export manifest ({type(exc).__name__}: {str(exc)[:200]}).",
                fix=REEXPORT,
            ) from exc


def export_model(
    assembled: AssembledModel,
    processor: LlavaProcessor,
    out_dir: Path,
    batch: dict[str, torch.Tensor],
    *,
    manifest: ExportManifest,
    stop_ids: list[int],
    merge_lora: bool,
    dtype: ExportDtype,
    extra_files: Mapping[str, bytes] | None = None,
) -> ExportResult:
    """Write ``assembled`` to ``out_dir`` as a transformers LLaVA folder and check it on ``batch``;
    ``extra_files`` (name -> bytes, e.g. the model card) are written beside it.

    ``assembled`` is changed: adapters are merged or removed and weights rounded to ``dtype``.
    Raises :class:`CheckFailed` when the reloaded folder's logits differ by more than 1e-5.
    """

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        what = "is not empty" if out_dir.is_dir() else "is a file"
        raise ModelSourceError(
            f"The export folder `{out_dir}` exists and {what}.",
            fix="pass a new or empty folder as OUT_DIR",
        )
    # Written into a hidden sibling and renamed into place once it reloads with the same logits: an
    # export that fails (a full disk, a difference, a kill) leaves no folder that looks like one.
    work = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    try:
        for left in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
            pid = left.name.rpartition("-")[2]
            if not (pid.isdigit() and process_alive(int(pid))):  # left by an export that was killed
                shutil.rmtree(left, ignore_errors=True)
        work.mkdir(parents=True)
    except OSError as exc:
        raise ModelSourceError(
            f"The export folder `{out_dir}` cannot be made: {exc.strerror or exc} ({exc.filename}).",
            fix="pass a folder under one you can write to",
        ) from None
    try:
        settings = _Settings(manifest, stop_ids, merge_lora, dtype, dict(extra_files or {}))
        result = _write_and_check(assembled, processor, work, batch, settings)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above)
        work.rename(out_dir)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":  # a full disk, a file-size limit
            full = is_full_disk(exc) or not isinstance(exc, OSError)
            raise OutputError(
                f"Writing the export to `{out_dir}` failed: {getattr(exc, 'strerror', None) or exc}. Nothing of "
                "this export was left there.",
                fix=("free space on that disk" if full else "pass a new folder you can write to")
                + ", then export again",
            ) from exc
        raise
    return replace(result, folder=out_dir, adapter=out_dir / ADAPTER_DIR if result.adapter is not None else None)


@dataclass(frozen=True)
class _Settings:
    """What :func:`export_model` writes besides the model: its manifest, stop tokens, LoRA, dtype and
    the files written beside it."""

    manifest: ExportManifest
    stop_ids: list[int]
    merge_lora: bool
    dtype: ExportDtype
    extra_files: dict[str, bytes]


def _write_and_check(
    assembled: AssembledModel,
    processor: LlavaProcessor,
    out_dir: Path,
    batch: dict[str, torch.Tensor],
    settings: _Settings,
) -> ExportResult:
    """:func:`export_model`'s work, in ``out_dir``."""
    import torch

    manifest, stop_ids, merge_lora, dtype = settings.manifest, settings.stop_ids, settings.merge_lora, settings.dtype

    peft_model = assembled.peft_model
    model: nn.Module = peft_model if peft_model is not None else assembled.model
    model.eval()
    reference = batch_logits(model, batch)
    mask = batch["attention_mask"]
    merge_difference = None
    adapter = None
    if peft_model is not None and merge_lora:
        model = peft_model.merge_and_unload()
        merge_difference = max_difference(batch_logits(model, batch), reference, mask)
        _check(merge_difference, "Merging the LoRA adapters changed the model")
    elif peft_model is not None:
        adapter = out_dir / ADAPTER_DIR
        peft_model.save_pretrained(adapter)
    target = _torch_dtype(dtype)
    if target != torch.float32:
        _round_through(model, target)
    expected = batch_logits(model, batch) if (target != torch.float32 or merge_difference is not None) else reference
    base = peft_model.unload() if adapter is not None else model
    # llavactl interpolates a tower's position embeddings when it runs at another size than its
    # own; transformers' LLaVA does not, so the export carries the table resized once.
    towers.resize_position_table(base.model.vision_tower, assembled.image_spec.size)
    base.config.vision_config.image_size = assembled.image_spec.size
    base.config.use_cache = True
    base.generation_config.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    base.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    with quiet_loading():
        base.to(target).save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    adapter_dir = ADAPTER_DIR if adapter is not None else None
    replace(manifest, dtype=dtype, merged_lora=merge_difference is not None, adapter=adapter_dir).write(out_dir)
    for name, content in settings.extra_files.items():
        (out_dir / name).write_bytes(content)

    reloaded = load_exported_model(out_dir, torch.float32)
    difference = max_difference(batch_logits(reloaded, batch), expected, mask)
    _check(difference, "The exported folder reloaded with transformers")
    # Equal logits above would also hold for two models that both ignore the image.
    uses_images = image_difference(reloaded, batch)
    _check_uses_images(uses_images)
    return ExportResult(
        out_dir,
        dtype,
        merge_difference is not None,
        adapter,
        difference,
        merge_difference,
        manifest.source,
        len(batch["input_ids"]),
        uses_images,
    )


def load_exported_model(folder: Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The exported model with plain transformers (and peft, for an unmerged adapter), in eval mode;
    :class:`ModelSourceError` naming the folder when it is incomplete or damaged."""
    from transformers import LlavaForConditionalGeneration

    # Without config.json transformers would build its default LLaVA (7B) and then fail to fit the
    # weights into it, having taken tens of GB.
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(WEIGHT_FILES[0])
    if missing:
        raise ModelSourceError(
            f"The exported folder `{folder}` has no {' and no '.join(missing)}: the export is incomplete.",
            fix=REEXPORT,
        )
    try:
        with quiet_loading():
            model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype)
            if (folder / ADAPTER_DIR).is_dir():
                from peft import PeftModel

                with no_peft_checkpointing_warning():
                    model = PeftModel.from_pretrained(model, folder / ADAPTER_DIR)
    except _load_errors() as exc:
        raise unloadable_export(folder, exc) from exc
    return model.eval()


def load_export_processor(folder: Path) -> Any:
    """The exported folder's processor (tokenizer and image processor), read by transformers."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(folder)
    except _load_errors() as exc:
        raise unloadable_export(folder, exc) from exc


def _load_errors() -> tuple[type[BaseException], ...]:
    """What transformers, peft and safetensors raise on a damaged file (truncated, not JSON, edited)."""
    from safetensors import SafetensorError

    return (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, IndexError, SafetensorError)


def unloadable_export(folder: Path, exc: BaseException) -> ModelSourceError:
    said = " ".join(str(exc).split())[:300]
    return ModelSourceError(
        f"The exported folder `{folder}` cannot be loaded ({type(exc).__name__}: {said}).", fix=REEXPORT
    )
