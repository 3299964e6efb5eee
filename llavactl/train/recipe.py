"""The training recipe behind ``llavactl train``: setup, the loop, checkpoints, cleanup.

What is not training lives beside it and is called once from here: the run folder's claim and
the resume checks (:mod:`llavactl.train.run_folder`), the sampler (:mod:`llavactl.data.sampling`),
the out-of-memory advice (:mod:`llavactl.train.out_of_memory`), stop signals
(:mod:`llavactl.train.signals`), the peer-loss rule (:mod:`llavactl.train.peer_loss`) and the
metric windows (:mod:`llavactl.train.metrics`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from llavactl.config.loader import LoadedProfile
from llavactl.data.sampling import optimizer_steps
from llavactl.errors import Interrupted, LlavactlError, OutputError
from llavactl.resolve.run import World
from llavactl.train import checkpoint
from llavactl.train.bad_steps import BadSteps
from llavactl.train.metrics import (
    MetricsWriter,
    MetricWindow,
    RunTotals,
    describe_device,
    library_versions,
    peak_memory_bytes,
    write_run_record,
)
from llavactl.train.optimizer import build_optimizer, build_scheduler
from llavactl.train.out_of_memory import out_of_memory_as_error
from llavactl.train.peer_loss import peer_loss_error
from llavactl.train.probe import Estimate, probe_enabled, probe_failure, run_probe
from llavactl.train.progress import StepStats, TrainingProgress
from llavactl.train.run_folder import RunFolderLock, claim_run_folder, resume_point
from llavactl.train.signals import StopSignals, signals_held

if TYPE_CHECKING:
    from llavactl.data.dataset import Skipped
    from llavactl.resolve.run import ResolvedRun
    from llavactl.train.step import TrainingStep


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
    - Batches: ``training.per_device_train_batch_size`` records (grouped by modality and length
      with ``data.group_by_modality_length``), or micro-batches of up to
      ``data.max_tokens_per_batch`` tokens; padding-free rows (``data.padding_free``); bad records
      stop the run or are skipped and counted (``data.on_error``). See :mod:`llavactl.data.sampling`.
    - Gradient accumulation (``training.gradient_accumulation_steps``) with the loss normalised
      by the supervised tokens of the whole optimizer step; gradient clipping
      (``training.max_grad_norm``).
    - Precision: fp32 by default; bf16 autocast (``training.bf16``, CUDA or CPU); fp16 autocast
      with a gradient scaler (``training.fp16``, CUDA only); TF32 matmuls (``training.tf32``), as
      resolved against the machine (:func:`llavactl.resolve.resolve`), whose problems stop the run.
    - One optimizer step is :class:`~llavactl.train.step.TrainingStep`, the unit the benchmarks and
      the planner run too.
    - Gradient checkpointing (``training.gradient_checkpointing``), seeding (``seed``).
    - Out of memory: one paragraph naming dry-run's memory knobs (:mod:`llavactl.config.knobs`).
    - Non-finite losses: the step is skipped and counted; ``training.max_bad_steps`` in a row
      stop the run, keeping the last good checkpoint.
    - Checkpoints every ``training.save_steps`` steps, at the end and on Ctrl-C/SIGTERM, at most
      ``training.save_total_limit`` kept, in ``training.output_dir``, which one run holds at a
      time; exact resume from one, refused when the profile or data changed (unless forced).
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
        memory_estimate: Callable[[], Estimate] | None = None,
    ) -> None:
        """``resolved``: the profile already resolved against this machine (by ``llavactl train``,
        whose doctor checks read the same object); resolved in :meth:`setup` when not given.
        ``start_over``: a run that does not resume may train into a folder holding another run, whose
        files are first moved aside (:mod:`llavactl.train.run_folder`). ``memory_estimate``: dry-run's
        estimate of the run, which the memory probe prints beside its measurement."""
        self._loaded, self._resolved, self._progress = loaded, resolved, progress
        self._profile = loaded.profile
        self._training = loaded.profile.training
        self._profile_json = loaded.profile.model_dump(mode="json")
        self._output_dir = Path(self._training.output_dir).expanduser()
        self._resume, self._force, self._start_over = resume, force, start_over
        self._memory_estimate = memory_estimate
        self._random_weights = random_weights
        self._world = World()
        self._lock: RunFolderLock | None = None  # held by rank 0 once the folder is claimed
        self._last_saved: Path | None = None  # the run's newest complete checkpoint
        self._first_epoch: int | None = None  # set by a resume on another number of processes
        self._metrics: MetricsWriter | None = None
        self._step = 0
        self._bad = BadSteps(self._training.max_bad_steps, self._output_dir)
        self._totals = RunTotals()
        self._window = MetricWindow()  # the steps since the last logged one, kept in checkpoints

    def run(self) -> TrainResult:
        """``setup()``, ``train()``, and ``cleanup()`` whatever happens; a failure llavactl catches
        is recorded in ``run.json`` (``failed``, with the error) before it is raised."""
        ended_well = False
        try:
            self.setup()
            result = self.train()
            ended_well = True
            return result
        except LlavactlError as exc:
            self._record_failure(str(exc))
            raise
        except RuntimeError as exc:
            error = peer_loss_error(self._world, exc)
            if error is None:
                raise
            self._record_failure(error.message)
            raise error from None
        except (KeyboardInterrupt, Interrupted):
            self._record_failure("interrupted before a checkpoint could be saved", status="interrupted")
            raise
        finally:
            with signals_held(raise_after=ended_well):
                self.cleanup()

    def _record_failure(self, error: str, *, status: str = "failed") -> None:
        """``run.json`` says how the run ended, when it had got as far as its output folder."""
        if self._lock is None:
            return  # never into a folder that another run holds (nor from a rank other than 0)
        # A folder that cannot be written: the error being raised already says why the run stopped.
        with contextlib.suppress(OSError):
            self._write_run_record(status, {"step": self._step, "bad_steps": self._bad.total, "error": error})

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Resolve the device, claim the output folder, build model, data, optimizer and schedule;
        load a checkpoint to resume."""
        import torch

        from llavactl.resolve import resolve
        from llavactl.train import distributed
        from llavactl.train.loss import TokenLoss
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
        world = self._world = resolved.world
        distributed.start(world)
        if world.distributed:
            if not world.is_main:
                self._progress = TrainingProgress(Console(quiet=True), quiet=True)
            self._progress.milestone(
                f"Training on {world.size} processes ({world.strategy} over {world.backend}); rank 0 "
                "logs and saves checkpoints"
            )
        say = self._progress.milestone
        if world.is_main:
            self._lock = claim_run_folder(self._output_dir, resume=self._resume, start_over=self._start_over, say=say)
        torch.manual_seed(self._profile.seed)
        # A wrong data path or image folder is found before the model loads, which can take minutes;
        # the data's fingerprint is taken here, once, for the resume check and every save.
        self._source = resolved.data()
        resume_from = None
        if self._resume is not None:
            resume_from = resume_point(
                self._resume,
                self._output_dir,
                profile=self._profile_json,
                data_fingerprint=self._source.fingerprint,
                world_size=world.size,
                force=self._force,
                set_aside=world.is_main,
                say=say,
            )
        self._last_saved = resume_from
        # FSDP's checkpoints are sharded (each process writes its part), whatever the number of
        # processes, so that they resume on any number; the others are written whole by rank 0.
        self._sharded_checkpoints = self._training.distributed == "fsdp"
        self._assembled = self._setup_model(resume_from)
        if world.distributed:
            # Every process built the model from the same seed (and DDP broadcasts rank 0's
            # weights besides); from here on dropout must differ between processes.
            torch.manual_seed(self._profile.seed + world.rank)
        self._setup_data()
        self._model = distributed.wrap(
            TokenLoss(self._assembled.model),
            world,
            self._device,
            find_unused=self._has_text_only,
            bf16=resolved.precision.autocast == "bf16",
        )
        self._steps_per_epoch = self._training.steps_per_epoch(len(self._loader))
        self._total_steps = self._training.total_steps(self._steps_per_epoch)
        self._setup_optimizer(resume_from)
        if probe_enabled(self._profile, self._device.type):
            self._probe_memory()
        self._flops = StepFlops()
        if world.is_main:
            self._metrics = MetricsWriter(
                self._output_dir, self._training.report_to, config=self._profile_json, from_step=self._step
            )

    def _setup_model(self, resume_from: Path | None) -> Any:
        """The assembled model on the device, its trainable weights from ``resume_from`` when resuming."""
        from llavactl.model.assembly import build_llava
        from llavactl.model.weights import is_sharded, load_trainable

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
            from llavactl.model.attention import prepare_padding_free
            from llavactl.train.loss import llava_of

            precision, device = self._resolved.precision, self._device.type
            half = precision.autocast is not None or self._profile.stage == "qlora"
            language_model = llava_of(assembled.model).model.language_model
            if said := prepare_padding_free(
                language_model, device, half_precision=half, autocast=precision.autocast_context(device)
            ):
                self._progress.milestone(f"Padding-free rows: {said}")
        trainable = sum(p.numel() for group in assembled.parameter_groups().values() for _, p in group)
        total = sum(p.numel() for p in assembled.model.parameters())
        self._progress.milestone(
            f"Model loaded in {assembled.load_seconds:.1f} s: {trainable:,} of {total:,} parameters trainable"
        )
        if resume_from is not None and not is_sharded(resume_from):
            # Into the plain model: FSDP replaces the parameters with shards. (A sharded checkpoint
            # is loaded into the shards, with the optimizer: `_setup_optimizer`.)
            load_trainable(assembled, resume_from)
        return assembled

    def _setup_data(self) -> None:
        import torch
        from torch.utils.data import DataLoader

        from llavactl.data.dataset import Collator, build_dataset
        from llavactl.data.sampling import choose_sampler, describe_batches

        data, t, assembled = self._profile.data, self._training, self._assembled
        tokenizer = assembled.require_tokenizer(self._profile.model)
        dataset = build_dataset(self._source, data, tokenizer, assembled.image_token_id, assembled.image_spec)
        world = self._world
        modality = dataset.modality_lengths()
        self._has_text_only = bool((modality <= 0).any())
        self._sampler, batching = choose_sampler(
            dataset, modality, self._profile, rank=world.rank, world_size=world.size, say=self._progress.milestone
        )
        self._loader = DataLoader(
            dataset,
            **batching,
            collate_fn=Collator(tokenizer.pad_token_id, padding_free=data.padding_free),
            num_workers=t.dataloader_num_workers,
            pin_memory=self._device.type == "cuda",
            # Its own generator: creating an iterator must not draw from the global RNG, which
            # dropout uses, or a resumed run would see different dropout masks.
            generator=torch.Generator().manual_seed(self._profile.seed),
        )
        mixed = self._source.mixed()
        self._progress.milestone(
            f"Data set processed: {len(dataset):,} records from {data.data_path}"
            + (f" ({mixed})" if mixed else "")
            + f", {len(self._loader):,} {describe_batches(self._sampler, self._profile, world_size=world.size)}"
        )

    def _setup_optimizer(self, resume_from: Path | None) -> None:
        """AdamW, the schedule and the step unit; when resuming, their states and the run's progress."""
        from llavactl.model.weights import is_sharded
        from llavactl.train import distributed
        from llavactl.train.step import TrainingStep

        t = self._training
        self._optimizer = build_optimizer(self._assembled.parameter_groups(), t)
        if resume_from is None:
            self._scheduler = build_scheduler(self._optimizer, t, self._total_steps)
        else:
            saved = checkpoint.read_progress(resume_from, self._total_steps)
            state, rng = checkpoint.read_training_state(resume_from, self._world.rank)
            with checkpoint.foreign_content(resume_from):
                self._sampler.load_state_dict(saved["data_position"])
            if saved.get("world_size", 1) != self._world.size:
                self._resume_on_new_world(saved["step"])
            # This profile's learning rates and weight decay, which the saved states would replace
            # with the saved run's: with `--force` and a new learning rate, the new one applies at
            # once, at the resumed step's point of the (new) schedule. Each group gets the key a
            # scheduler adds, `initial_lr`, as the saved groups have it (FSDP's loader matches keys).
            current = [(group["lr"], group["weight_decay"]) for group in self._optimizer.param_groups]
            for group in self._optimizer.param_groups:
                group["initial_lr"] = group["lr"]
            with checkpoint.foreign_content(resume_from):
                if is_sharded(resume_from):  # the weights too, each process its part
                    distributed.load_sharded(self._model, self._optimizer, resume_from)
                elif self._world.sharded:
                    distributed.load_full_optimizer_state(self._model, self._optimizer, state["optimizer"])
                else:
                    self._optimizer.load_state_dict(state["optimizer"])
                for group, (lr, decay) in zip(self._optimizer.param_groups, current, strict=True):
                    group["initial_lr"], group["weight_decay"] = lr, decay
                at_step = state["scheduler"]["last_epoch"]
                self._scheduler = build_scheduler(self._optimizer, t, self._total_steps, at_step=at_step)
        self._step_unit: TrainingStep = TrainingStep(
            self._model,
            self._optimizer,
            self._scheduler,
            precision=self._resolved.precision,
            device=self._device,
            world=self._world,
            max_grad_norm=t.max_grad_norm,
        )
        if resume_from is None:
            return
        with checkpoint.foreign_content(resume_from):
            self._step_unit.load_state_dict(state)
            if rng is not None:  # else a process the saved run did not have: its own seed's stream
                checkpoint.restore_rng(rng)
        self._step = saved["step"]
        self._window = MetricWindow.restored(saved.get("log_window"))
        self._bad.total, self._bad.in_a_row = saved["bad_steps_total"], saved["bad_steps_in_a_row"]
        self._progress.milestone(f"Resumed from {resume_from} at step {self._step}/{self._total_steps}")

    def _resume_on_new_world(self, step: int) -> None:
        """After the sampler has found its place for a resume on another number of processes
        (:func:`llavactl.train.checkpoint.check_world_change` allowed it): the loop continues in the
        sampler's epoch, and a run of ``num_train_epochs`` ends with the last epoch on this number,
        whose epochs may be a step longer or shorter (the few batches left out differ)."""
        t = self._training
        self._first_epoch = self._sampler.epoch
        if t.max_steps <= 0:
            left = t.steps_per_epoch(len(self._loader))  # of the epoch the sampler continues
            self._total_steps = step + left + (t.num_train_epochs - self._first_epoch - 1) * self._steps_per_epoch

    def _probe_memory(self) -> None:
        """The epoch's most demanding micro-batch once, without an update (:mod:`llavactl.train.probe`)."""
        out_of_memory = out_of_memory_as_error(
            self._profile, step=None, device_type=self._device.type, output_dir=self._output_dir
        )
        with out_of_memory:
            probe = run_probe(
                self._loader.dataset,
                self._loader.collate_fn,
                self._step_unit,
                self._profile,
                estimate=self._memory_estimate,
            )
        self._progress.milestone(probe.said())
        # Every process stops, or none: one that went on would wait for the others in step 1.
        from llavactl.train import distributed

        if distributed.sum_across(self._world, [float(probe.fits is False)], self._device)[0]:
            raise probe_failure(probe, self._profile, self._output_dir, elsewhere=probe.fits is not False)

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        """Run optimizer steps until ``total_steps``, a stop signal, or too many bad steps."""
        t = self._training
        result = TrainResult(status="completed", step=self._step, total_steps=self._total_steps)
        window = self._window
        run_started = time.perf_counter()
        steps_this_run = 0
        self._totals = RunTotals()  # the whole run, for run.json
        say = self._progress.milestone
        self._write_run_record("running", {})
        total_epochs = t.epochs(self._steps_per_epoch)
        steps = optimizer_steps(
            self._loader,
            self._sampler,
            accumulation=t.gradient_accumulation_steps,
            steps_per_epoch=self._steps_per_epoch,
            first_step=self._step,
            on_error=self._profile.data.on_error,
            on_epoch=lambda epoch: self._progress.epoch(epoch + 1, total_epochs),
            on_skipped=self._skipped,
            first_epoch=self._first_epoch,
        )
        with StopSignals(self._progress.milestone, lambda: self._last_saved) as signals:
            self._progress.start(self._total_steps, self._step)
            while self._step < self._total_steps:
                step_started = time.perf_counter()
                micro_batches = next(steps)
                # The first step's FLOPs are counted, which slows it: its rate is left out.
                counting = not self._flops.ready
                out_of_memory = out_of_memory_as_error(
                    self._profile, step=self._step + 1, device_type=self._device.type, output_dir=self._output_dir
                )
                with out_of_memory, self._flops.count(micro_batches):
                    outcome = self._step_unit(micro_batches)
                seconds = time.perf_counter() - step_started
                self._step += 1
                steps_this_run += 1
                if outcome.samples:
                    result.losses.append(outcome.loss)
                    self._bad.count(outcome.good, step=self._step, loss=outcome.loss, say=say)
                else:
                    say(f"Step {self._step}: every record was skipped as bad; no update")
                flops = None if counting else self._flops.of(micro_batches)
                for w in (window, self._totals.window):
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
                    window = self._window = MetricWindow()
                if signals.requested(self._world, self._device):
                    result.checkpoint = self.save_checkpoint()
                    self._progress.milestone(
                        f"{result.checkpoint.name} complete {signals.seconds_since():.1f} s after the stop signal"
                        if signals.received is not None
                        else f"{result.checkpoint.name} complete: another process was signalled to stop"
                    )
                    result.status = "interrupted"
                    result.exit_code = signals.exit_code
                    break
                # No periodic save during a run of bad steps: with save_total_limit it could push
                # the last good checkpoint out.
                due = self._step % t.save_steps == 0 and self._step < self._total_steps
                if due and self._bad.in_a_row == 0:
                    self.save_checkpoint()
            else:
                result.checkpoint = self.save_checkpoint()
        self._progress.close()
        result.step = self._step
        result.bad_steps = self._bad.total
        final = self._totals.final_metrics(
            result.losses,
            step=self._step,
            bad_steps=self._bad.total,
            seconds=time.perf_counter() - run_started,
            world_size=self._world.size,
            peak=self._peak,
            checkpoint=result.checkpoint,
        )
        self._write_run_record(result.status, final)
        return result

    def _skipped(self, skipped: list[Skipped]) -> None:
        """Bad records are found when read (the store decodes one at a time), and counted then."""
        self._totals.skipped_by_code.update(s.code for s in skipped)
        ids = ", ".join(str(s.id) for s in skipped)
        self._progress.milestone(f"Skipped bad record(s) {ids} (data.on_error: skip)")

    def _log(self, window: MetricWindow, *, eta_s: float) -> None:
        if self._metrics is None:  # not rank 0
            return
        lr = self._scheduler.get_last_lr()[0]
        flops_per_s = window.flops_per_s(self._world.size)
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
                **stats.metrics(),
                "bad_steps": self._bad.total,
                "skipped_records": self._totals.skipped_records,
                # Known from the second step on (the first one's FLOPs are being counted).
                **({"flops_per_s": flops_per_s, "mfu": stats.mfu} if flops_per_s is not None else {}),
            },
        )

    # ------------------------------------------------------------------ checkpoints and records

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>``: weights, optimizer/scheduler/scaler, RNG and the progress record.

        Every process calls it, and no process goes on before the checkpoint is complete. With
        ``training.distributed: fsdp`` every process writes its shards of the weights and optimizer
        state (torch.distributed.checkpoint) into the folder rank 0 stages; otherwise rank 0 writes
        them whole. Rank 0 writes the rest, the manifest last, and renames the folder into place.
        """
        from llavactl.model.weights import save_trainable
        from llavactl.train import distributed

        # Gathering the random states is also the barrier before the save: every process has
        # finished the step.
        rank_rng = distributed.gather_to_main(self._world, checkpoint.capture_rng())
        folder = self._output_dir / f"{checkpoint.PREFIX}{self._step}"
        # fp32 trainable weights and AdamW's two moments: what a first save needs at least.
        expected = 12 * sum(p.numel() for g in self._optimizer.param_groups for p in g["params"])
        staged: Path | None = None
        write_weights: Callable[[Path], None] = lambda tmp: save_trainable(self._assembled, tmp)  # noqa: E731
        training_state = {"scheduler": self._scheduler.state_dict(), **self._step_unit.state_dict()}
        if self._sharded_checkpoints:
            staged = self._stage_sharded(folder, expected)
            if staged is None:  # complete already (a finished run resumed)
                self._last_saved = folder
                return folder
            write_weights = lambda tmp: None  # noqa: E731  (the shards are in it)
        else:
            training_state["optimizer"] = self._optimizer.state_dict()
        if self._world.is_main:
            progress = {
                "step": self._step,
                "total_steps": self._total_steps,
                "epoch": self._step / self._steps_per_epoch,
                "data_position": self._data_position(),
                "bad_steps_total": self._bad.total,
                "bad_steps_in_a_row": self._bad.in_a_row,
                "log_window": dataclasses.asdict(self._window),
                "profile": self._profile_json,
                "data_fingerprint": self._source.fingerprint.as_json(),
                "versions": library_versions(),
                "world_size": self._world.size,
                "weights_format": "sharded" if self._sharded_checkpoints else "whole",
            }
            checkpoint.save_checkpoint(
                self._output_dir,
                self._step,
                write_weights=write_weights,
                training_state=training_state,
                progress=progress,
                save_total_limit=self._training.save_total_limit,
                rank_rng=rank_rng,
                expected_bytes=expected,
                staged=staged,
            )
            self._progress.milestone(f"Saved {folder}")
        distributed.barrier(self._world)
        self._last_saved = folder
        return folder

    def _stage_sharded(self, folder: Path, expected_bytes: int) -> Path | None:
        """Rank 0 stages ``folder``'s hidden twin, then every process writes its shards into it;
        None when ``folder`` is complete already. A failed write on any process fails every one of
        them (rank 0 removes the staged folder): the checkpoints saved before are intact."""
        from llavactl.train import distributed

        tmp: Path | None = None
        error: LlavactlError | None = None
        if self._world.is_main:
            try:
                tmp = checkpoint.stage_checkpoint(self._output_dir, self._step, expected_bytes=expected_bytes)
            except LlavactlError as exc:
                error = exc
        # Rank 0's answer to all: stage here, the checkpoint is there already, or the save failed.
        [said] = distributed.broadcast_from_main(self._world, [str(tmp) if tmp else ("failed" if error else None)])
        if error is not None:
            raise error
        if said == "failed":
            raise OutputError(
                f"Saving {folder} failed on process 0 (its error is above); the checkpoints saved before are intact.",
                fix="read process 0's error, then continue with `--resume auto`",
            )
        if said is None:
            return None
        staged = Path(said)
        try:
            with checkpoint.save_failures(folder, self._output_dir):
                distributed.save_sharded(distributed.sharded_state(self._model, self._optimizer), staged)
        except BaseException:
            if self._world.is_main:
                shutil.rmtree(staged, ignore_errors=True)
            raise
        return staged

    def _data_position(self) -> dict[str, Any]:
        """The sampler's position, and the epoch's micro-batches that all processes have used: what
        a resume on another number of processes starts from (:mod:`llavactl.data.sampling`)."""
        position = self._sampler.state_dict()
        steps_in_epoch = self._step - position["epoch"] * self._steps_per_epoch
        micro_batches = steps_in_epoch * self._training.gradient_accumulation_steps * self._world.size
        return {**position, "world_size": self._world.size, "global_batches": micro_batches}

    def _write_run_record(self, status: str, final_metrics: dict[str, Any]) -> None:
        if not self._world.is_main:
            return
        write_run_record(
            self._output_dir,
            {
                "status": status,
                "profile_source": str(self._loaded.source),
                "profile": self._profile_json,
                "seed": self._profile.seed,
                # A run that failed in its set-up may not have got as far as its device.
                "device": describe_device(self._device) if hasattr(self, "_device") else None,
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
