"""Training checkpoints: what a fine-tune leaves every ``checkpoint_every`` steps, so a redelivered copy resumes.

:class:`TaskCheckpoints` is one task's series of them (named so apart from the safetensors header's
``Checkpoint``, a model's weight files, :mod:`hypha_celery.formats.safetensors`).

Layout, in the model store (a folder a training executor may write; see
:mod:`hypha_celery.executor.landlock`)::

    <model_dir>/.checkpoints/<task>/step-<N>/state.safetensors   trainable weights (``param.<name>``), AdamW's state
                                                                  tensors (``optim.<i>.<key>``), torch's RNG states
                                                                  (``rng.torch``, ``rng.cuda``: uint8)
    <model_dir>/.checkpoints/<task>/step-<N>/checkpoint.json     step, epoch, position in the epoch's shuffled order,
                                                                  the shuffling generator's state at the epoch's start,
                                                                  loss curve, tokens, the lr schedule, and what the
                                                                  run was (:class:`Identity`, trainable shapes)

``<task>`` is the task id when it is one safe path component, else ``sha256-<hex of it>``.
A checkpoint is written into ``<task>/.tmp-XXXXXXXX`` and renamed to ``step-<N>``; older
ones are removed after the rename, so a reader sees whole checkpoints only and the newest
wins. Nothing is pickled: safetensors and JSON. Importing this module imports no torch.
With shared storage configured, the worker copies the newest checkpoint there and back
(:mod:`.sync`): a copy of the task resumes on any worker that shares the storage.

A checkpoint is used only when its :class:`Identity` (the base model's manifest sha256, a
fingerprint of the training data, the settings that shape the run) and the names and shapes
of the trainable parameters equal the new run's; otherwise it is refused, deleted, and the
run starts at step 0 (:attr:`TaskCheckpoints.refused` says why).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["CHECKPOINTS", "META", "STATE", "Identity", "Position", "TaskCheckpoints", "data_fingerprint", "discard",
           "folder", "latest"]

log = logging.getLogger(__name__)

CHECKPOINTS = ".checkpoints"  # under model_dir; executor.landlock lets a training executor write here
STATE = "state.safetensors"
META = "checkpoint.json"
FORMAT = 1
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_STEP = re.compile(r"^step-(\d{1,12})\Z")


def folder(root: str | os.PathLike[str], task_id: str) -> Path:
    """Where task ``task_id``'s checkpoints live under the store ``root`` (one path component per task)."""
    name = task_id if _SAFE.match(task_id) and ".." not in task_id else \
        "sha256-" + hashlib.sha256(task_id.encode()).hexdigest()
    return Path(root) / CHECKPOINTS / name


def discard(root: str | os.PathLike[str], task_id: str) -> bool:
    """Delete task ``task_id``'s checkpoints; whether there were any. Needs no torch (the worker calls it too)."""
    path = folder(root, task_id)
    if not path.exists():
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def latest(root: str | os.PathLike[str], task_id: str) -> tuple[int, Path] | None:
    """Task ``task_id``'s newest whole checkpoint under the store ``root``: its step and folder; None when none."""
    path = folder(root, task_id)
    if not path.is_dir():
        return None
    steps = [(int(match.group(1)), entry) for entry in path.iterdir() if (match := _STEP.match(entry.name))]
    return max(steps) if steps else None


def data_fingerprint(texts: list[str], labels: list[int] | None) -> str:
    """The sha256 of the training examples' canonical JSON: equal data, equal fingerprint, inline or stored."""
    canonical = json.dumps({"texts": texts, "labels": labels}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Identity:
    """What a checkpoint must share with a run to be used by it."""

    model_sha256: str  # ModelStore.manifest_sha256 of the base model
    data_sha256: str  # data_fingerprint
    settings: dict[str, Any]  # method, LoRA settings, lr, batch size, steps, seed, ...: JSON values

    def mismatch(self, saved: Any) -> str | None:
        """Why ``saved`` (a checkpoint's ``identity``) belongs to another run; None when it is this one's."""
        if not isinstance(saved, dict):
            return "it records no identity"
        if saved.get("model_sha256") != self.model_sha256:
            return (f"the model changed: checkpoint of manifest sha256 {str(saved.get('model_sha256'))[:12]}..., "
                    f"the store holds {self.model_sha256[:12]}...")
        if saved.get("data_sha256") != self.data_sha256:
            return "the training data differ from the checkpointed run's"
        mine = json.loads(json.dumps(self.settings))
        theirs = saved.get("settings")
        if not isinstance(theirs, dict) or theirs != mine:
            theirs = theirs if isinstance(theirs, dict) else {}
            changed = sorted(key for key in {*mine, *theirs} if mine.get(key) != theirs.get(key))
            return "the training settings differ: " + ", ".join(
                f"{key} {theirs.get(key)!r} -> {mine.get(key)!r}" for key in changed)
        return None


@dataclass(frozen=True)
class Position:
    """Where the loop stands after an optimizer step: enough to go on from there."""

    step: int
    epoch: int  # 1-based
    position: int  # micro-batches of this epoch's shuffled order already done
    order_state: Any  # random.Random.getstate() before this epoch's shuffle, as JSON (lists)
    curve: list[float]
    tokens: int


class TaskCheckpoints:
    """One task's checkpoints: write every ``every`` steps, read one back at start, delete at the end."""

    def __init__(self, root: str | os.PathLike[str], task_id: str, every: int, identity: Identity) -> None:
        self.path = folder(root, task_id)
        self.task_id = task_id
        self.every = every
        self.identity = identity
        self.resumed_from_step = 0
        self.refused: str | None = None  # why a checkpoint found at start was not used

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, at: Position, named: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
             schedule: torch.optim.lr_scheduler.LRScheduler) -> Path:
        """Write a checkpoint at ``at`` (atomically), then remove the older ones; its folder."""
        import torch
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {f"param.{name}": p.detach().to("cpu").contiguous() for name, p in named}
        scalars: dict[str, dict[str, Any]] = {}
        for index, state in optimizer.state_dict()["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{key}"] = value.detach().to("cpu").contiguous()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        tensors["rng.torch"] = torch.get_rng_state()
        device = named[0][1].device if named else torch.device("cpu")
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        meta = {  # shallow: json writes the curve and generator state as they are (asdict would copy them first)
            "format": FORMAT, "task_id": self.task_id, **{f.name: getattr(at, f.name) for f in fields(at)},
            "identity": asdict(self.identity),
            "trainable": [[name, list(p.shape)] for name, p in named],
            "optimizer_scalars": scalars, "schedule": schedule.state_dict(),
            "lrs": [group["lr"] for group in optimizer.param_groups],
        }
        self.path.mkdir(parents=True, exist_ok=True)
        for entry in self.path.iterdir():  # a dead writer's half-written folder
            if entry.name.startswith(".tmp-"):
                shutil.rmtree(entry, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.path))
        try:
            save_file(tensors, str(staging / STATE))
            with open(staging / META, "w") as handle:
                json.dump(meta, handle, separators=(",", ":"))
            for name in (STATE, META):
                _fsync(staging / name)
            target = self.path / f"step-{at.step:09d}"
            if target.exists():  # the same step again (a resumed run that saves where it resumed)
                shutil.rmtree(target)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for entry in self.path.iterdir():
            if entry != target and _STEP.match(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
        return target

    def restore(self, named: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
                schedule: torch.optim.lr_scheduler.LRScheduler) -> Position | None:
        """Load the newest checkpoint into the parameters, optimizer, schedule and RNG; None when none is used.

        A checkpoint of another run, or one that cannot be read, is refused: logged, deleted,
        and :attr:`refused` set; the caller starts at step 0.
        """
        latest = self._latest()
        if latest is None:
            return None
        try:
            at = self._load(latest, named, optimizer, schedule)
        except _Refused as refused:
            self.refused = str(refused)
            log.warning("task %s: checkpoint %s refused, starting at step 0: %s", self.task_id, latest, refused)
            self.discard()
            return None
        self.resumed_from_step = at.step
        log.info("task %s: resuming from checkpoint at step %d", self.task_id, at.step)
        return at

    def discard(self) -> bool:
        return discard(self.path.parent.parent, self.task_id)

    def _latest(self) -> Path | None:
        found = latest(self.path.parent.parent, self.task_id)
        return None if found is None else found[1]

    def _load(self, path: Path, named: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
              schedule: torch.optim.lr_scheduler.LRScheduler) -> Position:
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            meta = json.loads((path / META).read_text())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise _Refused(f"unknown checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}")
            reason = self.identity.mismatch(meta.get("identity"))
            if reason is not None:
                raise _Refused(reason)
            if meta.get("trainable") != [[name, list(p.shape)] for name, p in named]:
                raise _Refused("the trainable parameters' names or shapes differ from the checkpointed run's")
            tensors = load_file(str(path / STATE), device="cpu")
            state: dict[int, dict[str, Any]] = {}
            for key, value in tensors.items():
                if key.startswith("optim."):
                    _, index, name = key.split(".", 2)
                    state.setdefault(int(index), {})[name] = value
            for index, values in (meta.get("optimizer_scalars") or {}).items():
                state.setdefault(int(index), {}).update(values)
            at = Position(step=int(meta["step"]), epoch=int(meta["epoch"]), position=int(meta["position"]),
                          order_state=meta["order_state"], curve=[float(v) for v in meta["curve"]],
                          tokens=int(meta["tokens"]))
            groups = optimizer.state_dict()["param_groups"]
            for group, lr in zip(groups, meta["lrs"], strict=True):
                group["lr"] = float(lr)
            weights = {name: tensors[f"param.{name}"] for name, _ in named}
            for (name, param), weight in zip(named, weights.values(), strict=True):
                if weight.shape != param.shape or weight.dtype != param.dtype:
                    raise _Refused(f"parameter {name}: {weight.dtype} {list(weight.shape)} in the checkpoint, "
                                   f"{param.dtype} {list(param.shape)} here")
            optimizer.load_state_dict({"state": state, "param_groups": groups})
            schedule.load_state_dict(meta["schedule"])
            cuda = tensors.get("rng.cuda")
            device = named[0][1].device if named else torch.device("cpu")
        except _Refused:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, SafetensorError) as exc:
            raise _Refused(f"unreadable checkpoint ({type(exc).__name__}: {exc})") from None
        with torch.no_grad():
            for (_, param), weight in zip(named, weights.values(), strict=True):
                param.copy_(weight)
        torch.set_rng_state(tensors["rng.torch"])
        if cuda is not None and device.type == "cuda":
            torch.cuda.set_rng_state(cuda, device)
        return at


class _Refused(Exception):
    """A checkpoint that this run must not use; the message says why."""


def _fsync(path: Path) -> None:
    """Flush a written file to disk before the rename publishes it (a power cut leaves no half checkpoint)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
