"""A trained model back from disk: a run folder, one of its checkpoints, or an exported folder.

`export`, `predict` and `eval` take any of the three. A checkpoint is rebuilt from the profile it
saved (QLoRA adapters on the unquantized LLM: 4-bit kernels need CUDA, and merging dequantizes
anyway); an exported folder is read with plain transformers, as any user of it would.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llavactl.errors import DataError, ModelSourceError

if TYPE_CHECKING:
    import torch

    from llavactl.config.schema import DataConfig, Profile
    from llavactl.model.assembly import AssembledModel
    from llavactl.model.export import ExportDtype, ExportResult
    from llavactl.train.generate import Predictor

# Records of the training data that an export's logits are checked on.
PARITY_RECORDS = 4


def checkpoint_folder(path: Path) -> Path:
    """``path`` itself when it is a checkpoint, else the latest checkpoint of the run folder ``path``."""
    from llavactl.train.checkpoint import PREFIX, STATE_FILE, checkpoint_step, latest_checkpoint

    if checkpoint_step(path) is not None:
        return path
    if not path.exists():
        raise ModelSourceError(
            f"`{path}` does not exist.",
            fix="pass an exported folder, a run folder (training.output_dir) or one of its checkpoint folders",
        )
    latest = latest_checkpoint(path)
    if latest is None:
        raise ModelSourceError(
            f"`{path}` is neither a llavactl checkpoint (a `{PREFIX}<step>` folder with {STATE_FILE}), nor a run "
            "folder holding one, nor a folder written by `llavactl export`.",
            fix="pass a run folder (training.output_dir) or one of its checkpoint folders",
        )
    return latest


def _saved_profile(saved: dict[str, Any], where: Path) -> Profile:
    from pydantic import ValidationError

    from llavactl.config.schema import Profile

    try:
        return Profile.model_validate(saved)
    except ValidationError as exc:
        raise ModelSourceError(
            f"The profile saved in `{where}` does not validate with this llavactl version: {exc.errors()[0]['msg']}.",
            fix="use the llavactl version that trained the checkpoint",
        ) from exc


def load_checkpoint(path: Path) -> tuple[AssembledModel, Profile, Path]:
    """The model of a checkpoint (or a run's latest), rebuilt from its saved profile, in eval mode;
    with the profile and the checkpoint folder."""
    from llavactl.model.assembly import build_llava
    from llavactl.model.export import inference_stage
    from llavactl.model.weights import load_trainable
    from llavactl.train.checkpoint import STATE_FILE, read_progress, verify_checkpoint

    folder = checkpoint_folder(path)
    verify_checkpoint(folder)
    profile = _saved_profile(read_progress(folder)["profile"], folder / STATE_FILE)
    assembled = build_llava(
        profile.model, inference_stage(profile.stage), image_size=profile.data.image_size, seed=profile.seed
    )
    load_trainable(assembled, folder)
    assembled.model.eval()
    return assembled, profile, folder


def load_predictor(path: Path, data: DataConfig | None = None) -> Predictor:
    """A predictor for an exported folder, a run folder or a checkpoint; it asks questions with
    ``data``'s template and image settings, by default those the model was trained with."""
    from llavactl.model.export import MANIFEST, ExportManifest, load_export_processor, load_exported_model
    from llavactl.train.generate import Predictor

    manifest = ExportManifest.read(path)
    if manifest is None:
        assembled, profile, _ = load_checkpoint(path)
        model = assembled.peft_model if assembled.peft_model is not None else assembled.model
        spec, tokenizer, token_id = assembled.image_spec, assembled.tokenizer, assembled.image_token_id
        return Predictor(model, tokenizer, token_id, spec, data or profile.data)
    profile = _saved_profile(manifest.profile, path / MANIFEST)
    model = load_exported_model(path)
    processor = load_export_processor(path)
    return Predictor(model, processor.tokenizer, processor.image_token_id, manifest.image_spec, data or profile.data)


def _parity_batch(assembled: AssembledModel, profile: Profile) -> dict[str, torch.Tensor]:
    """The first records of the training data, prepared and collated by llavactl's data pipeline."""
    from llavactl.data.dataset import Collator, Skipped, build_dataset
    from llavactl.data.source import open_source

    dataset = build_dataset(
        open_source(profile.data, profile.seed),
        profile.data,
        assembled.tokenizer,
        assembled.image_token_id,
        assembled.image_spec,
    )
    items = [item for i in range(len(dataset)) if not isinstance(item := dataset[i], Skipped)][:PARITY_RECORDS]
    if not items:
        raise DataError(
            f"No record of {profile.data.data_path} can be prepared, so the export cannot be checked on real data.",
            fix=f"run `llavactl data check` on {profile.data.data_path}",
        )
    return Collator(assembled.tokenizer.pad_token_id)(items)


def export_run(path: Path, out_dir: Path, *, merge_lora: bool, dtype: ExportDtype) -> ExportResult:
    """Export a run's latest checkpoint (or a checkpoint) as a transformers LLaVA folder, checked on
    :data:`PARITY_RECORDS` records of its training data."""
    from llavactl.data.templates import chat_template
    from llavactl.model.export import ExportManifest, build_processor, export_model
    from llavactl.train.checkpoint import refuse_inside_checkpoint
    from llavactl.train.generate import stop_token_ids
    from llavactl.train.model_card import model_card

    refuse_inside_checkpoint(out_dir, "The export folder")
    assembled, profile, folder = load_checkpoint(path)
    data, spec = profile.data, assembled.image_spec
    template = chat_template(data.conversation_template, assembled.tokenizer)
    has_cls = assembled.model.config.vision_feature_select_strategy == "default"
    processor = build_processor(assembled.tokenizer, spec, data.image_aspect_ratio, template, has_cls_token=has_cls)
    manifest = ExportManifest(str(folder.resolve()), profile.model_dump(mode="json"), spec)
    merges = merge_lora and assembled.peft_model is not None
    card = model_card(profile, folder, title=out_dir.name or str(out_dir), dtype=dtype, merged_lora=merges)
    return export_model(
        assembled,
        processor,
        out_dir,
        _parity_batch(assembled, profile),
        manifest=manifest,
        stop_ids=stop_token_ids(data.conversation_template, assembled.tokenizer),
        merge_lora=merge_lora,
        dtype=dtype,
        extra_files=card.files(),
    )
