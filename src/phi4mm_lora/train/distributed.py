"""What differs between DDP, FSDP and DeepSpeed for the training loop, in one place.

:func:`~phi4mm_lora.train.finetune.train` is written for the data-parallel case (every process
holds the whole model). Under FSDP (accelerate's FSDP1 or FSDP2 plugin) every parameter - LoRA
tensors included - is sharded across processes, so anything that reads or writes parameters
or optimizer state must be a *collective* that every process calls:

* saving: :func:`gather_trained` gathers only the trainable tensors (LoRA + unfrozen modules,
  not the frozen base model) to full, unsharded CPU tensors on the main process;
  :func:`optimizer_state` gathers the full optimizer state, keyed by parameter name;
* resuming: :func:`load_trained` and :func:`load_optimizer_state` scatter full tensors read
  from disk back into the shards;
* evaluation with generation cannot run on one process while the others wait (the forward
  pass needs the other processes' shards): :func:`can_evaluate_on_main` says when to skip it.

In the DDP and single-process cases these helpers return ``None``/do nothing and the loop keeps
its original code, so those checkpoints stay byte-for-byte what they were.

FSDP is tested with FSDP2 (``fsdp_version: 2``) on CPU by ``tests/test_train_fsdp.py``
(2 processes equal 1 process; save and resume). FSDP1 goes through the same
``torch.distributed.checkpoint.state_dict`` calls but is untested here: accelerate gives FSDP1
``device_id=cpu``, which torch rejects on CPU. DeepSpeed ZeRO is untested (DeepSpeed needs CUDA
for its ops and is not a dependency): the code uses accelerate's generic
:meth:`~accelerate.Accelerator.get_state_dict` for the adapter and the engine's own
``save_checkpoint``/``load_checkpoint`` for the optimizer, which is what accelerate's
``save_state`` does, so it has a reasonable chance to work.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from phi4mm_lora.errors import UserError

#: Sub-folder of a checkpoint holding DeepSpeed's own optimizer checkpoint.
DEEPSPEED_DIR = "deepspeed"
#: Wrapper prefixes FSDP1 / activation checkpointing put into parameter names.
_WRAPPER = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def kind(accelerator: Any) -> str:
    """What the run uses, for the log line: ``FSDP2``, ``DeepSpeed ZeRO-2``, ``DDP MULTI_CPU``, ``single``..."""
    from accelerate.utils import DistributedType

    dt = accelerator.distributed_type
    if dt == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    if dt == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{_zero_stage(accelerator)}"
    if dt == DistributedType.NO:
        return "single"
    name = str(getattr(dt, "value", dt))
    return f"DDP {name}" if name.startswith("MULTI_") else name


def is_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def fused_optimizer_ok(accelerator: Any) -> bool:
    """Whether AdamW may run fused (``train.fused_optimizer``: one kernel updates every trainable tensor).

    Not under FSDP or DeepSpeed, which shard or replace the optimizer's parameters; elsewhere
    (one process, DDP) torch's fused AdamW runs on CUDA and CPU tensors alike.
    """
    return not (is_fsdp(accelerator) or is_deepspeed(accelerator))


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _zero_stage(accelerator: Any) -> int:
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def check_setup(accelerator: Any, grad_accum: int) -> list[str]:
    """Refuse set-ups known to fail; return warnings for ones that silently differ from the request.

    * accelerate turns FSDP into plain DDP on CPU (its FSDP switch only looks at GPU-like
      devices), so an FSDP config on a machine without a GPU trains correctly but unsharded;
    * FSDP1 flattens each wrapped module's parameters into one tensor whose ``requires_grad``
      must be uniform unless ``use_orig_params`` is on - LoRA mixes trainable and frozen;
    * with DeepSpeed, accelerate's ``backward`` steps the engine after every micro-batch unless
      accelerate's own accumulation is used, so this loop's ``train.grad_accum`` would be wrong.
    """
    notes = []
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not is_fsdp(accelerator):
        notes.append(f"the accelerate config asks for FSDP but accelerate runs {kind(accelerator)} on this device "
                     "(it supports FSDP on GPUs only); training is correct but not sharded")
    if is_fsdp(accelerator):
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version == 1 and not plugin.use_orig_params:
            raise UserError("FSDP1 needs fsdp_use_orig_params: true in the accelerate config (LoRA trains some "
                            "parameters of each layer and freezes others); or use fsdp_version: 2")
    if is_deepspeed(accelerator) and grad_accum > 1:
        raise UserError("with DeepSpeed use train.grad_accum=1 (accelerate steps the DeepSpeed engine after every "
                        "backward); raise train.batch_size or the number of processes instead")
    return notes


def params_sharded(accelerator: Any) -> bool:
    """True when no single process holds the full weights (FSDP, DeepSpeed ZeRO-3)."""
    return is_fsdp(accelerator) or (is_deepspeed(accelerator) and _zero_stage(accelerator) == 3)


def can_evaluate_on_main(accelerator: Any) -> bool:
    """Main-process-only evaluation (generation) needs the full weights on the main process.

    Under FSDP / ZeRO-3 each forward pass all-gathers shards from every process, so generation
    on one process deadlocks; running ``evaluate_fn`` on all processes would work only if it
    made exactly the same forward calls everywhere (generation lengths differ by example), so
    the loop skips it instead and the saved checkpoint is evaluated with ``phi4mm-lora evaluate``.
    """
    return not params_sharded(accelerator)


def clip_parameters(accelerator: Any, model: torch.nn.Module, params: list[torch.nn.Parameter]):
    """What to hand to ``accelerator.clip_grad_norm_``.

    accelerate uses FSDP's own (sharded) norm only when given exactly ``model.parameters()``;
    a list of some parameters would compute each process's local norm and clip differently on
    each. In all other cases keep the trainable list (identical result, as before).
    """
    return model.parameters() if is_fsdp(accelerator) else params


def grad_norm_value(norm: Any) -> float | None:
    """A float from whatever clipping returned (a DTensor under FSDP2, ``None`` from DeepSpeed at times)."""
    if norm is None:
        return None
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _clean(name: str) -> str:
    return _WRAPPER.sub("", name)


def trainable_names(peft: torch.nn.Module) -> list[str]:
    """Names (as in a full state dict) of the parameters that train."""
    return [_clean(n) for n, p in peft.named_parameters() if p.requires_grad]


def gather_trained(accelerator: Any, model: torch.nn.Module, peft: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Full CPU copies of the trainable tensors, on the main process (collective: call on all).

    ``None`` when parameters are not sharded: then the live parameters are complete and
    :func:`~phi4mm_lora.model.adapters.save_trained` reads them directly, as before.
    """
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # ignore_frozen_params: only LoRA + unfrozen modules are gathered, not the whole model. It
        # still lets buffers and tied weights (lm_head) through, hence the filter below.
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        full = get_model_state_dict(model, options=opts)
    elif is_deepspeed(accelerator):
        full = accelerator.get_state_dict(model)  # ZeRO-3: gathers (16-bit) weights on every call
    else:
        return None
    keep = set(trainable_names(peft))
    return {_clean(k): v.detach().to("cpu") for k, v in (full or {}).items() if _clean(k) in keep}


def optimizer_state(accelerator: Any, model: torch.nn.Module, optimizer: Any, folder: Path) -> dict | None:
    """The optimizer state to put into ``training_state.pt`` (collective: call on all processes).

    FSDP: the full (unsharded) state keyed by parameter name, on the main process. DeepSpeed:
    the engine writes its own partitioned checkpoint into ``folder/deepspeed`` and ``None`` is
    returned. Otherwise: ``optimizer.state_dict()`` as before.
    """
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer.optimizer, options=opts)
    if is_deepspeed(accelerator):
        model.save_checkpoint(str(folder / DEEPSPEED_DIR), tag="state", exclude_frozen_parameters=True)
        return None
    return optimizer.state_dict()


def load_optimizer_state(accelerator: Any, model: torch.nn.Module, optimizer: Any, state: dict | None,
                         folder: Path) -> None:
    """Inverse of :func:`optimizer_state` (collective); each process reads the full state from disk."""
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if state is None or not isinstance(next(iter(state.get("state", {})), ""), str):
            raise UserError(f"checkpoint {folder} was not saved under FSDP; resume it with the launch it was saved with")
        set_optimizer_state_dict(model, optimizer.optimizer, state, options=StateDictOptions(full_state_dict=True))
    elif is_deepspeed(accelerator):
        model.load_checkpoint(str(folder / DEEPSPEED_DIR), tag="state", load_module_strict=False,
                              load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        optimizer.load_state_dict(state)


def load_trained(accelerator: Any, model: torch.nn.Module, peft: torch.nn.Module, adapter_name: str,
                 folder: Path) -> bool:
    """Load a saved adapter (+ unfrozen modules) into sharded parameters; ``False`` if not sharded.

    :func:`~phi4mm_lora.model.adapter_io.model_state` names the saved tensors as the model
    does; every process passes the full tensors and torch keeps its own shard.
    """
    if not is_fsdp(accelerator):
        return False
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from phi4mm_lora.model.adapter_io import model_state

    full = model_state(folder, adapter_name)
    buffers = {n for n, _ in peft.named_buffers()}  # saved with PEFT modules_to_save, never trained
    full = {k: v for k, v in full.items() if k not in buffers}
    wanted = set(trainable_names(peft))
    unknown = sorted(set(full) - wanted)
    if unknown:
        raise UserError(f"{folder}: {len(unknown)} tensors fit no trainable parameter (e.g. {unknown[0]})")
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
    return True


__all__ = [
    "DEEPSPEED_DIR",
    "can_evaluate_on_main",
    "check_setup",
    "clip_parameters",
    "gather_trained",
    "grad_norm_value",
    "is_deepspeed",
    "is_fsdp",
    "kind",
    "load_optimizer_state",
    "load_trained",
    "optimizer_state",
    "params_sharded",
    "trainable_names",
]
