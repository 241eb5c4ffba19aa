"""The pretraining loop: one process or many under ``torchrun``, on CPU or GPUs.

The method (MoCo-v2, BYOL, DenseCL) owns its networks and its loss; the trainer owns the loop,
devices, precision, the optimizer and schedule, checkpoints, resumption and logging.

Exact resumption: a checkpoint holds the model (with the key/target encoder and the queues, which
are module state), optimizer, scheduler, grad scaler, the precision ``auto`` chose (kept by a resumed
run), the RNG states of every rank, the epoch and the number of batches already consumed in that epoch.
The sampler order and every sample's augmentation depend only on (seed, epoch, index), so a resumed run
sees exactly the batches the uninterrupted run would have seen.

Resuming checks the config against the checkpoint's: keys that would change the sample stream or the
model are refused with a :class:`~objcrop.ssl.config.ConfigError` naming each (``key: old -> new``);
the others are applied and logged (see :meth:`Trainer.resume`).

Unusable records (undecodable files) are skipped by the dataset; the trainer collects the distinct
ones it met, reports how many, keeps them in its checkpoints and hands them to the dataset each epoch
so that they are not read again.

Evaluation during training (the kNN monitor) and reports (the loss plot) come from the caller as
:class:`~objcrop.ssl.monitors.Monitor` objects: the trainer imports nothing from the layers above it.
The pieces it drives live in their own modules: the method contract (:mod:`objcrop.ssl.base`), the
sampler (:mod:`objcrop.ssl.sampler`), the RNG states (:mod:`objcrop.ssl.rng`), the logs
(:mod:`objcrop.ssl.train_logs`) and checkpoints (:mod:`objcrop.ssl.checkpoint`).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from objcrop.ssl.base import build_method
from objcrop.ssl.checkpoint import Checkpointer
from objcrop.ssl.config import NOT_RECORDED, RESUMABLE_KEYS, build_policy, config_changes
from objcrop.ssl.distributed import DistEnv, all_reduce_flag, all_reduce_mean, init_distributed
from objcrop.ssl.errors import ConfigError, NonFiniteLossError
from objcrop.ssl.lars import LARS
from objcrop.ssl.monitors import Monitor
from objcrop.ssl.rng import loader_generator, rng_state, seed_globals, set_rng_state
from objcrop.ssl.sampler import EpochSampler
from objcrop.ssl.schedules import warmup_cosine_lambda
from objcrop.ssl.train_logs import TrainLogs

# NonFiniteLossError is raised here; callers may import it from objcrop.ssl.errors or from here.
__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "build_dataset", "pretrain"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished (or resumed and finished) run reports."""

    steps: int
    epochs: int
    final_loss: float
    images_per_second: float
    out_dir: str
    checkpoint: str
    skipped_images: int
    fallbacks: int
    resumed_from: str = ""
    is_main: bool = True


# train.precision's names and their autocast dtypes (None: fp32), both ways.
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_PRECISION_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (``None``: fp32). Config validation has
    refused fp16 without a GPU."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else None
    return _DTYPES[precision]


def _cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU reports native bf16 (AVX512-BF16 or AMX): without it, bf16 autocast is emulated and slow."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_dataset(config: dict, records=None, device: torch.device | str | None = None):
    """The :class:`~objcrop.crops.dataset.ObjectAwareDataset` a config describes, or its device-path twin
    :class:`~objcrop.crops.device_dataset.DeviceViewDataset` when ``crops.augment_on`` resolves to ``device``
    (``auto`` does on a CUDA ``device``, the training device; without one it means the loader path)."""
    from objcrop.crops.dataset import ObjectAwareDataset
    from objcrop.crops.device_dataset import DeviceViewDataset, resolve_augment_on
    from objcrop.data.readers import load_records
    from objcrop.proposals import open_proposals
    from objcrop.registry import AUGMENTS

    data, crops = config["data"], config["crops"]
    policy = build_policy(crops)
    size = int(crops["size"])
    transform = AUGMENTS[crops["augment"]](size)  # one transform for both views, or a pair
    if data["format"] == "webdataset" and records is None:  # tar shards are streamed: objcrop.crops.streaming
        from objcrop.crops.streaming import StreamingObjectAwareDataset

        options = {k: data[k] for k in ("annotations", "labels_csv", "classes_csv")}
        seed = config["train"]["seed"]
        return StreamingObjectAwareDataset.from_shards(
            data["images"], str(data["proposals"]), policy, transform=transform, size=size, seed=seed, **options
        )
    if records is None:
        records = load_records(
            data["format"],
            annotations=data["annotations"],
            images=data["images"],
            labels_csv=data["labels_csv"],
            classes_csv=data["classes_csv"],
        )
    store = open_proposals(str(data["proposals"]), records)
    if resolve_augment_on(crops.get("augment_on", "loader"), device) == "device":
        return DeviceViewDataset(
            records, store, policy, augment=crops["augment"], size=size, seed=config["train"]["seed"]
        )
    return ObjectAwareDataset(records, store, policy, transform=transform, size=size, seed=config["train"]["seed"])


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "views": [torch.stack([s["views"][v] for s in samples]) for v in range(2)],
        "kinds": torch.stack([s["kinds"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples]),
        "replaced": torch.tensor([int(s["replaced"]) for s in samples]),
        "fallback": sum(int(s.get("fallback", False)) for s in samples),
    }


class Trainer:
    """Runs the pretraining a validated config describes (see :mod:`objcrop.ssl.config`).

    Args:
        config: A validated config (:func:`~objcrop.ssl.config.load_config`); the trainer keeps a copy.
        env: Rank, world size and device; by default read from ``torchrun``'s environment.
        dataset: The training dataset; by default the one the config describes (:func:`build_dataset`).
        monitors: Run on the main process after each epoch and at the end (:class:`~objcrop.ssl.monitors.Monitor`).
            ``objcrop pretrain`` passes the kNN monitor ``train.knn_every_epochs`` asks for and the loss plot.
    """

    def __init__(
        self, config: dict, env: DistEnv | None = None, dataset=None, monitors: Sequence[Monitor] = ()
    ) -> None:
        self.config = copy.deepcopy(config)  # derived values are recorded in it: leave the caller's alone
        config = self.config
        tcfg, ocfg = config["train"], config["optim"]
        self.env = env or init_distributed(tcfg["device"])
        if tcfg["threads"]:
            torch.set_num_threads(int(tcfg["threads"]))
        seed_globals(int(tcfg["seed"]) + self.env.rank)
        if tcfg["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        else:
            torch.backends.cudnn.benchmark = True

        self.out = Path(tcfg["out"])
        self.checkpointer = Checkpointer(self.out / "checkpoints", keep_last=int(tcfg["keep_last"]))
        if self.env.is_main:
            self._prepare_output()  # before the data is read: a bad train.out must not cost a run
        self.dataset = dataset if dataset is not None else build_dataset(config, device=self.env.device)
        self._record_object_scale()
        world_batch = int(ocfg["batch_size"])
        if world_batch % self.env.world_size:
            raise ValueError(f"optim.batch_size {world_batch} is not divisible by {self.env.world_size} processes")
        self.batch_per_rank = world_batch // self.env.world_size
        per_rank = len(self.dataset) // self.env.world_size
        self.steps_per_epoch = per_rank // self.batch_per_rank
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.dataset)} images give no full batch of {self.batch_per_rank} per process; "
                "lower optim.batch_size"
            )
        self.epochs = int(ocfg["epochs"])
        self.total_steps = self.epochs * self.steps_per_epoch
        if ocfg["max_steps"]:
            self.total_steps = min(self.total_steps, int(ocfg["max_steps"]))

        self.dtype = _resolve_precision(tcfg["precision"], self.env.device)
        self.channels_last = bool(tcfg["channels_last"])
        # Device path (crops.augment_on): batches hold decoded images and boxes; the views are made in _to_device.
        self.view_maker = self.dataset.view_maker(self.channels_last) if hasattr(self.dataset, "view_maker") else None
        model = build_method(config)
        model = model.to(self.env.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.method = model
        self.model = self._wrap_ddp(model) if self.env.distributed else model

        lr = float(ocfg["lr"]) * world_batch / float(ocfg["lr_reference_batch"])
        params = [p for p in model.parameters() if p.requires_grad]
        if ocfg["name"] == "lars":
            self.optimizer = LARS(
                params,
                lr=lr,
                momentum=ocfg["momentum"],
                weight_decay=ocfg["weight_decay"],
                trust_coefficient=ocfg["trust_coefficient"],
            )
        else:
            self.optimizer = torch.optim.SGD(
                params, lr=lr, momentum=ocfg["momentum"], weight_decay=ocfg["weight_decay"]
            )
        warmup = min(int(round(float(ocfg["warmup_epochs"]) * self.steps_per_epoch)), self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine_lambda(self.total_steps, warmup, float(ocfg["final_lr_factor"]))
        )
        self.scaler = self._make_scaler()
        self.sampler = EpochSampler(len(self.dataset), self.env.rank, self.env.world_size, seed=int(tcfg["seed"]))
        self.step = 0
        self.epoch = 0
        self.batches_done_in_epoch = 0
        self.unusable: set[int] = set()  # distinct records this rank found unusable (all ranks' after a resume)
        self.replaced_elsewhere = 0  # replacements by a dataset that does not say which records it skipped
        self.fallbacks = 0
        self.last_loss = float("nan")
        self.monitors = list(monitors) if self.env.is_main else []
        if tcfg["knn_every_epochs"] and not self.monitors and self.env.is_main:
            logger.warning(
                "train.knn_every_epochs is set but this Trainer got no monitors: the kNN monitor comes from the "
                "caller (objcrop pretrain passes it; see objcrop.evaluate.monitors.knn_monitor)"
            )
        for monitor in self.monitors:
            monitor.setup(self)

    def _prepare_output(self) -> None:
        """Creates ``train.out`` and its checkpoint folder and checks both can be written to.

        Raises:
            ConfigError: Naming the folder that cannot be created or written to.
        """
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"train.out: cannot create the output folder {self.out}: {err.strerror or err}") from err
        try:
            self.checkpointer.prepare()
        except OSError as err:
            raise ConfigError(f"train.out: {err.strerror or err}") from err

    def _record_object_scale(self) -> None:
        """Logs the object crops' area range the dataset resolved (the paper's S_min from the proposals)
        and records it in the config saved with every checkpoint as ``crops.object_scale_resolved``."""
        policy = getattr(self.dataset, "policy", None)
        if policy is None or not hasattr(policy, "describe_object_scale"):
            return
        if self.env.is_main:
            logger.info(policy.describe_object_scale())
        resolved = getattr(policy, "resolved_object_scale", None)
        if resolved is None and hasattr(policy, "object_scale_range"):
            resolved = policy.object_scale_range()
        self.config["crops"]["object_scale_resolved"] = list(resolved) if isinstance(resolved, tuple) else resolved

    @property
    def skipped(self) -> int:
        """How many distinct unusable records this rank met (all ranks' once a checkpoint was written).

        For a dataset without ``known_bad`` (one that does not replace a record by the next one, such as
        a stream) the count is the sum of its samples' ``replaced``, which may count a bad sample twice.
        """
        return len(self.unusable) + self.replaced_elsewhere

    def _note_unusable(self, batch: dict[str, Any]) -> None:
        """Adds the records the batch's samples skipped: the ``replaced`` ones just before each ``index``
        (how :class:`~objcrop.crops.dataset.ObjectAwareDataset` replaces them)."""
        if not hasattr(self.dataset, "known_bad"):
            self.replaced_elsewhere += int(batch["replaced"].sum())
            return
        n = len(self.dataset)
        for index, replaced in zip(batch["index"].tolist(), batch["replaced"].tolist(), strict=True):
            self.unusable.update((index - k) % n for k in range(1, replaced + 1))

    def _all_unusable(self) -> set[int]:
        """The union over the ranks of the unusable records (collective under DDP)."""
        if not self.env.distributed:
            return set(self.unusable)
        gathered: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(gathered, sorted(self.unusable))
        return set().union(*map(set, gathered))

    def _wrap_ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        # Every rank starts from rank 0's buffers too (the random initial queue above all), which
        # DDP skips with broadcast_buffers=False. Buffers are not re-broadcast at each forward: the
        # queues stay equal by construction and each rank keeps its own BatchNorm statistics.
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
        ddp = torch.nn.parallel.DistributedDataParallel
        newer = "forward_sync_buffers" in inspect.signature(ddp).parameters  # torch >= 2.14 deprecates the other
        return ddp(
            model,
            device_ids=[self.env.local_rank] if self.env.device.type == "cuda" else None,
            find_unused_parameters=bool(model.has_unused_parameters),  # declared by the method (SSLMethod)
            **({"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}),
        )

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Per rank: the RNG states, and the BatchNorm running statistics, which each rank keeps for itself
        # (buffers are not broadcast) while "model" holds the main rank's.
        mine = {"rng": rng_state(), "bn": self._own_buffers() if self.env.distributed else {}}
        if self.env.distributed:
            gathered: list[Any] = [None] * self.env.world_size
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        self.unusable = self._all_unusable()
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "precision": _PRECISION_NAMES[self.dtype],  # what train.precision resolved to (auto: kept on resume)
            "rng": [g["rng"] for g in gathered],
            "rank_buffers": [g["bn"] for g in gathered],
            "step": self.step,
            "epoch": self.epoch,
            "batches_done_in_epoch": self.batches_done_in_epoch,
            "world_size": self.env.world_size,
            "skipped": self.skipped,
            "unusable": torch.tensor(sorted(self.unusable), dtype=torch.int64),
            "replaced_elsewhere": self.replaced_elsewhere,
            "fallbacks": self.fallbacks,
            "loss": self.last_loss,
            "num_records": len(self.dataset),
            "config": json.dumps(self.config, allow_nan=False),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.env.world_size:
            raise ValueError(
                f"checkpoint was written by {state['world_size']} processes, this run has {self.env.world_size}; "
                "exact resumption needs the same number"
            )
        # This rank's own BatchNorm statistics over the main rank's ("rank_buffers" is absent before 2026-12-04).
        own = state.get("rank_buffers", [{}] * self.env.world_size)[self.env.rank]
        self.method.load_state_dict({**state["model"], **own})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._keep_auto_precision(state.get("precision"))
        if state["scaler"]:  # empty when saved by a disabled scaler (the precision may have changed since)
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.env.rank])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batches_done_in_epoch = int(state["batches_done_in_epoch"])
        self.unusable = set(state["unusable"].tolist()) if "unusable" in state else set()
        self.replaced_elsewhere = int(state.get("replaced_elsewhere", 0))
        self.fallbacks = int(state["fallbacks"])
        self.last_loss = float(state.get("loss", float("nan")))

    def _own_buffers(self) -> dict[str, torch.Tensor]:
        """This rank's BatchNorm running statistics (on the CPU, for the all-gather)."""
        running = ("running_mean", "running_var", "num_batches_tracked")
        return {k: v.detach().cpu() for k, v in self.method.named_buffers() if k.endswith(running)}

    def _make_scaler(self) -> torch.amp.GradScaler:
        """A grad scaler, enabled for fp16 only (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.env.device.type, enabled=self.dtype == torch.float16)

    def _keep_auto_precision(self, saved: str | None) -> None:
        """With ``train.precision: auto``, a resumed run keeps the precision the checkpoint's run chose (a
        machine that would choose another would make the resumed run differ), unless it cannot run here
        (fp16 without a GPU)."""
        current = _PRECISION_NAMES[self.dtype]
        if saved is None or self.config["train"]["precision"] != "auto" or saved == current:
            return
        if saved == "fp16" and self.env.device.type != "cuda":
            logger.warning("train.precision auto: the checkpoint's run used fp16, which needs a GPU; using %s", current)
            return
        logger.warning(
            "train.precision auto: keeping the checkpoint's %s (this machine would choose %s)", saved, current
        )
        self.dtype = _DTYPES[saved]
        self.scaler = self._make_scaler()

    def save_checkpoint(self) -> Path | None:
        """Writes a checkpoint (rank 0) unless a weight or buffer went NaN/inf; collective under DDP.

        Raises:
            NonFiniteLossError: When the model state holds a non-finite value (a finite loss can still
                give infinite gradients); the previous checkpoints stay untouched.
        """
        tensors = [t for t in self.method.state_dict().values() if t.is_floating_point()]
        bad = not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
        if all_reduce_flag(bad, self.env):
            kept = self.checkpointer.paths()
            raise NonFiniteLossError(
                f"the model holds NaN/inf values after step {self.step}; stopping without saving. "
                f"Last good checkpoint: {kept[-1] if kept else 'none'}. Lower optim.lr or use train.precision=fp32."
            )
        state = self.state_dict()  # collective under DDP: every rank takes part
        if not self.env.is_main:
            return None
        return self.checkpointer.save(state, self.step)

    def resume(self) -> Path | None:
        """Loads the newest checkpoint that loads, after comparing its config with this run's.

        Keys outside :data:`~objcrop.ssl.config.RESUMABLE_KEYS` (the data, crops and method, optim.name,
        optim.batch_size, train.seed) and a different number of records are refused. The resumable ones
        are applied and logged: ``optim.lr`` and ``optim.lr_reference_batch`` by rebuilding the
        scheduler's ``base_lrs``; the schedule's shape (warmup, final factor, epochs, max_steps) by the
        schedule built from this config, whose current rate replaces the checkpoint's; momentum, weight
        decay and the LARS trust coefficient in the optimizer's parameter groups; train.* as they are.

        Raises:
            ConfigError: Listing every refused key as ``key: old -> new``.
            CheckpointError: Checkpoints exist but none of them loads.
        """
        found = self.checkpointer.load_latest(map_location=self.env.device)
        if found is None:
            return None
        state, path = found
        changes = self._check_resumable(state, path)
        self.load_state_dict(state)
        if changes:
            self._apply_changes(changes)
        if self.env.is_main:
            logger.info("resumed from %s (step %d, epoch %d)", path, self.step, self.epoch)
        return path

    def _check_resumable(self, state: dict[str, Any], path: Path) -> list[tuple[str, Any, Any]]:
        """The resumable changes between the checkpoint's config and this run's; raises on the others."""
        if "config" not in state:
            logger.warning("%s records no config: cannot check this run's config against it", path)
            return []
        changes = config_changes(json.loads(state["config"]), self.config)
        refused = [c for c in changes if c[0] not in RESUMABLE_KEYS and c[1] != NOT_RECORDED]
        lines = [f"{key}: {_show(old)} -> {_show(new)}" for key, old, new in refused]
        if "num_records" in state and int(state["num_records"]) != len(self.dataset):
            lines.append(f"data: {int(state['num_records'])} records -> {len(self.dataset)} records")
        if lines:
            raise ConfigError(
                f"cannot resume {path}: these settings differ from the checkpoint's and would change the sample "
                f"stream or the model: {'; '.join(lines)}. Set them back, or start over with --no-resume "
                "(the existing checkpoints are then moved aside, not deleted)"
            )
        unrecorded = [key for key, old, _ in changes if old == NOT_RECORDED and key not in RESUMABLE_KEYS]
        if unrecorded and self.env.is_main:
            logger.warning("%s does not record %s (an older objcrop wrote it): assumed unchanged", path, unrecorded)
        return [c for c in changes if c[0] in RESUMABLE_KEYS]

    def _apply_changes(self, changes: list[tuple[str, Any, Any]]) -> None:
        """Applies the resumable config changes to the state just loaded (see :meth:`resume`)."""
        keys = {key for key, _, _ in changes}
        ocfg = self.config["optim"]
        for name in ("momentum", "weight_decay", "trust_coefficient"):
            if f"optim.{name}" in keys:
                for group in self.optimizer.param_groups:
                    if name in group:
                        group[name] = ocfg[name]
        notes = []
        if keys & {"optim.lr", "optim.lr_reference_batch"}:
            base = float(ocfg["lr"]) * int(ocfg["batch_size"]) / float(ocfg["lr_reference_batch"])
            old = self.scheduler.base_lrs[0]
            self.scheduler.base_lrs = [base] * len(self.optimizer.param_groups)
            for group in self.optimizer.param_groups:
                group["initial_lr"] = base
            notes.append(f"scheduler base_lrs rebuilt: {old:.6g} -> {base:.6g}")
        schedule = {"optim.lr", "optim.lr_reference_batch", "optim.warmup_epochs", "optim.final_lr_factor"}
        if keys & (schedule | {"optim.epochs", "optim.max_steps"}):
            # The checkpoint's current rate came from the old schedule: take this step's from the new one.
            factors = [fn(self.scheduler.last_epoch) for fn in self.scheduler.lr_lambdas]
            for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs, factors, strict=True):
                group["lr"] = base * factor
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
            notes.append(f"{self.total_steps} steps in all, lr now {self.optimizer.param_groups[0]['lr']:.6g}")
        if self.env.is_main:
            applied = "; ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, old, new in changes)
            # Optimization changes alter the run's results: say so louder than a new log interval.
            level = logging.WARNING if any(key.startswith("optim.") for key in keys) else logging.INFO
            logger.log(
                level, "resuming with changed settings, applied: %s%s", applied, f" ({'; '.join(notes)})" * bool(notes)
            )

    # -- loop ----------------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        workers = int(self.config["train"]["workers"])
        streaming = isinstance(self.dataset, IterableDataset)
        if streaming:  # shards are streamed: the dataset deals them to ranks and workers and cuts the epoch itself
            start, rank, world = self.batches_done_in_epoch, self.env.rank, self.env.world_size
            self.dataset.plan(self.steps_per_epoch, start, self.batch_per_rank, workers, rank, world)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_per_rank,
            sampler=None if streaming else self.sampler,
            num_workers=workers,
            collate_fn=getattr(self.dataset, "collate", _collate),
            pin_memory=self.env.device.type == "cuda",
            drop_last=True,
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
            generator=loader_generator(int(self.config["train"]["seed"]), self.epoch, self.env.rank),
        )

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.view_maker is not None and "images" in batch:
            views = self.view_maker.from_batch(batch, self.env.device)
        else:
            views = [v.to(self.env.device, non_blocking=True, memory_format=fmt) for v in batch["views"]]
        return {"views": views, "kinds": batch["kinds"].to(self.env.device, non_blocking=True)}

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimizer step on ``batch``; returns its statistics averaged over the ranks.

        Raises:
            NonFiniteLossError: When the loss is NaN or infinite on any rank (before any weight changes).
        """
        self.model.train()
        with torch.autocast(self.env.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.model(self._to_device(batch))
        loss = out["loss"]
        scalars = {k: v.detach().float() for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
        stats = dict(zip(scalars, all_reduce_mean(torch.stack(list(scalars.values())), self.env).tolist(), strict=True))
        if not math.isfinite(stats["loss"]):
            kept = self.checkpointer.paths()
            raise NonFiniteLossError(
                f"loss is {stats['loss']} at step {self.step + 1} (epoch {self.epoch}); stopping without saving. "
                f"Last good checkpoint: {kept[-1] if kept else 'none'}. Lower optim.lr or use train.precision=fp32."
            )
        stats["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        extra = self.method.after_optimizer_step(self.step, self.total_steps)
        stats.update({k: float(v) for k, v in extra.items()})
        return stats

    def _end_epoch_monitors(self, logs: TrainLogs) -> None:
        """Runs the monitors' epoch hooks; what they return goes to ``eval.csv`` in one row."""
        results: dict[str, float] = {}
        for monitor in self.monitors:
            stats = monitor.on_epoch_end(self)
            if stats:
                logger.info(
                    "epoch %d %s: %s", self.epoch, monitor.name, ", ".join(f"{k} {v:.2f}" for k, v in stats.items())
                )
                results.update(stats)
        if results:
            logs.write_eval(self.step, self.epoch, results)

    def fit(self, resume: bool = True) -> TrainResult:
        """Trains to ``optim.max_steps`` or the last epoch, checkpointing and logging on the way.

        Args:
            resume: Continue from the newest checkpoint that loads in ``train.out``; otherwise start
                over and move existing checkpoints to ``checkpoints.replaced-<time>``.

        Raises:
            NonFiniteLossError: The loss or the weights became NaN/inf; no checkpoint of that state is written.
            CheckpointError: Checkpoints exist but none of them loads.
        """
        if self.env.is_main:
            self.checkpointer.remove_stale_temp_files()  # of saves killed before their rename
        resumed_from = self.resume() if resume else None
        if not resume and self.env.is_main and (moved := self.checkpointer.set_aside()) is not None:
            logger.warning("not resuming: moved the existing checkpoints of %s to %s", self.out, moved)
            self._prepare_output()
        if self.env.distributed:
            dist.barrier()  # nobody writes before rank 0 has moved the old checkpoints
        logs = TrainLogs(self.out, self.env.is_main, self.config["train"]["tensorboard"], resume_step=self.step)
        log_every = int(self.config["train"]["log_every_steps"])
        ckpt_every = int(self.config["train"]["checkpoint_every_steps"])
        progress = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (self.env.is_main and self.config["train"]["progress"]),
            unit="step",
            dynamic_ncols=True,
        )
        images = 0
        t0 = time.perf_counter()
        try:
            while self.step < self.total_steps and self.epoch < self.epochs:
                self.sampler.set_epoch(self.epoch, start=self.batches_done_in_epoch * self.batch_per_rank)
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(self.epoch)
                if hasattr(self.dataset, "known_bad"):  # the loader's workers get them with the dataset
                    self.dataset.known_bad.update(self.unusable)
                unusable_before = self.skipped
                for batch in self._loader():
                    stats = self.train_step(batch)
                    self.step += 1
                    self.batches_done_in_epoch += 1
                    self._note_unusable(batch)
                    self.fallbacks += batch["fallback"]
                    images += self.batch_per_rank * self.env.world_size
                    self.last_loss = stats["loss"]
                    rate = images / max(time.perf_counter() - t0, 1e-9)
                    stats.update({"img_per_s": rate, "epoch": self.epoch})
                    progress.update(1)
                    progress.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{stats['lr']:.3g}", img_s=f"{rate:.1f}")
                    if self.step % log_every == 0 or self.step == self.total_steps:
                        logs.write(self.step, stats)
                    done = self.step >= self.total_steps
                    if self.batches_done_in_epoch >= self.steps_per_epoch:
                        self.epoch += 1
                        self.batches_done_in_epoch = 0
                        self.save_checkpoint()
                        self._end_epoch_monitors(logs)
                    elif self.step % ckpt_every == 0 or done:
                        self.save_checkpoint()
                    if done:
                        break
                if self.skipped > unusable_before:
                    logger.warning(
                        "rank %d: %d unusable records skipped so far (%d new this epoch)",
                        self.env.rank, self.skipped, self.skipped - unusable_before,
                    )  # fmt: skip
        finally:
            progress.close()
            logs.close()
        elapsed = time.perf_counter() - t0
        if self.env.distributed:
            dist.barrier()
        final = self.checkpointer.paths()
        skipped = len(self._all_unusable()) + self.replaced_elsewhere
        if skipped and self.env.is_main:
            logger.warning(
                "%d unusable records were skipped in all (see the warnings of objcrop.crops.dataset)", skipped
            )
        result = TrainResult(
            steps=self.step,
            epochs=self.epoch,
            final_loss=self.last_loss,
            images_per_second=images / elapsed if elapsed > 0 else 0.0,
            out_dir=str(self.out),
            checkpoint=str(final[-1]) if final else "",
            skipped_images=skipped,
            fallbacks=self.fallbacks,
            resumed_from=str(resumed_from or ""),
            is_main=self.env.is_main,
        )
        for monitor in self.monitors:  # empty on every rank but the main one
            monitor.on_fit_end(self)
        return result


def _show(value: Any) -> str:
    """A config value as it would be written in YAML/JSON (``null``, ``[0.2, 1.0]``, ``"gt"``)."""
    return value if value == NOT_RECORDED else json.dumps(value)


def pretrain(config: dict, resume: bool = True, dataset=None, monitors: Sequence[Monitor] = ()) -> TrainResult:
    """Trains with ``config`` (resuming from ``train.out`` when checkpoints exist); see :class:`Trainer`."""
    trainer = Trainer(config, dataset=dataset, monitors=monitors)
    try:
        return trainer.fit(resume=resume)
    finally:
        if trainer.env.distributed and dist.is_initialized():
            dist.destroy_process_group()
