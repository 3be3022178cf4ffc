"""Checkpoints of both training loops: ``output_dir/checkpoint-<step>/`` holds everything a resume needs to
continue bit for bit (weights, optimiser, scheduler, grad scaler, every RNG, the trainer state and configs).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from disa.log_z.learned import LogZHead
from disa.training.models import is_peft_model

Tensor = torch.Tensor
CHECKPOINT_PREFIX = "checkpoint-"
LINEAGE_FILE = "lineage.json"  # written beside the checkpoints by `disa train`; each checkpoint keeps a copy
METRICS_FILE = "metrics.csv"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def checkpoint_step(path: Path) -> Optional[int]:
    """The step of a ``checkpoint-<step>`` folder, None for any other name."""
    suffix = path.name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint folder, else the newest ``checkpoint-<step>`` inside it."""
    path = Path(path)
    if (path / "trainer_state.json").exists():
        return path
    candidates = [p for p in path.glob(f"{CHECKPOINT_PREFIX}*")
                  if checkpoint_step(p) is not None and (p / "trainer_state.json").exists()]
    if not candidates:
        raise FileNotFoundError(f"{path}: no checkpoint found (expected {CHECKPOINT_PREFIX}<step>/trainer_state.json)")
    return max(candidates, key=checkpoint_step)


def save_policy(model: nn.Module, tokenizer, directory: Path) -> None:
    """``save_pretrained`` (PEFT saves only the adapter) plus the tokenizer, so the folder loads on its own."""
    model.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def load_policy_weights(model: nn.Module, directory: Path) -> None:
    """Load what ``save_policy`` wrote back into ``model`` in place (adapter under PEFT, else every weight)."""
    from safetensors.torch import load_file

    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        adapter = directory / "adapter_model.safetensors"
        if not adapter.exists():
            raise FileNotFoundError(f"{adapter}: the checkpoint has no LoRA adapter, but the policy is a LoRA model")
        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors weights (was this a LoRA run? set lora in the config)")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{directory}: weights {unexpected[:5]} do not belong to this policy")
    # keys save_pretrained leaves out are tied weights (e.g. lm_head = wte): they share storage with a loaded one
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state if k in own}
    untied = [k for k in missing if own[k].data_ptr() not in loaded]
    if untied:
        raise ValueError(f"{directory}: weights missing for {untied[:5]}")


def save_training_checkpoint(
    output_dir: Path,
    step: int,
    *,
    policy: nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    trainer_state: dict,
    config_files: dict[str, dict],
    keep: int = 0,
    logz_head: Optional[LogZHead] = None,
) -> Path:
    """``output_dir/checkpoint-<step>/``: ``policy/`` (save_pretrained: the adapter only under LoRA, plus the
    tokenizer), the log Z head, ``optimizer.pt`` (optimiser, scheduler, grad scaler), ``rng.pt``,
    ``trainer_state.json`` and one JSON file per entry of ``config_files`` (``{"train_config.json": {...}}``).
    Written to a temporary folder and renamed, so a crash never leaves a half checkpoint that a resume would
    pick; ``keep > 0`` deletes all but the newest ``keep``."""
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_policy(policy, tokenizer, tmp / "policy")
    if logz_head is not None:
        logz_head.save(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
               tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
    for name, data in config_files.items():
        (tmp / name).write_text(json.dumps(data, indent=2))
    if (output_dir / LINEAGE_FILE).is_file():  # the digests of what this run trains on travel with its weights
        shutil.copyfile(output_dir / LINEAGE_FILE, tmp / LINEAGE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep:
        ckpts = sorted((p for p in output_dir.iterdir() if checkpoint_step(p) is not None), key=checkpoint_step)
        for old in ckpts[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_checkpoint(
    ckpt: Path,
    *,
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    logz_head: Optional[LogZHead] = None,
) -> dict:
    """Restore everything ``save_training_checkpoint`` wrote, in place; returns the trainer state dict. A damaged
    file is one error naming the checkpoint (delete it to resume from an earlier one)."""
    ckpt = Path(ckpt)
    try:
        return _load_training_checkpoint(ckpt, policy, optimizer, scheduler, scaler, logz_head)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:
        from disa.artifacts import ArtifactError

        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise ArtifactError(f"{ckpt}: cannot be restored ({type(err).__name__}: {detail}); the checkpoint is damaged "
                            "or belongs to another model: delete that folder to resume from an earlier checkpoint, or "
                            "use another output_dir") from err


def _load_training_checkpoint(ckpt: Path, policy, optimizer, scheduler, scaler, logz_head) -> dict:
    load_policy_weights(policy, ckpt / "policy")
    if logz_head is not None:
        from safetensors.torch import load_file

        head_file = ckpt / "logz_head.safetensors"
        if not head_file.exists():
            raise FileNotFoundError(f"{head_file}: the checkpoint has no log Z head (was it a FlowRL run?)")
        logz_head.load_state_dict(load_file(str(head_file)))
    states = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    scaler.load_state_dict(states["scaler"])
    set_rng_state(torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True))
    return json.loads((ckpt / "trainer_state.json").read_text())


def read_checkpoint_json(checkpoint: str | Path, name: str) -> dict:
    """One of the JSON files a checkpoint was written with (``train_config.json``, ``target.json``)."""
    path = find_checkpoint(checkpoint) / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: the checkpoint has no {name}")
    return json.loads(path.read_text())


def read_trainer_state(ckpt: str | Path) -> dict:
    """``trainer_state.json`` of a checkpoint, checked: its ``step`` is the folder's, its ``history`` a list of rows
    whose last step is that step (a damaged or edited file is an error naming it)."""
    from disa.artifacts import ArtifactError, read_json

    ckpt = Path(ckpt)
    path = ckpt / "trainer_state.json"
    state = read_json(path, "train")
    step, history = (state.get("step"), state.get("history")) if isinstance(state, dict) else (None, None)
    expected = checkpoint_step(ckpt)
    if not isinstance(step, int) or not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise ArtifactError(f"{path}: no integer 'step' and list 'history'; the checkpoint is damaged: delete "
                            f"{ckpt} to resume from an earlier checkpoint")
    if expected is not None and step != expected:
        raise ArtifactError(f"{path}: records step {step}, but the folder is {ckpt.name}; the checkpoint is damaged: "
                            f"delete {ckpt} to resume from an earlier checkpoint")
    return state


def rewrite_metrics(output_dir: str | Path, history: list[dict]) -> Path:
    """``output_dir/metrics.csv`` rebuilt, atomically, from a checkpoint's history (the source of truth on a resume:
    a truncated or garbled ``metrics.csv`` loses no step; rows after the checkpoint are dropped)."""
    import csv
    import io

    from disa.io import atomic_write_text

    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(history)
    path = Path(output_dir) / METRICS_FILE
    atomic_write_text(path, buffer.getvalue())
    return path
