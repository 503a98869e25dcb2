"""A training run from a resolved config: setup, the phases, the outputs.

Reads top to bottom: set up the process and the data, build (or restore) the model, run each
phase's epochs (``train_one_epoch`` then ``evaluate``), checkpoint, then report and export.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from trainer import checkpoint as ckpt
from trainer.augment import AugmentSettings, BatchPreparer, batch_mixer
from trainer.config import TrainConfig, save_config
from trainer.data import scan_dataset
from trainer.errors import ConfigError
from trainer.layer_groups import family, layer_groups
from trainer.models import create_model
from trainer.phase_runner import PhaseRunner
from trainer.phases import (
    Phase,
    build_phases,
)
from trainer.pipeline import build_pipeline
from trainer.progress import log_event
from trainer.runtime import (
    DistInfo,
    configure_threads,
    dist_info_from_env,
    init_distributed,
    seed_everything,
    select_amp,
    select_device,
    shutdown_distributed,
)
from trainer.weights import (
    Preprocessing,
    load_starting_weights,
    preprocessing_for,
    resolve_weights,
)

log = logging.getLogger(__name__)


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the summary (rank 0 writes it)."""
    info = dist_info_from_env()
    if not info.is_main:
        # Rank 0 alone logs progress; the others speak up only for warnings and errors.
        logging.getLogger().setLevel(logging.WARNING)
    device = select_device(config.device, info)
    configure_threads()
    init_distributed(info, device)
    try:
        return Run(config, info, device).execute()
    finally:
        shutdown_distributed()


class Run:
    """One training process (one rank). ``execute`` is the whole run."""

    def __init__(self, config: TrainConfig, info: DistInfo, device: torch.device) -> None:
        assert config.data is not None and config.output is not None
        self.config = config
        self.info = info
        self.device = device
        self.output = Path(config.output)
        self.checkpoints = self.output / "checkpoints"
        self.from_scratch = config.weights.strip().lower() == "none"

    # ---- setup -------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        config = self.config
        seed_everything(config.seed, config.deterministic)
        assert config.data is not None
        split = scan_dataset(config.data, val_fraction=config.val_fraction, seed=config.seed)
        resume = self._find_resume()
        model, pre, weights_source = self._build_model(len(split.classes), resume)
        groups = layer_groups(model, config.arch)
        phases = self._phases([g.name for g in groups])
        aug = AugmentSettings(
            **{f.name: getattr(config, f.name) for f in dataclasses.fields(AugmentSettings)}
        )
        pipeline = build_pipeline(
            split,
            pre=pre,
            aug=aug,
            batch_size=config.batch_size,
            seed=config.seed,
            strict=config.strict_data,
            cache_max_mb=config.cache_max_mb,
            num_workers=config.num_workers,
            info=self.info,
            device=self.device,
        )
        amp_dtype, needs_scaler = select_amp(config.amp, self.device)
        channels_last = (
            config.channels_last if config.channels_last is not None else self.device.type == "cuda"
        )
        model.to(self.device)
        if channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        ema = (
            AveragedModel(
                model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True
            )
            if config.ema
            else None
        )
        self.static = {
            "arch": config.arch,
            "num_classes": len(split.classes),
            "classes": list(split.classes),
            "head": {"hidden": config.head_hidden, "dropout": config.head_dropout},
            "preprocessing": pre.to_dict(),
            "weights": weights_source,
            "dataset_fingerprint": split.fingerprint,
            "config": config.to_dict(),
        }
        if resume is not None:
            self._check_resume_fits(resume[1], split.fingerprint)
        if self.info.is_main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output / "config.yaml")
        log_event(
            log,
            "run_start",
            arch=config.arch,
            weights=weights_source,
            classes=len(split.classes),
            train_images=pipeline.train_images,
            val_images=pipeline.val_images,
            cached=pipeline.cached,
            device=str(self.device),
            amp=str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
            channels_last=channels_last,
            world_size=self.info.world_size,
            input_size=pre.input_size[0],
        )
        trainer = PhaseRunner(
            run=self,
            model=model,
            ema=ema,
            groups=groups,
            pipeline=pipeline,
            prepare=BatchPreparer(pre, self.device, channels_last),
            mixer=batch_mixer(aug, len(split.classes)),
            amp_dtype=amp_dtype,
            scaler=torch.amp.GradScaler("cuda") if needs_scaler else None,
            num_classes=len(split.classes),
        )
        return trainer.run_all(phases, resume[1] if resume else None, split.classes)

    def _find_resume(self) -> tuple[Path, dict[str, Any]] | None:
        mode = self.config.resume
        if mode == "never":
            return None
        if mode == "auto":
            found = ckpt.find_resumable(self.checkpoints)
            if found is not None:
                log.info("resuming from %s", found[0])
            return found
        path = Path(mode).expanduser()
        try:
            return path, ckpt.load(path)
        except ValueError as exc:
            raise ConfigError(f"resume: {exc}") from exc

    def _build_model(
        self, num_classes: int, resume: tuple[Path, dict[str, Any]] | None
    ) -> tuple[nn.Module, Preprocessing, str]:
        config = self.config
        model = create_model(
            config.arch,
            num_classes,
            head_hidden=config.head_hidden,
            head_dropout=config.head_dropout,
        )
        if resume is not None:
            state = resume[1]
            if state["arch"] != config.arch or state["num_classes"] != num_classes:
                raise ConfigError(
                    f"resume: {resume[0]} is a {state['arch']} with {state['num_classes']} "
                    f"classes; this run is a {config.arch} with {num_classes}; use "
                    "--resume never or another --output"
                )
            model.load_state_dict(state["model_state"])
            p = state["preprocessing"]
            pre = Preprocessing(
                (int(p["input_size"][0]), int(p["input_size"][1])),
                int(p["resize_size"]),
                tuple(p["mean"]),  # type: ignore[arg-type]
                tuple(p["std"]),  # type: ignore[arg-type]
            )
            return model, pre, str(state["weights"])
        weights = resolve_weights(config.arch, config.weights)
        dropped = load_starting_weights(model, weights)
        if dropped:
            log.info(
                "new %d-class head; the source head (%d tensors) was dropped",
                num_classes,
                len(dropped),
            )
        pre = preprocessing_for(weights, config.image_size)
        vit_size = getattr(model, "image_size", None)
        if family(config.arch) == "vit" and vit_size != pre.input_size[0]:
            raise ConfigError(
                f"image_size: {config.arch} takes {vit_size} px inputs, not {pre.input_size[0]}"
            )
        return model, pre, weights.source

    def _phases(self, group_names: list[str]) -> list[Phase]:
        config = self.config
        head_epochs = config.head_epochs
        if head_epochs is None:
            head_epochs = 0 if self.from_scratch else 2
        policy = config.unfreeze or ("all" if self.from_scratch else "top:1")
        if self.from_scratch:
            log.info(
                "weights none: training from scratch, so phase 2 trains %s layer groups and the "
                "head phase runs only when --head-epochs is given (head_epochs=%d)",
                policy,
                head_epochs,
            )
        lr = config.lr if config.lr is not None else (config.head_lr if self.from_scratch else 1e-4)
        decay = (
            config.lr_decay if config.lr_decay is not None else (1.0 if self.from_scratch else 0.3)
        )
        phases = build_phases(
            group_names,
            head_epochs=head_epochs,
            finetune_epochs=config.finetune_epochs,
            policy=policy,
            lr=lr,
            head_lr=config.head_lr,
            lr_decay=decay,
            freeze_bn=config.freeze_bn,
        )
        if not phases:
            raise ConfigError("head_epochs and finetune_epochs are both 0: nothing to train")
        return phases

    def _check_resume_fits(self, state: dict[str, Any], fingerprint: dict[str, Any]) -> None:
        if state["classes"] != fingerprint["classes"]:
            raise ConfigError(
                f"resume: the checkpoint's classes {state['classes']} differ from the data's "
                f"{fingerprint['classes']}"
            )
        if state["dataset_fingerprint"] != fingerprint:
            log.warning("resume: the dataset changed since the checkpoint (file list differs)")
