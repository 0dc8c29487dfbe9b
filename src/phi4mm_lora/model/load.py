"""Load any Phi-4-multimodal checkpoint with native transformers classes and PEFT adapters.

No remote code is ever executed: the official layout is read as tensors and renamed
(:mod:`phi4mm_lora.model.convert`), the native layout loads with
``Phi4MultimodalForCausalLM.from_pretrained``. The same function loads the 5.6B checkpoint
and the tiny test model; only the folder differs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import Phi4MultimodalForCausalLM, Phi4MultimodalProcessor

from phi4mm_lora.config import AdapterConfig, ModelConfig
from phi4mm_lora.errors import UserError
from phi4mm_lora.fileio import check_weight_files
from phi4mm_lora.model import attention, convert
from phi4mm_lora.model.adapter_io import read_peft_folder
from phi4mm_lora.model.adapters import AdapterState, Pretrained, attach_adapters
from phi4mm_lora.model.precision import (
    PrecisionPlan,
    check_plan,
    pick_device,
    quantised_modules,
    resolve_plan,
)

if TYPE_CHECKING:
    from phi4mm_lora.model.inference import MergeState

#: The hub revision that holds the converted native layout (speech-lora/, vision-lora/).
NATIVE_REVISION = "refs/pr/70"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Loaded:
    """A ready model: PEFT-wrapped, adapters attached, trainable set applied."""

    model: torch.nn.Module  # peft.PeftModel
    processor: Phi4MultimodalProcessor
    path: Path
    layout: str
    plan: PrecisionPlan
    adapters: AdapterState
    planned_quantised: list[str]
    #: set by :func:`phi4mm_lora.model.inference.merge_for_inference`; None: not loaded for inference
    merge: MergeState | None = None


def resolve_path(model_cfg: ModelConfig) -> Path:
    """Local folder for ``model.path``: the tiny model when empty, a hub snapshot for an id."""
    if model_cfg.path is None:
        from phi4mm_lora.model.tiny import ensure_tiny

        return ensure_tiny("native", base=model_cfg.tiny)
    p = Path(model_cfg.path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"model path {p} is a file; pass the checkpoint folder that holds config.json")
        return p
    if HUB_ID.match(model_cfg.path) and not model_cfg.path.startswith((".", "/")):
        return _snapshot(model_cfg.path, model_cfg.revision or NATIVE_REVISION)
    raise UserError(f"model path {model_cfg.path} does not exist; pass a checkpoint folder or a hub id (org/name)")


def _snapshot(repo_id: str, revision: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as exc:  # network, auth, missing revision
        raise UserError(
            f"could not fetch {repo_id}@{revision} from the hub ({type(exc).__name__}: {str(exc)[:200]}); "
            "download it elsewhere and set model.path to the local folder (model.path=DIR)"
        ) from None


def detect_layout(folder: Path) -> str:
    """``native`` or ``official``; anything else is not a Phi-4-multimodal checkpoint."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{folder} has no config.json: not a model checkpoint folder")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_file} is not valid JSON ({exc})") from None
    if model_type == "phi4_multimodal":
        return "native"
    if model_type == "phi4mm":
        return "official"
    raise UserError(f"{folder} holds a {model_type!r} model, not Phi-4-multimodal (expected model_type phi4_multimodal or phi4mm)")


def _linear_names(config) -> list[str]:
    with torch.device("meta"):
        skeleton = Phi4MultimodalForCausalLM(config)
    return [n for n, m in skeleton.named_modules() if type(m) is torch.nn.Linear]


def load_base(folder: Path, layout: str, plan: PrecisionPlan, adapter_cfg: AdapterConfig, attn: str = "sdpa") -> tuple[torch.nn.Module, dict[str, Pretrained], list[str]]:
    """Base model in the plan's dtypes plus the checkpoint's pretrained adapters (not attached)."""
    from phi4mm_lora.model.adapters import unfrozen_prefixes

    attn = attention.implementation(attn)
    if layout == "official":
        if plan.quantised:
            raise UserError(
                f"precision {plan.name} loads the native layout; convert once with "
                f"`phi4mm-lora convert {folder} NATIVE_DIR` and pass NATIVE_DIR"
            )
        model, specs, weights = convert.build_from_official(folder, dtype=plan.dtype, attn=attn)
        _materialise_buffers(model, model.config)
        model.to(plan.device)
        pretrained = {n: (convert.lora_config_from_spec(specs[n]), w) for n, w in weights.items() if n in specs}
        return model.eval(), pretrained, []

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    kwargs: dict = {"dtype": plan.dtype, "attn_implementation": attn}
    planned: list[str] = []
    if plan.quantised:
        linear = _linear_names(config)
        planned = plan.modules_to_quantise(linear, unfrozen_prefixes(adapter_cfg.trainable))
        skip = [re.escape(n) for n in linear if n not in set(planned)]
        kwargs["quantization_config"] = plan.bnb_config(skip)
        kwargs["device_map"] = {"": plan.device}
    elif plan.device.type != "cpu":
        kwargs["device_map"] = {"": plan.device}
    check_weight_files(folder)
    try:
        model = Phi4MultimodalForCausalLM.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except (RuntimeError, OSError, ValueError) as exc:
        raise UserError(f"{folder}: cannot load the weights: {_weights_mismatch(folder, config) or str(exc)[:200]}; "
                        "config.json and the *.safetensors files must come from the same checkpoint") from None
    pretrained = {}
    for name in ("speech", "vision"):
        sub = folder / f"{name}-lora"
        if sub.is_dir():
            cfg, w = read_peft_folder(sub)
            convert.check_adapter_nonzero(name, w)
            pretrained[name] = (cfg, w)
    return model.eval(), pretrained, planned


def _weights_mismatch(folder: Path, config) -> str | None:
    """One tensor whose stored shape differs from what config.json builds (headers only)."""
    from phi4mm_lora.fileio import safetensors_header

    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in Phi4MultimodalForCausalLM(config).state_dict().items()}
    for f in sorted(folder.glob("*.safetensors")):
        for name, meta in safetensors_header(f).items():
            want = expected.get(name)
            if want is not None and tuple(meta["shape"]) != want:
                return f"{name} is {tuple(meta['shape'])} in {f.name} but config.json makes it {want}"
    return None


def _materialise_buffers(model: torch.nn.Module, config) -> None:
    """Non-persistent buffers (rotary inv_freq) stay on meta after assign-loading; rebuild them."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            fresh = type(module)(config=config)
            module.inv_freq = fresh.inv_freq
            module.original_inv_freq = fresh.original_inv_freq
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise UserError(f"buffer {name} was not in the checkpoint; the checkpoint is incomplete")


def load_processor(folder: Path, layout: str = "native") -> Phi4MultimodalProcessor:
    """The native processor; for the official layout it is assembled from plain files.

    The official folder's processor is remote code, and even reading its config.json through
    the Auto classes would offer to execute it, so its parts are built explicitly here.
    """
    try:
        if layout == "native":
            return Phi4MultimodalProcessor.from_pretrained(folder, trust_remote_code=False)
        return _official_processor(folder)
    except UserError:
        raise
    except Exception as exc:
        vision = torchvision_problem()
        if vision:
            raise UserError(f"{folder}: cannot load the processor: {vision[0]}; fix: {vision[1]}") from None
        raise UserError(f"{folder}: cannot load the processor/tokenizer ({type(exc).__name__}: {str(exc)[:200]})") from None


def torchvision_problem() -> tuple[str, str] | None:
    """(problem, fix) when transformers cannot build Phi-4-multimodal's processor for want of torchvision.

    transformers builds the processor's image part with torchvision (4.57.6, 5.17 and 5.24 were
    tried: the config names the torchvision class, and there is no PIL fallback), so without it no
    processor loads, even for audio-only work; transformers' own message is long and names
    no fix. A torchvision built for another torch release fails at import instead
    ("operator torchvision::nms does not exist"). torchvision 0.N pairs with torch 2.(N-15).
    """
    minor = torch.__version__.split(".")[1]
    fix = (f"pip install 'torchvision==0.{int(minor) + 15}.*' (built for torch {torch.__version__})" if minor.isdigit()
           else f"install the torchvision release built for torch {torch.__version__}")
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "torchvision":
            return f"torchvision does not import (it needs {exc.name})", fix
        return "torchvision is not installed, and transformers needs it for Phi-4-multimodal's processor", fix
    except Exception as exc:
        return f"torchvision does not import ({type(exc).__name__}: {str(exc)[:120]})", fix
    return None


def _official_processor(folder: Path) -> Phi4MultimodalProcessor:
    from transformers import Phi4MultimodalFeatureExtractor

    from phi4mm_lora.model.compat import Phi4MultimodalImageProcessor, fast_tokenizer_class
    from phi4mm_lora.model.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN, check_special_ids

    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder} has no tokenizer.json; copy the checkpoint's tokenizer files there")
    # preprocessor_config.json holds the audio and image settings as flat keys; it (and
    # processor_config.json) also names remote code through auto_map, which is ignored here.
    settings = {}
    if (folder / "preprocessor_config.json").is_file():
        settings = json.loads((folder / "preprocessor_config.json").read_text())
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
    template = (folder / "chat_template.jinja").read_text() if (folder / "chat_template.jinja").is_file() else tok_cfg.get("chat_template")
    tokenizer = fast_tokenizer_class()(
        tokenizer_file=str(folder / "tokenizer.json"),
        bos_token=tok_cfg.get("bos_token", "<|endoftext|>"),
        eos_token=tok_cfg.get("eos_token", "<|endoftext|>"),
        pad_token=tok_cfg.get("pad_token", "<|endoftext|>"),
        unk_token=tok_cfg.get("unk_token", "<|endoftext|>"),
        extra_special_tokens={"audio_token": AUDIO_TOKEN, "image_token": IMAGE_TOKEN},
        model_max_length=tok_cfg.get("model_max_length", 131072),
        chat_template=template,
    )
    check_special_ids(tokenizer)
    if "compression_rate" in settings:
        settings.setdefault("audio_compression_rate", settings["compression_rate"])
    audio_kw = {k: settings[k] for k in _init_params(Phi4MultimodalFeatureExtractor) if k in settings}
    image_kw = {k: settings[k] for k in ("dynamic_hd",) if k in settings}
    return Phi4MultimodalProcessor(
        image_processor=Phi4MultimodalImageProcessor(**image_kw),
        audio_processor=Phi4MultimodalFeatureExtractor(**audio_kw),
        tokenizer=tokenizer,
    )


def _init_params(cls) -> list[str]:
    import inspect

    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]


def load_model(model_cfg: ModelConfig, precision: str, adapter_cfg: AdapterConfig) -> Loaded:
    """The one entry point: path -> base (plan dtypes) -> PEFT adapters -> trainable set -> checks."""
    folder = resolve_path(model_cfg)
    layout = detect_layout(folder)
    device = pick_device(model_cfg.device)
    plan = resolve_plan(precision, device)
    torch.backends.cuda.enable_cudnn_sdp(model_cfg.sdpa_cudnn)  # process-wide: each load states its own
    model, pretrained, planned = load_base(folder, layout, plan, adapter_cfg, model_cfg.attn_implementation)
    peft, state = attach_adapters(model, adapter_cfg, pretrained, lora_dtype=plan.lora_dtype)
    if not plan.quantised:
        peft.to(plan.device)
    if plan.quantised:
        got = sorted(quantised_modules(peft))
        if got != sorted(planned):
            raise UserError(f"quantisation did not follow the plan: {len(got)} modules quantised, {len(planned)} planned")
    problems = check_plan(peft)
    if problems:
        raise UserError("model cannot train: " + "; ".join(problems[:5]))
    peft.eval()  # new LoRA dropout modules start in train mode; callers opt into training
    return Loaded(peft, load_processor(folder, layout), folder, layout, plan, state, planned)
