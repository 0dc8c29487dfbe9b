"""Precision plans keep everything that trains in float and quantise exactly what the plan says.

Every plan that runs on CPU (bf16, fp32, int8, nf4, selective; fp16 is refused on CPU by
design, its refusal is tested below) x every adapter mode (pretrained speech adapter, fresh,
stacked, unfreeze) is loaded with ``load_model`` and run forward/backward once on a real
audio+text example built with the loaded processor.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from transformers import Phi4MultimodalForCausalLM

from phi4mm_lora.config import AdapterConfig, ModelConfig
from phi4mm_lora.errors import UserError
from phi4mm_lora.model import precision as P
from phi4mm_lora.model.inventory import model_report
from phi4mm_lora.model.load import load_model
from phi4mm_lora.model.tiny import tiny_config

CPU_PLANS = ("fp32", "bf16", "int8", "nf4", "selective")
MODES = {
    "pretrained": {},
    "fresh": {"mode": "fresh", "r": 4, "alpha": 8},
    "stacked": {"mode": "stacked", "r": 4, "alpha": 8},
    "unfreeze": {"trainable": "unfreeze"},
}
CFG = tiny_config()
AUDIO_TOWER = "model.embed_tokens_extend.audio_embed.encoder."
VISION_TOWER = "model.embed_tokens_extend.image_embed.img_processor."

#: logits of the pretrained-mode forward per plan, filled by the matrix test, compared below.
_LOGITS: dict[str, torch.Tensor] = {}


def _expected_quantised(plan: str, mode: str) -> int:
    """Counted independently of the plan code: 4 decoder linears per layer; selective adds the
    frozen towers' nn.Linear modules, counted on a plain (non-PEFT) model."""
    if plan not in ("int8", "nf4", "selective"):
        return 0
    decoder = CFG.num_hidden_layers * 4  # qkv_proj, o_proj, gate_up_proj, down_proj
    if plan != "selective":
        return decoder
    with torch.device("meta"):
        plain = Phi4MultimodalForCausalLM(CFG)
    towers = (VISION_TOWER,) if mode == "unfreeze" else (AUDIO_TOWER, VISION_TOWER)
    return decoder + sum(1 for n, m in plain.named_modules() if type(m) is torch.nn.Linear and n.startswith(towers))


def test_expected_counts_are_the_tiny_architecture():
    # 2 layers x 4 decoder linears; 2 conformer blocks and 2 SigLIP layers (+ pooling head).
    assert _expected_quantised("int8", "pretrained") == 8
    assert _expected_quantised("nf4", "pretrained") == 8
    assert _expected_quantised("selective", "pretrained") > _expected_quantised("selective", "unfreeze") > 8


def _example(processor):
    """1 s of audio at 16 kHz plus a short chat turn with the processor's audio token."""
    audio = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    text = f"<|user|>{processor.audio_token}Rate the pronunciation.<|end|><|assistant|>accuracy 7<|end|>"
    return processor(text=[text], audio=[audio], sampling_rate=16000, return_tensors="pt")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("plan", CPU_PLANS)
def test_plan_x_mode_trains_only_float_tensors_with_real_gradients(tiny_native, plan, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_model(ModelConfig(path=str(tiny_native), device="cpu"), plan, AdapterConfig(**MODES[mode]))
    model = loaded.model
    state = loaded.adapters
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trainable"

    # No LoRA module and no trainable module is quantised; the count matches the plan exactly.
    quantised = [n for n, m in model.named_modules() if P.is_quantised_module(m)]
    assert not [n for n in quantised if ".lora_" in n]
    for n, m in model.named_modules():
        if P.is_quantised_module(m):
            assert not any(p.requires_grad for p in m.parameters()), n
            inner = n.replace("base_model.model.", "", 1)
            assert not any(inner.startswith(pre + ".") for pre in state.unfrozen_prefixes), n
    assert len(quantised) == _expected_quantised(plan, mode)
    assert sorted(P.quantised_modules(model)) == sorted(loaded.planned_quantised)
    assert P.check_plan(model) == []

    report = model_report(loaded)
    assert report["quantised_modules"] == _expected_quantised(plan, mode)
    bad = [w for w in report["warnings"] if "discarded" not in w]
    assert bad == []

    # A freshly initialised LoRA has B = 0, so dL/dA is exactly 0 until B moves: give the new
    # adapter's B the small values one optimizer step would, so every tensor must get a gradient.
    fresh = state.trainable_adapter if mode in ("fresh", "stacked") else None
    if fresh:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in trainable.items():
                if f".lora_B.{fresh}." in n:
                    p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * 1e-2)

    batch = _example(loaded.processor)
    model.eval()  # no dropout: the logits are comparable across plans; gradients flow all the same
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for n, p in trainable.items():
        assert p.is_floating_point(), f"{n} is {p.dtype}"
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{n} has a non-finite gradient"
        assert torch.count_nonzero(p.grad) > 0, f"{n} got an all-zero gradient"
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {n} got a gradient"
    if mode == "pretrained":
        _LOGITS[plan] = out.logits.detach().float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_quantised_logits_stay_close_to_full_precision(tiny_native):
    """Tolerances (relative L2 error of the logits against fp32, same input, pretrained mode).

    bf16 rounds every weight/activation to 8 mantissa bits (~0.4% per op): measured ~0.01,
    allowed 0.03. LLM.int8 keeps one absmax scale per row over 255 levels, ~1% weight error:
    measured ~0.01, allowed 0.05. NF4 has 16 levels per block of 64 weights: ~10% RMS weight
    error per quantised linear, and the tiny model's two decoder layers (plus, for selective, both
    towers) compound it: measured 0.16 to 0.19, allowed 0.35, with cosine
    similarity > 0.95. A plan that quantised the LoRA or loaded the wrong weights lands near
    1.0 (unrelated logits), far outside these bounds.
    """
    for plan in CPU_PLANS:  # normally filled by the matrix above; computed here when run alone
        if plan not in _LOGITS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = load_model(ModelConfig(path=str(tiny_native), device="cpu"), plan, AdapterConfig())
            loaded.model.eval()
            with torch.no_grad():
                _LOGITS[plan] = loaded.model(**_example(loaded.processor)).logits.float()
    ref = _LOGITS["fp32"]
    assert _rel(_LOGITS["bf16"], ref) < 0.03
    assert _rel(_LOGITS["int8"], ref) < 0.05
    for plan in ("nf4", "selective"):
        assert _rel(_LOGITS[plan], ref) < 0.35, plan
        cos = torch.nn.functional.cosine_similarity(_LOGITS[plan].flatten(), ref.flatten(), dim=0)
        assert float(cos) > 0.95, plan
    # and the NF4 error is real quantisation, not a no-op: it must exceed bf16's rounding.
    assert _rel(_LOGITS["nf4"], ref) > _rel(_LOGITS["bf16"], ref)


# ----------------------------------------------------------------------------- blanket 4-bit load


def test_blanket_4bit_load_is_flagged_and_refused(tiny_native):
    """The user-reported failure: quantise a model that already holds LoRA layers (the remote
    code builds them inside the model) with no skip list - lora_A/lora_B become Linear4bit."""
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    loaded = load_model(ModelConfig(path=str(tiny_native), device="cpu"), "fp32", AdapterConfig(keep_unused=True))
    model = loaded.model
    assert P.check_plan(model) == []
    replace_with_bnb_linear(model, modules_to_not_convert=None, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    lora_q = [n for n, m in model.named_modules() if P.is_quantised_module(m) and ".lora_" in n]
    assert lora_q, "the reproduction did not quantise the LoRA layers"

    problems = P.check_plan(model)
    assert any(p.startswith("LoRA quantised - cannot train") for p in problems)
    report = model_report(model)
    assert any(w.startswith("LoRA quantised - cannot train") for w in report["warnings"])
    assert any(w.startswith("nothing trainable") for w in report["warnings"])
    assert any(w.startswith("LoRA frozen") for w in report["warnings"])
    # the report still counts parameters logically (quantised LoRA counted, not dropped)
    assert report["lora_tensors"] == CFG.num_hidden_layers * 4 * 2 * 2
    assert report["adapters"]["speech"]["quantised_modules"] == CFG.num_hidden_layers * 4 * 2


# ----------------------------------------------------------------------------- bad input


def test_fp16_on_cpu_is_refused_naming_working_plans():
    with pytest.raises(UserError) as e:
        P.resolve_plan("fp16", torch.device("cpu"))
    msg = str(e.value)
    assert "'fp16'" in msg and "not supported on CPU" in msg
    assert "plans that work here: bf16, fp32, int8, nf4, selective" in msg


@pytest.mark.parametrize("plan", ["int8", "nf4", "selective"])
def test_quantised_plans_without_bitsandbytes_are_refused(monkeypatch, plan):
    real = P.importlib.util.find_spec
    monkeypatch.setattr(P.importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    assert P.working_plans(torch.device("cpu")) == ["bf16", "fp32"]
    with pytest.raises(UserError) as e:
        P.resolve_plan(plan, torch.device("cpu"))
    msg = str(e.value)
    assert f"'{plan}'" in msg and "bitsandbytes is not installed" in msg and "plans that work here: bf16, fp32" in msg


def test_quantised_plans_on_mps_are_refused():
    with pytest.raises(UserError, match=r"bitsandbytes has no MPS backend\); plans that work here: .*fp32"):
        P.resolve_plan("nf4", torch.device("mps"))


def test_bf16_on_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(UserError) as e:
        P.resolve_plan("bf16", torch.device("cuda"))
    msg = str(e.value)
    assert "no bf16 support; use fp16" in msg
    assert "plans that work here: fp32, fp16, int8, nf4, selective" in msg


def test_auto_falls_back_with_one_line_warning(monkeypatch):
    with pytest.warns(P.PrecisionFallback) as rec:
        plan = P.resolve_plan("auto", torch.device("cpu"))
    assert plan.name == "fp32" and len(rec) == 1 and "\n" not in str(rec[0].message)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.warns(P.PrecisionFallback, match="lacks bf16, using fp16") as rec:
        plan = P.resolve_plan("auto", torch.device("cuda"))
    assert plan.name == "fp16" and plan.dtype == torch.float16 and len(rec) == 1
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.resolve_plan("auto", torch.device("cuda")).name == "bf16"


def test_unknown_precision_is_a_user_error():
    with pytest.raises(UserError, match="unknown precision 'int4'"):
        P.resolve_plan("int4", torch.device("cpu"))


def test_plan_table_on_a_bf16_gpu():
    """fp16 cannot run here; its plan (and the others' GPU dtypes) are checked as data."""
    gpu = torch.device("cuda")
    assert P.plan_for("fp16", gpu).dtype == torch.float16 and P.plan_for("fp16", gpu).lora_dtype is None
    assert P.plan_for("bf16", gpu).dtype == torch.bfloat16 and not P.plan_for("bf16", gpu).quantised
    assert P.plan_for("int8", gpu).dtype == torch.bfloat16 and P.plan_for("int8", gpu).quant == "int8"
    nf4 = P.plan_for("nf4", gpu)
    assert nf4.quant == "nf4" and not nf4.quantise_towers and nf4.lora_dtype is None
    sel = P.plan_for("selective", gpu)
    assert sel.quant == "nf4" and sel.quantise_towers and sel.lora_dtype == torch.bfloat16
    linear = [
        "model.layers.0.self_attn.qkv_proj",
        "model.layers.0.mlp.down_proj",
        "model.embed_tokens_extend.audio_embed.encoder.encoders.0.self_attn.q_proj",
        "model.embed_tokens_extend.image_embed.img_processor.encoder.layers.0.mlp.fc1",
        "model.embed_tokens_extend.audio_embed.up_proj_for_speech",
        "lm_head",
    ]
    assert nf4.modules_to_quantise(linear, []) == linear[:2]
    assert sel.modules_to_quantise(linear, []) == linear[:4]
    # an unfrozen tower is never quantised
    assert sel.modules_to_quantise(linear, ["model.embed_tokens_extend.audio_embed.encoder"]) == [linear[0], linear[1], linear[3]]
    assert P.plan_for("fp32", gpu).modules_to_quantise(linear, []) == []


# ----------------------------------------------------------------------------- no fp32 detour


def test_bf16_load_never_goes_through_fp32(tiny_native, tiny_official, monkeypatch):
    """Native: from_pretrained gets dtype=bf16 (transformers casts tensor by tensor while
    loading onto meta-initialised modules). Official: each tensor is cast as it is read."""
    from phi4mm_lora.model import convert

    seen: dict[str, object] = {}
    real_fp = Phi4MultimodalForCausalLM.from_pretrained.__func__

    def spy_fp(cls, *a, **kw):
        seen["dtype"] = kw.get("dtype")
        return real_fp(cls, *a, **kw)

    real_read = convert.read_official

    def spy_read(folder, dtype=None):
        out = real_read(folder, dtype=dtype)
        seen["official_dtype"] = dtype
        seen["official_base_dtypes"] = {t.dtype for t in out[1].values() if t.is_floating_point()}
        return out

    monkeypatch.setattr(Phi4MultimodalForCausalLM, "from_pretrained", classmethod(spy_fp))
    monkeypatch.setattr(convert, "read_official", spy_read)
    for path in (tiny_native, tiny_official):
        loaded = load_model(ModelConfig(path=str(path), device="cpu"), "bf16", AdapterConfig())
        base = {n: p for n, p in loaded.model.named_parameters() if ".lora_" not in n}
        assert {p.dtype for p in base.values()} == {torch.bfloat16}, path
        decoder = [p for n, p in base.items() if re.search(r"model\.layers\.\d+\.", n)]
        assert decoder and all(p.dtype == torch.bfloat16 for p in decoder)
    assert seen["dtype"] == torch.bfloat16
    assert seen["official_dtype"] == torch.bfloat16 and seen["official_base_dtypes"] == {torch.bfloat16}


def test_bf16_load_allocates_no_large_fp32_tensor(tiny_native, tiny_official):
    """Every op run while loading is watched: a model materialised in fp32 first would create
    the 200064 x 64 fp32 embedding (12.8M values). In bf16 no op may produce a >= 1M-value fp32
    tensor, except views of the bytes read from an fp32 file (official layout: the tensor is
    read, viewed as fp32 and cast right away, one tensor at a time - no new fp32 storage).
    Meta tensors (the skeleton the weights are assigned into) hold no memory and are ignored."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.big: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and not t.is_meta and t.dtype == torch.float32 and t.numel() >= 1_000_000:
                    self.big.append(str(func))
            return out

    aliasing = ("aten.view.", "aten.detach.", "aten._unsafe_view.", "aten.alias.")
    for path, allowed in ((tiny_native, ()), (tiny_official, aliasing)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Watch() as w:
                load_model(ModelConfig(path=str(path), device="cpu"), "bf16", AdapterConfig())
        assert [f for f in w.big if not f.startswith(allowed) or not allowed] == [], path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Watch() as w:  # the check does see fp32 when the plan is fp32
            load_model(ModelConfig(path=str(tiny_native), device="cpu"), "fp32", AdapterConfig())
    assert w.big


def test_selective_never_quantises_an_unfrozen_vision_tower(tiny_native):
    """trainable=vision unfreezes the vision tower and projector: selective must leave them in float."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_model(ModelConfig(path=str(tiny_native), device="cpu"), "selective", AdapterConfig(trainable="vision"))
    with torch.device("meta"):
        plain = Phi4MultimodalForCausalLM(CFG)
    audio_linears = sum(1 for n, m in plain.named_modules() if type(m) is torch.nn.Linear and n.startswith(AUDIO_TOWER))
    quantised = P.quantised_modules(loaded.model)
    assert len(quantised) == CFG.num_hidden_layers * 4 + audio_linears
    assert not [n for n in quantised if n.startswith(VISION_TOWER) or ".lora_" in n]
    vision = [p for n, p in loaded.model.named_parameters() if VISION_TOWER in n]
    assert vision and all(p.requires_grad and p.is_floating_point() for p in vision)
    assert P.check_plan(loaded.model) == []
