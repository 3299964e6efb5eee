"""The training recipe behind ``llavactl train``: setup, the loop, checkpoints, cleanup."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llavactl.config.loader import LoadedProfile
from llavactl.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    Interrupted,
    LlavactlError,
    ModelSourceError,
    TrainingError,
)
from llavactl.train import checkpoint
from llavactl.train.metrics import MetricsWriter, library_versions, peak_memory_bytes, write_run_record
from llavactl.train.optimizer import build_optimizer, build_scheduler
from llavactl.train.progress import StepStats, TrainingProgress

if TYPE_CHECKING:
    import torch

    from llavactl.resolve.run import ResolvedRun
    from llavactl.train.run_folder import RunFolderLock
    from llavactl.train.step import StepOutcome, TrainingStep

_SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class TrainResult:
    """How a run ended. ``losses`` are the per-step losses of the steps this process ran."""

    status: str  # "completed" | "interrupted"
    step: int
    total_steps: int
    losses: list[float] = field(default_factory=list)
    bad_steps: int = 0
    checkpoint: Path | None = None
    exit_code: int = 0


class TrainRecipe:
    """Train a LLaVA model on one device with a plain PyTorch loop.

    Features, and the profile keys that control them:

    - Stages (``stage``): which parts train; the model side freezes the rest.
    - Optimizer: AdamW, fused where the device has the kernel, no weight decay on biases and
      norms (``training.learning_rate``, ``training.weight_decay``); the projector has its own
      learning rate (``training.mm_projector_lr``).
    - Schedule: warmup (``training.warmup_steps`` or ``training.warmup_ratio``), then cosine,
      linear or constant (``training.lr_scheduler_type``), over ``training.max_steps`` or
      ``training.num_train_epochs`` epochs.
    - Gradient accumulation (``training.gradient_accumulation_steps``) with the loss normalised
      by the supervised tokens of the whole optimizer step; gradient clipping
      (``training.max_grad_norm``).
    - Precision: fp32 by default; bf16 autocast (``training.bf16``, CUDA or CPU); fp16 autocast
      with a gradient scaler (``training.fp16``, CUDA only); TF32 matmuls (``training.tf32``), as
      resolved against the machine (:func:`llavactl.resolve.resolve`), whose problems stop the run.
    - One optimizer step is :class:`~llavactl.train.step.TrainingStep`, the unit the benchmarks and
      the planner run too.
    - Gradient checkpointing (``training.gradient_checkpointing``), seeding (``seed``).
    - Non-finite losses: the step is skipped and counted; ``training.max_bad_steps`` in a row
      stop the run, keeping the last good checkpoint.
    - Checkpoints every ``training.save_steps`` steps, at the end and on Ctrl-C/SIGTERM, at most
      ``training.save_total_limit`` kept, in ``training.output_dir``; exact resume from one.
    - Logging every ``training.logging_steps`` steps to the terminal and ``metrics.jsonl``, and to
      tensorboard/wandb (``training.report_to``): loss, learning rate, throughput, achieved FLOP/s and
      MFU (:mod:`llavactl.train.utilisation`); ``run.json`` describes the run.
    - Several processes when started by torchrun (``training.distributed``: DDP or FSDP2): each
      trains on its share of every step's batches; rank 0 logs and writes checkpoints.
    """

    def __init__(
        self,
        loaded: LoadedProfile,
        progress: TrainingProgress,
        *,
        resume: str | None = None,
        force: bool = False,
        random_weights: bool = False,
        resolved: ResolvedRun | None = None,
        start_over: bool = False,
    ) -> None:
        """``resolved``: the profile already resolved against this machine (by ``llavactl train``,
        whose doctor checks read the same object); resolved in :meth:`setup` when not given.
        ``start_over``: a run that does not resume may train into a folder holding another run, whose
        files are first moved aside (:mod:`llavactl.train.run_folder`)."""
        self._start_over = start_over
        self._lock: RunFolderLock | None = None
        self._owns_output_dir = False
        self._loaded = loaded
        self._resolved = resolved
        self._profile = loaded.profile
        self._random_weights = random_weights
        self._profile_name = str(loaded.source)
        self._training = loaded.profile.training
        self._output_dir = Path(self._training.output_dir).expanduser()
        self._progress = progress
        self._resume = resume
        self._force = force
        self._step = 0
        # The steps since the last logged one: kept in checkpoints, so that the first line logged
        # after a resume averages the same steps as it would have without the interruption.
        self._window = _Window()
        self._bad_in_a_row = 0
        self._bad_total = 0
        self._stop_signal: int | None = None
        self._metrics: MetricsWriter | None = None
        from llavactl.resolve.run import World

        self._world = World()

    def run(self) -> TrainResult:
        """``setup()``, ``train()``, and ``cleanup()`` whatever happens; a failure llavactl catches
        is recorded in ``run.json`` (``failed``, with the error) before it is raised."""
        try:
            self.setup()
            return self.train()
        except LlavactlError as exc:
            self._record_failure(str(exc))
            raise
        except RuntimeError as exc:
            if not (self._world.distributed and _lost_a_peer(exc)):
                raise
            # Another process failed (its own error says why); this one learns it in a collective.
            error = TrainingError(
                f"Process {self._world.rank} stopped: another process of this {self._world.size}-process run "
                f"ended ({str(exc).splitlines()[0][:160]}).",
                fix="read the other process's error above; the checkpoints saved so far are kept",
            )
            self._record_failure(error.message)
            raise error from None
        except (KeyboardInterrupt, Interrupted):
            self._record_failure("interrupted before a checkpoint could be saved", status="interrupted")
            raise
        finally:
            self.cleanup()

    def _record_failure(self, error: str, *, status: str = "failed") -> None:
        """``run.json`` says how the run ended, when it had got as far as its output folder."""
        if not self._world.is_main or not self._owns_output_dir:
            return  # never into a folder that another run holds
        # A folder that cannot be written: the error being raised already says why the run stopped.
        with contextlib.suppress(OSError):
            self._write_run_record(status, {"step": self._step, "bad_steps": self._bad_total, "error": error})

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Resolve the device, build model, data, optimizer and schedule; load a checkpoint to resume."""
        import torch

        from llavactl.data.source import open_source
        from llavactl.model.weights import load_trainable
        from llavactl.resolve import resolve
        from llavactl.train import distributed
        from llavactl.train.step import TrainingStep
        from llavactl.train.utilisation import StepFlops, device_peak

        resolved = self._resolved = self._resolved or resolve(self._loaded)
        resolved.raise_problems()
        self._device = resolved.torch_device()
        resolved.precision.apply_tf32()
        # Before anything is allocated: measuring a device's matmul rate (where its peak is not in
        # the table) takes memory that must not count in the run's peak.
        self._peak = device_peak(resolved)
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        self._world = resolved.world
        distributed.start(self._world)
        if self._world.distributed:
            self._setup_world()
        if self._world.is_main:
            self._claim_output_dir()
        torch.manual_seed(self._profile.seed)
        # A wrong data path or image folder is found before the model loads, which can take minutes;
        # the data's fingerprint is taken here, once, for the resume check and every save.
        self._source = open_source(self._profile.data, self._profile.seed)
        resume_from = self._find_resume()
        self._assembled = self._setup_model()
        if resume_from is not None:
            # Into the plain model: FSDP replaces the parameters with shards.
            load_trainable(self._assembled, resume_from)
        if self._world.distributed:
            # Every process built the model from the same seed (and DDP broadcasts rank 0's
            # weights besides); from here on dropout must differ between processes.
            torch.manual_seed(self._profile.seed + self._world.rank)
        self._setup_data()
        from llavactl.train.loss import TokenLoss

        self._model = distributed.wrap(
            TokenLoss(self._assembled.model),
            self._world,
            self._device,
            find_unused=self._has_text_only,
            bf16=resolved.precision.autocast == "bf16",
        )
        self._steps_per_epoch = math.ceil(len(self._loader) / self._training.gradient_accumulation_steps)
        if self._training.max_steps > 0:
            self._total_steps = self._training.max_steps
        else:
            self._total_steps = self._training.num_train_epochs * self._steps_per_epoch
        self._total_epochs = math.ceil(self._total_steps / self._steps_per_epoch)
        self._optimizer = build_optimizer(self._assembled.parameter_groups(), self._training)
        self._scheduler = build_scheduler(self._optimizer, self._training, self._total_steps)
        self._step_unit: TrainingStep = TrainingStep(
            self._model,
            self._optimizer,
            self._scheduler,
            precision=resolved.precision,
            device=self._device,
            world=self._world,
            max_grad_norm=self._training.max_grad_norm,
        )
        self._flops = StepFlops()
        if resume_from is not None:
            self._load_checkpoint(resume_from)
        if self._world.is_main:
            self._metrics = MetricsWriter(
                self._output_dir,
                self._training.report_to,
                config=self._profile.model_dump(mode="json"),
                from_step=self._step,
            )

    def _claim_output_dir(self) -> None:
        """Before anything loads: the output folder can be written, no other live run uses it, and
        it holds no other run unless this one resumes it or starts over."""
        from llavactl.train.run_folder import RunFolderLock, refuse_foreign_resume, refuse_or_move_aside

        out = self._output_dir
        checkpoint.refuse_inside_checkpoint(out, "training.output_dir")
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"training.output_dir `{out}` cannot be written: {exc.strerror or exc} ({exc.filename}).",
                fix="give `--output-dir` a folder you can write to, on a disk with room for checkpoints",
            ) from None
        self._lock = RunFolderLock(out)
        self._lock.acquire()
        if self._resume is None:
            moved = refuse_or_move_aside(out, start_over=self._start_over)
            if moved is not None:
                self._progress.milestone(f"Moved the previous run in {out} aside to {moved} (--start-over)")
        else:
            refuse_foreign_resume(out, checkpoint.resolve_resume(self._resume, out))
        self._owns_output_dir = True

    def _setup_world(self) -> None:
        """A multi-process run: quiet non-zero ranks, and say how the work is shared."""
        from rich.console import Console

        if not self._world.is_main:
            self._progress = TrainingProgress(Console(quiet=True), quiet=True)
        self._progress.milestone(
            f"Training on {self._world.size} processes ({self._world.strategy} over {self._world.backend}); rank 0 "
            "logs and saves checkpoints"
        )

    def _find_resume(self) -> Path | None:
        if self._resume is None:
            return None
        folder = checkpoint.resolve_resume(self._resume, self._output_dir)
        if folder is None:
            self._progress.milestone(f"No checkpoint in {self._output_dir} yet: starting from step 0.")
            return None
        checkpoint.verify_checkpoint(folder)
        saved = checkpoint.read_progress(folder)
        checkpoint.require_resume_fields(saved, folder)
        checkpoint.check_same_world(folder, saved.get("world_size", 1), self._world.size)
        differences = checkpoint.resume_differences(
            saved["profile"], self._profile_json(), saved["data_fingerprint"], self._source.fingerprint
        )
        checkpoint.check_resume_compatible(folder, differences, force=self._force)
        if differences:
            self._progress.milestone(f"Resuming with changed settings (--force): {'; '.join(differences)}")
        if self._world.is_main:
            from llavactl.train.run_folder import set_aside_later_checkpoints

            later = set_aside_later_checkpoints(self._output_dir, folder)
            if later is not None:
                self._progress.milestone(
                    f"Moved the checkpoints after {folder.name} aside to {later}: this run writes its own"
                )
        return folder

    def _setup_model(self) -> Any:
        from llavactl.model.assembly import build_llava

        model_cfg = self._profile.model
        self._progress.milestone(
            f"Loading model: {model_cfg.model_name_or_path} + {model_cfg.vision_tower} (stage {self._profile.stage})"
        )
        assembled = build_llava(
            model_cfg,
            self._profile.stage,
            image_size=self._profile.data.image_size,
            seed=self._profile.seed,
            gradient_checkpointing=self._training.gradient_checkpointing,
            device=str(self._device),
            random_weights=self._random_weights,
            compute_dtype=self._resolved.precision.autocast_dtype(),
        )
        if self._profile.data.padding_free:
            from llavactl.model.attention import check_records_stay_apart, use_varlen_kernel
            from llavactl.train.loss import llava_of

            language_model = llava_of(assembled.model).model.language_model
            precision = self._resolved.precision
            half = precision.autocast is not None or self._profile.stage == "qlora"
            said = use_varlen_kernel(language_model, self._device.type, half_precision=half)
            if said:
                self._progress.milestone(f"Padding-free rows: {said}")
            check_records_stay_apart(language_model, precision.autocast_context(self._device.type))
        trainable = sum(p.numel() for group in assembled.parameter_groups().values() for _, p in group)
        total = sum(p.numel() for p in assembled.model.parameters())
        self._progress.milestone(
            f"Model loaded in {assembled.load_seconds:.1f} s: {trainable:,} of {total:,} parameters trainable"
        )
        return assembled

    def _setup_data(self) -> None:
        import torch
        from torch.utils.data import DataLoader

        from llavactl.data.dataset import Collator, ResumableSampler, TokenBudgetBatches, build_dataset

        data, t, assembled = self._profile.data, self._training, self._assembled
        if assembled.tokenizer is None:
            # Random weights stand in for weights that are not downloaded; the text still needs its tokens.
            model_cfg = self._profile.model
            source = model_cfg.tokenizer_name_or_path or model_cfg.model_name_or_path
            raise ModelSourceError(
                f"model.tokenizer_name_or_path: the tokenizer of `{source}` is not at hand, and the steps need it "
                "to encode the data (random weights can stand in for the model's weights, not for its tokenizer)",
                fix=f"download it once (`hf download {source} --include '*.json' --include '*.model' "
                "--include '*.txt'`), or point `model.tokenizer_name_or_path` at a local folder that has it",
            )
        dataset = build_dataset(self._source, data, assembled.tokenizer, assembled.image_token_id, assembled.image_spec)
        world = self._world
        modality = dataset.modality_lengths()
        self._has_text_only = bool((modality <= 0).any())
        batching: dict[str, Any]
        if data.max_tokens_per_batch:
            self._progress.milestone(f"Measuring {len(dataset):,} records in tokens for data.max_tokens_per_batch")
            self._sampler = TokenBudgetBatches(
                dataset.token_lengths(),
                data.max_tokens_per_batch,
                self._profile.seed,
                rank=world.rank,
                world_size=world.size,
            )
            # Every epoch of the run as long as its longest (binning another order can take a bin more).
            steps = math.ceil(self._sampler.batches_per_process / t.gradient_accumulation_steps)
            epochs = math.ceil(t.max_steps / steps) if t.max_steps > 0 else t.num_train_epochs
            self._sampler.plan_epochs(epochs)
            batching = {"batch_sampler": self._sampler}
        else:
            self._sampler = ResumableSampler(
                modality,
                t.per_device_train_batch_size,
                self._profile.seed,
                data.group_by_modality_length,
                rank=world.rank,
                world_size=world.size,
            )
            batching = {"batch_size": t.per_device_train_batch_size, "sampler": self._sampler}
        self._loader = DataLoader(
            dataset,
            **batching,
            collate_fn=Collator(assembled.tokenizer.pad_token_id, padding_free=data.padding_free),
            num_workers=t.dataloader_num_workers,
            pin_memory=self._device.type == "cuda",
            # Its own generator: creating an iterator must not draw from the global RNG, which
            # dropout uses, or a resumed run would see different dropout masks.
            generator=torch.Generator().manual_seed(self._profile.seed),
        )
        # Bad records are found when read (the store decodes one at a time), and counted then.
        self._skipped_records = 0
        self._skipped_by_code: Counter[str] = Counter()
        per = f" on each of {world.size} processes" if world.distributed else ""
        dropped = self._sampler.dropped_per_epoch
        left_out = f" ({dropped} records of each epoch left out so that all get as many)" if dropped else ""
        processes = f"{world.size} process{'es' if world.distributed else ''}"
        if isinstance(self._sampler, TokenBudgetBatches):
            micro = self._sampler.order(0)
            records = sum(len(b) for b in micro) / max(len(micro), 1)
            tokens = sum(self._sampler.lengths[i] for b in micro for i in b) / max(len(micro), 1)
            per_step = t.gradient_accumulation_steps * world.size
            batches = (
                f"micro-batches of up to {data.max_tokens_per_batch:,} tokens per epoch{per} ({records:.1f} records "
                f"and {tokens:,.0f} tokens each on average){left_out}; global batch {records * per_step:.1f} "
                f"records, {tokens * per_step:,.0f} tokens = 1 micro-batch per device x "
                f"{t.gradient_accumulation_steps} accumulation x {processes}"
            )
        else:
            packed = ", each packed into one row (data.padding_free)" if data.padding_free else ""
            batches = (
                f"batches of {t.per_device_train_batch_size} per epoch{per}{packed}{left_out}; global batch "
                f"{self._profile.global_batch_size * world.size} = {t.per_device_train_batch_size} per device x "
                f"{t.gradient_accumulation_steps} accumulation x {processes}"
            )
        mixed = self._source.mixed()
        self._progress.milestone(
            f"Data set processed: {len(dataset):,} records from {data.data_path}"
            + (f" ({mixed})" if mixed else "")
            + f", {len(self._loader):,} {batches}"
        )

    def _load_checkpoint(self, folder: Path) -> None:
        from llavactl.train import distributed

        saved = checkpoint.read_progress(folder, self._total_steps)
        training_state, rng = checkpoint.read_training_state(folder, self._world.rank)
        # The learning rates and weight decay of this profile, which loading the saved states would
        # replace with the saved run's: with `--force` and a new learning rate, the new one applies.
        current = [(group["initial_lr"], group["weight_decay"]) for group in self._optimizer.param_groups]
        try:
            if self._sharded:
                distributed.load_full_optimizer_state(self._model, self._optimizer, training_state["optimizer"])
            else:
                self._optimizer.load_state_dict(training_state["optimizer"])
            self._scheduler.load_state_dict(training_state["scheduler"])
            self._keep_schedule_of_this_profile(current)
            self._step_unit.load_state_dict(training_state)
            self._sampler.load_state_dict(saved["data_position"])
            checkpoint.restore_rng(rng)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            # Files whose checksums match but whose content is not what llavactl saved: written by
            # hand or by another tool (a damaged file fails its checksum before this).
            raise CheckpointError(
                f"Checkpoint {folder} does not hold the states llavactl saves ({type(exc).__name__}: "
                f"{str(exc)[:120]}).",
                fix="resume from another checkpoint of the run (`--resume PATH`)",
            ) from exc
        self._step = saved["step"]
        self._window = _Window.restored(saved.get("log_window"))
        self._bad_total = saved["bad_steps_total"]
        self._bad_in_a_row = saved["bad_steps_in_a_row"]
        self._progress.milestone(f"Resumed from {folder} at step {self._step}/{self._total_steps}")

    def _keep_schedule_of_this_profile(self, current: list[tuple[float, float]]) -> None:
        """After a resume, the schedule continues from the saved step with this profile's learning
        rates and weight decay (and its schedule shape): equal to the saved ones unless `--force`
        changed them, when a new learning rate takes effect at once, at the resumed step's point of
        the (new) schedule."""
        scheduler = self._scheduler
        scheduler.base_lrs = [base for base, _ in current]
        step = scheduler.last_epoch
        lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
        for group, (base, decay), lr in zip(self._optimizer.param_groups, current, lrs, strict=True):
            group["initial_lr"], group["weight_decay"], group["lr"] = base, decay, lr
        scheduler._last_lr = lrs

    @property
    def _sharded(self) -> bool:
        return self._world.distributed and self._world.sharded

    def _profile_json(self) -> dict[str, Any]:
        return self._profile.model_dump(mode="json")

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        """Run optimizer steps until ``total_steps``, a stop signal, or too many bad steps."""
        t = self._training
        result = TrainResult(status="completed", step=self._step, total_steps=self._total_steps)
        window = self._window
        run_started = time.perf_counter()
        steps_this_run = 0
        self._totals = _Window()  # the whole run, for run.json
        self._write_run_record("running", {})
        steps = self._step_batches()
        with self._stop_on_signals():
            self._progress.start(self._total_steps, self._step)
            while self._step < self._total_steps:
                step_started = time.perf_counter()
                micro_batches = next(steps)
                # The first step's FLOPs are counted, which slows it: its rate is left out.
                counting = not self._flops.ready
                with self._out_of_memory_as_error(), self._flops.count(micro_batches):
                    outcome = self._step_unit(micro_batches)
                seconds = time.perf_counter() - step_started
                self._step += 1
                steps_this_run += 1
                self._account(outcome, result)
                flops = None if counting else self._flops.of(micro_batches)
                for w in (window, self._totals):
                    w.add(
                        loss=outcome.loss if outcome.updated else None,
                        grad_norm=outcome.grad_norm if outcome.updated else None,
                        samples=outcome.samples,
                        tokens=outcome.tokens,
                        seconds=seconds,
                        flops=flops,
                    )
                if self._step % t.logging_steps == 0 or self._step == self._total_steps:
                    elapsed = time.perf_counter() - run_started
                    self._log(window, eta_s=elapsed / steps_this_run * (self._total_steps - self._step))
                    window = self._window = _Window()
                if self._stop_requested():
                    result.checkpoint = self.save_checkpoint()
                    result.status = "interrupted"
                    result.exit_code = _SIGNAL_EXIT_CODES.get(self._stop_signal, 1)
                    break
                # No periodic save during a run of bad steps: with save_total_limit it could push
                # the last good checkpoint out.
                due = self._step % t.save_steps == 0 and self._step < self._total_steps
                if due and self._bad_in_a_row == 0:
                    self.save_checkpoint()
            else:
                result.checkpoint = self.save_checkpoint()
        self._progress.close()
        result.step = self._step
        result.bad_steps = self._bad_total
        self._write_run_record(result.status, self._final_metrics(result, time.perf_counter() - run_started))
        return result

    def _account(self, outcome: StepOutcome, result: TrainResult) -> None:
        """Count the step as good, bad (non-finite) or empty (every record skipped); stop on too many bad."""
        if not outcome.samples:
            self._progress.milestone(f"Step {self._step}: every record was skipped as bad; no update")
            return
        result.losses.append(outcome.loss)
        if outcome.good:
            self._bad_in_a_row = 0
            return
        self._bad_in_a_row += 1
        self._bad_total += 1
        self._progress.milestone(
            f"Step {self._step}: non-finite loss or gradient ({outcome.loss}); step skipped "
            f"({self._bad_in_a_row} in a row, {self._bad_total} in all)"
        )
        if self._bad_in_a_row >= self._training.max_bad_steps:
            self._stop_on_bad_steps()

    def _step_batches(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """The micro-batches of each optimizer step; the last step of an epoch may have fewer.

        A step is always ``gradient_accumulation_steps`` batches of the loader, whether or not
        their records survive ``data.on_error: skip``, so that an epoch has the steps it was
        planned with; a step whose batches were all bad comes out empty.
        """
        accumulation = self._training.gradient_accumulation_steps
        while True:
            epoch = self._step // self._steps_per_epoch
            self._progress.epoch(epoch + 1, self._total_epochs)
            pending: list[dict[str, torch.Tensor]] = []
            seen = used = 0
            for batch in self._epoch_batches(epoch):
                seen += 1
                if batch is not None:
                    pending.append(batch)
                    used += 1
                if seen % accumulation == 0:
                    yield pending
                    pending = []
            if seen % accumulation:
                yield pending
            if not used:
                raise DataError(
                    f"epoch {epoch + 1} produced no usable record: every record was skipped as bad",
                    fix="run `llavactl data check` on the data and fix or drop the bad records",
                )

    def _epoch_batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor] | None]:
        """The batches of ``epoch`` from the sampler's position on, skipped records counted; None
        for a batch whose records were all skipped."""
        from llavactl.data.dataset import take_skipped
        from llavactl.data.packing import records_in

        self._sampler.set_epoch(epoch)
        for batch in self._loader:
            skipped = take_skipped(batch, self._profile.data.on_error)
            self._skipped_records += len(skipped)
            self._skipped_by_code.update(s.code for s in skipped)
            # The sampler cannot see what the DataLoader has prefetched, so it is told what was used.
            self._sampler.advance(len(skipped) + (records_in(batch) if "input_ids" in batch else 0))
            if skipped:
                ids = ", ".join(str(s.id) for s in skipped)
                self._progress.milestone(f"Skipped bad record(s) {ids} (data.on_error: skip)")
            yield batch if "input_ids" in batch else None

    def _by_code(self) -> str:
        return ", ".join(f"{code} {n}" for code, n in sorted(self._skipped_by_code.items()))

    @contextmanager
    def _out_of_memory_as_error(self) -> Iterator[None]:
        import torch

        try:
            yield
        except torch.OutOfMemoryError as exc:
            raise self._out_of_memory(f"the {self._device.type.upper()} device ran out of memory") from exc
        except RuntimeError as exc:
            # CPU allocation failures are plain RuntimeErrors from the allocator.
            if "can't allocate memory" not in str(exc) and "DefaultCPUAllocator" not in str(exc):
                raise
            raise self._out_of_memory("the machine ran out of RAM") from exc

    def _out_of_memory(self, what: str) -> TrainingError:
        t, data = self._training, self._profile.data
        fixes = []
        if data.max_tokens_per_batch:
            half_budget = max(data.max_tokens_per_batch // 2, data.max_seq_len)
            fixes.append(
                f"`data.max_tokens_per_batch={half_budget} training.gradient_accumulation_steps="
                f"{t.gradient_accumulation_steps * 2}` (about the same step size)"
            )
        elif t.per_device_train_batch_size > 1:
            half = t.per_device_train_batch_size // 2
            fixes.append(
                f"`training.per_device_train_batch_size={half} "
                f"training.gradient_accumulation_steps={t.gradient_accumulation_steps * 2}` (same step size)"
            )
        if not t.gradient_checkpointing:
            fixes.append("`training.gradient_checkpointing=true`")
        fixes.append(f"a shorter `data.max_seq_len` (now {self._profile.data.max_seq_len})")
        micro = (
            f"micro-batches of up to {data.max_tokens_per_batch:,} tokens"
            if data.max_tokens_per_batch
            else f"micro-batches of {t.per_device_train_batch_size} records of up to {data.max_seq_len} tokens"
        )
        return TrainingError(
            f"Step {self._step + 1}: {what} with {micro}. Checkpoints already in {self._output_dir} are kept.",
            fix="use less memory per step: " + ", or ".join(fixes),
        )

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """Turn the first Ctrl-C or SIGTERM into a stop after the current step, with a checkpoint."""

        def request_stop(signum: int, _frame: object) -> None:
            self._stop_signal = signum
            # A second Ctrl-C stops at once; the atomic save keeps the checkpoints intact.
            signal.signal(signum, previous[signum])
            again = "Ctrl-C again" if signum == signal.SIGINT else "a second SIGTERM"
            self._progress.milestone(f"Stopping after this step to save a checkpoint ({again} to stop without saving).")

        previous = {s: signal.getsignal(s) for s in _SIGNAL_EXIT_CODES}
        for s in _SIGNAL_EXIT_CODES:
            signal.signal(s, request_stop)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop_requested(self) -> bool:
        """Whether a stop signal came, to any process: they must all stop after the same step."""
        from llavactl.train.distributed import sum_across

        if not self._world.distributed:
            return self._stop_signal is not None
        return sum_across(self._world, [float(self._stop_signal is not None)], self._device)[0] > 0

    def _stop_on_bad_steps(self) -> None:
        last = checkpoint.latest_good_checkpoint(self._output_dir)
        kept = f"The last good checkpoint, {last}, is kept." if last else "No checkpoint had been saved yet."
        self._progress.close()
        raise TrainingError(
            f"{self._bad_in_a_row} steps in a row had a non-finite loss or gradient (up to step "
            f"{self._step}), so training stopped. {kept}",
            fix="lower `training.learning_rate`, keep `training.max_grad_norm` above 0, try "
            "`training.bf16=false training.fp16=false` (fp32), and run `llavactl data check` on the data",
        )

    def _log(self, window: _Window, *, eta_s: float) -> None:
        if self._metrics is None:  # not rank 0
            return
        lr = self._scheduler.get_last_lr()[0]
        flops_per_s = self._flops_per_s(window)
        stats = StepStats(
            step=self._step,
            total_steps=self._total_steps,
            epoch=self._step / self._steps_per_epoch,
            loss=window.mean_loss,
            lr=lr,
            grad_norm=window.mean_grad_norm,
            samples_per_s=window.samples / window.seconds,
            tokens_per_s=window.tokens / window.seconds,
            peak_memory_bytes=peak_memory_bytes(self._device.type),
            eta_s=eta_s,
            mfu=None if flops_per_s is None else flops_per_s / self._peak.flops_per_s,
        )
        self._progress.step(stats)
        self._metrics.log(
            self._step,
            {
                "loss": stats.loss,
                "lr": lr,
                "grad_norm": stats.grad_norm,
                "epoch": stats.epoch,
                "samples_per_s": stats.samples_per_s,
                "tokens_per_s": stats.tokens_per_s,
                "peak_memory_bytes": stats.peak_memory_bytes,
                "bad_steps": self._bad_total,
                "skipped_records": self._skipped_records,
                # Known from the second step on (the first one's FLOPs are being counted).
                **({"flops_per_s": flops_per_s, "mfu": stats.mfu} if flops_per_s is not None else {}),
            },
        )

    def _flops_per_s(self, window: _Window) -> float | None:
        """FLOP/s of the window's steps over every process (each process computes its own share)."""
        if window.flops is None or not window.flop_seconds:
            return None
        return window.flops * self._world.size / window.flop_seconds

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>``: weights, optimizer/scheduler/scaler, RNG and the progress record.

        Every process calls it (FSDP gathers the shards, and every process's random states are
        kept); rank 0 writes, and no process goes on before the checkpoint is complete.
        """
        from llavactl.model.weights import save_trainable
        from llavactl.train import distributed

        # Gathering the random states is also the barrier before the save: every process has
        # finished the step.
        rank_rng = distributed.gather_to_main(self._world, checkpoint.capture_rng())
        if self._sharded:
            full_weights = distributed.full_trainable_state(self._model)
            optimizer_state = distributed.full_optimizer_state(self._model, self._optimizer)

            def write_weights(tmp: Path) -> None:
                distributed.write_full_weights(full_weights, tmp)
        else:
            optimizer_state = self._optimizer.state_dict()

            def write_weights(tmp: Path) -> None:
                save_trainable(self._assembled, tmp)

        folder = self._output_dir / f"{checkpoint.PREFIX}{self._step}"
        if self._world.is_main:
            self._write_checkpoint(write_weights, optimizer_state, rank_rng)
            self._progress.milestone(f"Saved {folder}")
        distributed.barrier(self._world)
        return folder

    def _write_checkpoint(
        self,
        write_weights: Callable[[Path], None],
        optimizer_state: dict[str, Any],
        rank_rng: list[dict[str, Any]] | None,
    ) -> None:
        training_state: dict[str, Any] = {
            "optimizer": optimizer_state,
            "scheduler": self._scheduler.state_dict(),
        }
        training_state.update(self._step_unit.state_dict())
        progress = {
            "step": self._step,
            "total_steps": self._total_steps,
            "epoch": self._step / self._steps_per_epoch,
            "data_position": self._sampler.state_dict(),
            "bad_steps_total": self._bad_total,
            "bad_steps_in_a_row": self._bad_in_a_row,
            "log_window": dataclasses.asdict(self._window),
            "profile": self._profile_json(),
            "data_fingerprint": self._source.fingerprint.as_json(),
            "versions": library_versions(),
            "world_size": self._world.size,
        }
        checkpoint.save_checkpoint(
            self._output_dir,
            self._step,
            write_weights=write_weights,
            training_state=training_state,
            progress=progress,
            save_total_limit=self._training.save_total_limit,
            rank_rng=rank_rng,
            # fp32 trainable weights and AdamW's two moments: what a first save needs at least.
            expected_bytes=12 * sum(p.numel() for g in self._optimizer.param_groups for p in g["params"]),
        )

    def _write_run_record(self, status: str, final_metrics: dict[str, Any]) -> None:
        if not self._world.is_main:
            return
        write_run_record(
            self._output_dir,
            {
                "status": status,
                "profile_source": self._profile_name,
                "profile": self._profile_json(),
                "seed": self._profile.seed,
                # A run that failed in its set-up may not have got as far as its device.
                "device": _describe_device(self._device) if hasattr(self, "_device") else None,
                "precision": self._resolved.precision.name if self._resolved else None,
                "world": {
                    "size": self._world.size,
                    "backend": self._world.backend,
                    "strategy": self._world.strategy,
                },
                "versions": library_versions(),
                "total_steps": getattr(self, "_total_steps", None),
                "resumed_from": self._resume,
                "final_metrics": final_metrics,
            },
        )

    def _final_metrics(self, result: TrainResult, seconds: float) -> dict[str, Any]:
        finite = [x for x in result.losses if math.isfinite(x)]
        flops_per_s = self._flops_per_s(self._totals)
        return {
            "step": self._step,
            "first_loss": finite[0] if finite else None,
            "final_loss": finite[-1] if finite else None,
            "bad_steps": self._bad_total,
            "skipped_records": self._skipped_records,
            "skipped_by_code": dict(sorted(self._skipped_by_code.items())),
            "train_seconds": round(seconds, 3),
            "flops_per_s": flops_per_s,
            "mfu": None if flops_per_s is None else flops_per_s / self._peak.flops_per_s,
            "mfu_peak_flops_per_s": self._peak.flops_per_s,
            "mfu_peak_source": self._peak.source,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        }

    def cleanup(self) -> None:
        """Close the metric writers and leave the process group; safe to call after a failed setup."""
        from llavactl.train.distributed import stop

        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        self._progress.close()
        if self._lock is not None:
            self._lock.release()
        if self._world.distributed:
            # DDP's reducer holds the process group: freed after the group is destroyed, its
            # destructor waits on a peer that may be gone, and the process hangs.
            self._model = None
            self._optimizer = None
            self._step_unit = None
            gc.collect()
        stop(self._world)


@dataclass
class _Window:
    """Figures accumulated between two logging steps."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    flops: float | None = None  # this process's FLOPs of the steps whose FLOPs are known
    flop_seconds: float = 0.0  # the seconds of those steps

    def add(
        self,
        *,
        loss: float | None,
        grad_norm: float | None,
        samples: int,
        tokens: int,
        seconds: float,
        flops: float | None = None,
    ) -> None:
        if loss is not None:
            self.losses.append(loss)
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)
        self.samples += samples
        self.tokens += tokens
        if flops is not None:
            # Seconds count only alongside FLOPs: the counted step, slowed by counting, is left out.
            self.flops = (self.flops or 0.0) + flops
            self.flop_seconds += seconds
        self.seconds += seconds

    @classmethod
    def restored(cls, saved: Any) -> _Window:
        """The window a checkpoint kept; an empty one for a checkpoint without it (or not of this shape)."""
        numbers = (int, float)
        try:
            window = cls(**saved)
            lists_ok = all(isinstance(x, numbers) for x in [*window.losses, *window.grad_norms])
            counts_ok = all(isinstance(x, numbers) for x in (window.samples, window.tokens, window.seconds))
        except TypeError:
            return cls()
        return window if lists_ok and counts_ok else cls()

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else math.nan

    @property
    def mean_grad_norm(self) -> float:
        return sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else math.nan


def _lost_a_peer(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a collective failing because another process is gone (gloo, NCCL)."""
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)
    signs = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "communicator was aborted")
    return (dist_error is not None and isinstance(exc, dist_error)) or any(sign in str(exc) for sign in signs)


def _describe_device(device: torch.device) -> dict[str, Any]:
    import os

    import torch

    described: dict[str, Any] = {
        "type": device.type,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    if device.type == "cuda":
        described["name"] = torch.cuda.get_device_name(device)
        described["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return described
