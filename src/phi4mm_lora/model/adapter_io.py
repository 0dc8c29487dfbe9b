"""The adapter folder format, in one place: file names, key prefixes, LoRA names, save and load.

An adapter folder is what PEFT's ``PeftModel.save_pretrained`` writes for one adapter:

* ``adapter_config.json`` (:data:`ADAPTER_CONFIG`): the ``LoraConfig``, plus
  ``modules_to_save`` when unfrozen modules trained with it;
* ``adapter_model.safetensors`` (:data:`ADAPTER_WEIGHTS`): the LoRA tensors as
  ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` - prefixed with
  :data:`PEFT_PREFIX` and *without* the adapter name, which the live model puts between
  ``lora_A`` and ``weight`` (``...lora_A.speech.weight``) - and the unfrozen modules' tensors
  as ``base_model.model.<module>.<param>``;
* ``trainable_modules.safetensors`` (:data:`EXTRA_FILE`), only in runs saved before unfrozen
  modules became PEFT ``modules_to_save``, or when the trained tensors are not whole modules
  (which ``modules_to_save`` cannot express): unprefixed ``<module>.<param>``.

Every LoRA parameter/module/key name in the project is parsed by the one regex
:data:`LORA_NAME` (:func:`lora_parts`, :func:`is_lora`, :func:`lora_adapter`) and every
``base_model.model.`` edit goes through :func:`strip_prefix` / :func:`add_prefix`.

What PEFT does and what is done here:

* saving goes through ``PeftModel.save_pretrained`` (so through PEFT's
  ``get_peft_model_state_dict``, also for an FSDP-gathered ``state_dict``);
* loading the LoRA tensors goes through PEFT's ``set_peft_model_state_dict``, which re-inserts
  the adapter name;
* the unfrozen modules are *not* PEFT ``ModulesToSaveWrapper`` modules in the live model (the
  trainer unfreezes the base modules in place, so the optimizer, FSDP and ``merge_and_unload``
  see plain parameters). Their saved keys therefore are the plain parameter names, which
  ``set_peft_model_state_dict`` would load only as a side effect of its non-strict
  ``load_state_dict`` (a name that fits nothing ends up in ``unexpected_keys``, a wrong shape
  is a bare RuntimeError, and the older :data:`EXTRA_FILE` is never read). So
  :func:`load_extra_modules` copies them, with name and shape checks whose errors name the
  folder, and the LoRA tensors alone go to PEFT;
* a sharded model (FSDP) cannot take ``set_peft_model_state_dict``: its parameters are
  DTensor shards that plain ``load_state_dict`` cannot copy a full tensor into; torch's
  ``set_model_state_dict(full_state_dict=True)`` scatters them, and :func:`model_state` gives
  it the tensors keyed as the model names them. PEFT's own key remapping for that
  (``_insert_adapter_name_into_state_dict``, the tuner's ``_remap_adapter_state_dict_for_load``)
  is private API, which the supported range (peft 0.18 to 0.21) does not promise, so it is
  done here with :data:`LORA_NAME`.

Heavy imports (torch, peft, safetensors) happen inside the functions: the CLI imports the
constants of this module while building its parser.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi4mm_lora.errors import UserError

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Unfrozen-module tensors PEFT cannot carry (and every run saved before modules_to_save).
EXTRA_FILE = "trainable_modules.safetensors"
#: The two files every adapter folder holds.
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
#: What ``PeftModel`` puts before the wrapped model's own names (in parameters and saved keys).
PEFT_PREFIX = "base_model.model."

#: A LoRA tensor or module name, in every spelling the project meets:
#: ``<module>.lora_A.<adapter>.weight`` (a live PeftModel's parameter; the official layout's
#: shard key), ``<module>.lora_A.weight`` (a PEFT adapter file: no adapter name),
#: ``<module>.lora_A.<adapter>`` (the LoRA linear module itself), ``<module>.lora_A`` (its
#: ModuleDict); ``lora_embedding_A/B`` likewise (LoRA on an embedding). ``<module>`` keeps any
#: :data:`PEFT_PREFIX`. An adapter cannot be named ``weight`` (PEFT's own names cannot hold a dot).
LORA_NAME = re.compile(
    r"^(?P<module>.+)\.lora_(?P<part>(?:embedding_)?[AB])"
    r"(?:\.(?!weight$)(?P<adapter>[^.]+))?(?P<leaf>\.weight)?$"
)

#: ``{module: {"A": tensor, "B": tensor}}``: one adapter's LoRA weights, modules unprefixed.
LoraWeights = dict[str, dict[str, "torch.Tensor"]]


# ----------------------------------------------------------------------------- names


def lora_parts(name: str) -> tuple[str, str, str | None] | None:
    """``(module, part, adapter or None)`` of a LoRA name, ``None`` for any other name.

    ``part`` is ``"A"``/``"B"`` (``"embedding_A"``/``"embedding_B"`` for LoRA on an embedding).
    """
    m = LORA_NAME.match(name)
    return (m["module"], m["part"], m["adapter"]) if m else None


def is_lora(name: str) -> bool:
    """Whether ``name`` is a LoRA tensor/module (of any adapter)."""
    return LORA_NAME.match(name) is not None


def lora_adapter(name: str) -> str | None:
    """The adapter a LoRA name belongs to (``None``: not LoRA, or a saved key without the name)."""
    m = LORA_NAME.match(name)
    return m["adapter"] if m else None


def with_adapter(key: str, adapter: str) -> str:
    """A saved LoRA key (``...lora_A.weight``) as the model names it (``...lora_A.<adapter>.weight``)."""
    m = LORA_NAME.match(key)
    if m is None or m["adapter"] is not None or not m["leaf"]:
        return key
    return f"{m['module']}.lora_{m['part']}.{adapter}{m['leaf'] or ''}"


def lora_key(module: str, part: str, adapter: str | None = None) -> str:
    """The key of one LoRA matrix: PEFT file style without ``adapter``, model/official style with it."""
    return f"{module}.lora_{part}.{adapter}.weight" if adapter else f"{module}.lora_{part}.weight"


def strip_prefix(name: str) -> str:
    """``name`` without PEFT's ``base_model.model.`` (its first occurrence, so a wrapper prefix
    such as FSDP1's ``_fsdp_wrapped_module.`` in front of it does not hide it)."""
    return name.replace(PEFT_PREFIX, "", 1)


def add_prefix(name: str) -> str:
    return PEFT_PREFIX + name


def lora_weights_by_adapter(model: torch.nn.Module) -> dict[str, LoraWeights]:
    """``{adapter: {module: {"A", "B"}}}`` of every attached adapter (CPU copies, modules unprefixed)."""
    out: dict[str, LoraWeights] = {}
    for name, p in model.named_parameters():
        parts = lora_parts(name)
        if parts and parts[1] in ("A", "B") and parts[2] and name.startswith(PEFT_PREFIX):
            module, part, adapter = parts
            out.setdefault(adapter, {}).setdefault(strip_prefix(module), {})[part] = p.detach().to("cpu").clone()
    return out


# ----------------------------------------------------------------------------- folders


def is_adapter_folder(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ADAPTER_FILES)


def check_adapter_folder(path: str | Path, what: str = "adapter") -> None:
    """A PEFT adapter folder: config + weights present, config JSON, weights not truncated."""
    from phi4mm_lora.fileio import read_text, safetensors_header

    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"{what} {p} not found; pass a folder holding {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    for name in ADAPTER_FILES:
        if not (p / name).is_file():
            raise UserError(f"{what} {p} has no {name}; pass a trained adapter folder (RUN/adapter)")
    try:
        json.loads(read_text(p / ADAPTER_CONFIG, f"{what} config"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{p / ADAPTER_CONFIG} is not valid JSON ({exc}); the adapter is damaged") from None
    for f in sorted(p.glob("*.safetensors")):
        safetensors_header(f, f"{what} weights")


def read_lora_config(folder: Path) -> LoraConfig:
    from peft import LoraConfig

    try:
        return LoraConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"{folder / ADAPTER_CONFIG} is not a valid adapter config ({str(exc)[:160]}); "
                        "the adapter is damaged") from None


def read_peft_folder(folder: Path) -> tuple[LoraConfig, LoraWeights]:
    """A saved PEFT adapter folder as (config, ``{module: {"A", "B"}}``)."""
    from safetensors.torch import load_file

    from phi4mm_lora.fileio import safetensors_header

    cfg_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights_file.is_file():
        raise UserError(f"{folder} is not a PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    safetensors_header(weights_file, "adapter weights")
    cfg = read_lora_config(folder)
    weights: LoraWeights = {}
    for key, t in load_file(str(weights_file)).items():
        parts = lora_parts(key)
        if parts and parts[1] in ("A", "B") and key.startswith(PEFT_PREFIX) and key.endswith(".weight"):
            weights.setdefault(strip_prefix(parts[0]), {})[parts[1]] = t
    return cfg, weights


def peft_state(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """``{module: {"A", "B"}}`` as the keys of a PEFT adapter file (what ``set_peft_model_state_dict`` takes)."""
    out = {}
    for module, ab in weights.items():
        for part in ("A", "B"):
            out[add_prefix(lora_key(module, part))] = ab[part]
    return out


def write_lora_weights(folder: Path, weights: LoraWeights, dtype: torch.dtype | None = None) -> None:
    """Write ``{module: {"A", "B"}}`` as the folder's adapter weights file (the config is the caller's)."""
    from safetensors.torch import save_file

    tensors = {k: (t if dtype is None else t.to(dtype)).contiguous() for k, t in peft_state(weights).items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- load


def load_lora(peft: PeftModel, adapter_name: str, weights: LoraWeights) -> None:
    """Put ``{module: {"A", "B"}}`` into adapter ``adapter_name`` (PEFT's ``set_peft_model_state_dict``)."""
    from peft import set_peft_model_state_dict

    try:
        result = set_peft_model_state_dict(peft, peft_state(weights), adapter_name=adapter_name)
    except RuntimeError as exc:  # "size mismatch for ...": another base model or another rank
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).splitlines()[0])
        raise UserError(f"adapter {adapter_name!r} does not fit this model ({first[:200]}); it was trained on another "
                        "base model or with another adapter.r/target_modules") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise UserError(f"adapter {adapter_name!r}: {len(unexpected)} tensors fit no module (e.g. {unexpected[0]})")


def load_adapter(peft: PeftModel, adapter_name: str, folder: Path) -> int:
    """Load a saved adapter folder completely into an unsharded model: the LoRA tensors into
    adapter ``adapter_name`` and the unfrozen modules' tensors; returns how many tensors.

    The one loader for ``adapter.init_from`` and for resuming from a checkpoint's ``adapter/``;
    a sharded (FSDP) model takes :func:`model_state` instead.
    """
    _, weights = read_peft_folder(folder)
    load_lora(peft, adapter_name, weights)
    return 2 * len(weights) + load_extra_modules(peft, folder)


def model_state(folder: Path, adapter_name: str) -> dict[str, torch.Tensor]:
    """Every tensor of an adapter folder keyed as the live PeftModel names it (full tensors).

    For loaders that scatter a full state dict into sharded parameters (FSDP:
    ``set_model_state_dict(full_state_dict=True)``): LoRA keys get the adapter name,
    :data:`EXTRA_FILE` keys the PEFT prefix; ``modules_to_save`` keys already are model names.
    """
    from safetensors.torch import load_file

    full = {with_adapter(k, adapter_name): v for k, v in load_file(str(folder / ADAPTER_WEIGHTS)).items()}
    if (folder / EXTRA_FILE).is_file():
        full.update({add_prefix(k): v for k, v in load_file(str(folder / EXTRA_FILE)).items()})
    return full


def load_extra_modules(peft: PeftModel, folder: Path) -> int:
    """Load unfrozen-module weights saved with an adapter; returns how many tensors.

    Reads PEFT's ``modules_to_save`` tensors from :data:`ADAPTER_WEIGHTS` (the non-LoRA keys)
    and, for runs saved before that format, :data:`EXTRA_FILE`.
    """
    import torch
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    weights_file = folder / ADAPTER_WEIGHTS
    if weights_file.is_file():
        tensors.update({strip_prefix(k): v for k, v in load_file(str(weights_file)).items() if not is_lora(k)})
    f = folder / EXTRA_FILE
    if f.is_file():
        from phi4mm_lora.fileio import safetensors_header

        safetensors_header(f, "trained-module weights")
        tensors.update(load_file(str(f)))
    if not tensors:
        return 0
    target = peft.base_model.model
    params = {**dict(target.named_buffers()), **dict(target.named_parameters())}
    missing = [k for k in tensors if k not in params]
    if missing:
        raise UserError(f"{folder}: {len(missing)} unfrozen-module tensors fit no module (e.g. {missing[0]})")
    wrong = [k for k, t in tensors.items() if tuple(t.shape) != tuple(params[k].shape)]
    if wrong:
        raise UserError(f"{folder}: {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, the model's is "
                        f"{tuple(params[wrong[0]].shape)}; it was trained on another base model")
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t.to(params[k].dtype))
    return len(tensors)


# ----------------------------------------------------------------------------- save


def trained_modules_state(peft: PeftModel, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The trained non-LoRA tensors (unfrozen modules), unprefixed, as CPU copies.

    ``state_dict``: a gathered full state dict of the trainable tensors (FSDP/DeepSpeed);
    by default the live parameters that require grad.
    """
    if state_dict is None:
        items = [(n, p) for n, p in peft.named_parameters() if p.requires_grad]
    else:
        items = list(state_dict.items())
    return {strip_prefix(n): p.detach().to("cpu").contiguous() for n, p in items if not is_lora(n)}


def save_adapter(peft: PeftModel, adapter_name: str, out_dir: Path,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save adapter ``adapter_name`` and the trained unfrozen modules as one PEFT adapter folder.

    Unfrozen modules are saved the way PEFT saves ``modules_to_save``: listed in
    :data:`ADAPTER_CONFIG` and stored in :data:`ADAPTER_WEIGHTS` as
    ``base_model.model.<module>.<param>``, so ``PeftModel.from_pretrained(base, folder)`` (and
    the Hub, vLLM's PEFT loader, transformers' ``load_adapter``) applies them instead of
    silently running the model without them. Only when the trained tensors are not whole
    modules (which PEFT cannot express) do they go to :data:`EXTRA_FILE`, with a warning that
    plain PEFT will ignore them.

    ``state_dict``: full tensors gathered beforehand (FSDP/DeepSpeed shard the live
    parameters); by default the live parameters.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # LoRA on lm_head (tied to the embeddings) never changes the base embedding matrix, so PEFT's
    # default of saving the whole embedding layer would only add vocab x hidden frozen weights.
    kwargs = {} if state_dict is None else {"state_dict": state_dict}
    peft.save_pretrained(str(out_dir), selected_adapters=[adapter_name], save_embedding_layers=False, **kwargs)
    # PEFT puts a non-"default" adapter in a subfolder; flatten so the folder itself loads.
    sub = out_dir / adapter_name
    if sub.is_dir():
        for f in sub.iterdir():
            f.replace(out_dir / f.name)
        sub.rmdir()
    extra = trained_modules_state(peft, state_dict)
    if extra:
        _save_extra(peft, out_dir, extra)
    return out_dir


def _save_extra(peft: PeftModel, out_dir: Path, extra: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file

    modules = modules_to_save_for(peft.base_model.model, set(extra))
    if modules is None:
        save_file(extra, str(out_dir / EXTRA_FILE), metadata={"format": "pt"})
        warnings.warn(f"{len(extra)} unfrozen tensors are not whole modules, so PEFT cannot carry them: they are in "
                      f"{out_dir / EXTRA_FILE}, which plain PeftModel.from_pretrained ignores; export with "
                      "`phi4mm-lora export RUN --format merged` to share this model", stacklevel=3)
        return
    # PEFT loads a module's whole state dict: its persistent buffers (feature normalisation of
    # the audio encoder) go with the trained parameters (named_buffers, not state_dict(): under
    # FSDP that would be a collective on one process)
    inner = peft.base_model.model
    for m in modules:
        mod = inner.get_submodule(m)
        for k, v in mod.named_buffers():
            owner, _, leaf = k.rpartition(".")
            if leaf not in mod.get_submodule(owner)._non_persistent_buffers_set:  # fp32 like the master weights
                extra.setdefault(f"{m}.{k}", v.detach().to("cpu", torch.float32 if v.is_floating_point()
                                                            else v.dtype).contiguous())
    add_modules_to_save(out_dir, extra, modules)


def modules_to_save_for(model: torch.nn.Module, trained: set[str]) -> list[str] | None:
    """The fewest whole modules whose parameters are exactly ``trained`` (None if there are none).

    A module qualifies when every parameter below it trained (so it holds no frozen LoRA base
    layer and no untrained part); each trained tensor is covered by its highest qualifying
    ancestor. A tensor whose own module does not qualify (a bare parameter next to frozen ones)
    makes the set inexpressible as PEFT ``modules_to_save``.
    """
    total: dict[str, int] = {}
    hits: dict[str, int] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            total[prefix] = total.get(prefix, 0) + 1
            if name in trained:
                hits[prefix] = hits.get(prefix, 0) + 1
    chosen: set[str] = set()
    for name in trained:
        parts = name.split(".")
        whole = [".".join(parts[:i]) for i in range(1, len(parts))
                 if hits.get(".".join(parts[:i])) == total.get(".".join(parts[:i]))]
        if not whole or whole[-1] != ".".join(parts[:-1]):
            return None  # the parameter's own module also holds frozen tensors
        chosen.add(whole[0])
    return sorted(chosen)


def add_modules_to_save(folder: Path, extra: dict[str, torch.Tensor], modules: list[str]) -> None:
    """Put unfrozen tensors into the adapter file in PEFT's ``modules_to_save`` format."""
    from safetensors.torch import load_file, save_file

    weights_file, cfg_file = folder / ADAPTER_WEIGHTS, folder / ADAPTER_CONFIG
    tensors = dict(load_file(str(weights_file)))
    tensors.update({add_prefix(k): v.contiguous() for k, v in extra.items()})
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    cfg = json.loads(cfg_file.read_text())
    cfg["modules_to_save"] = modules
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FILES",
    "ADAPTER_WEIGHTS",
    "EXTRA_FILE",
    "LORA_NAME",
    "PEFT_PREFIX",
    "LoraWeights",
    "add_modules_to_save",
    "add_prefix",
    "check_adapter_folder",
    "is_adapter_folder",
    "is_lora",
    "load_adapter",
    "load_extra_modules",
    "load_lora",
    "lora_adapter",
    "lora_key",
    "lora_parts",
    "lora_weights_by_adapter",
    "model_state",
    "modules_to_save_for",
    "peft_state",
    "read_lora_config",
    "read_peft_folder",
    "save_adapter",
    "strip_prefix",
    "trained_modules_state",
    "with_adapter",
    "write_lora_weights",
]
