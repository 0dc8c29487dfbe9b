"""The adapter folder format has one home (model/adapter_io.py), and it round-trips.

LoRA names are checked against names PEFT itself produces (a real PeftModel's parameters,
its LoraLayer modules and ``get_peft_model_state_dict``) and against the published layout's
key spelling (shared/docs/official-layout.md), not against the project's own writer.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

import phi4mm_lora
from phi4mm_lora.config import AdapterConfig, ModelConfig
from phi4mm_lora.errors import UserError
from phi4mm_lora.model import adapter_io as io
from phi4mm_lora.model.adapters import save_trained
from phi4mm_lora.model.load import load_model

SPEECH_PROJ = "model.embed_tokens_extend.audio_embed.up_proj_for_speech"


def _load(path: Path):
    # both named adapters (speech trains, vision is kept), and unfrozen audio modules saved as modules_to_save
    return load_model(ModelConfig(path=str(path)), "fp32", AdapterConfig(keep_unused=True, trainable="unfreeze"))


@pytest.fixture(scope="module")
def trained(tiny_native, tmp_path_factory):
    """A model whose trainable tensors moved away from the checkpoint's, saved as an adapter folder."""
    loaded = _load(tiny_native)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in loaded.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen))
    folder = tmp_path_factory.mktemp("adapter")
    save_trained(loaded.model, loaded.adapters, folder)
    return loaded, folder


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _vision(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if io.lora_adapter(n) == "vision"}


def test_save_then_load_gives_equal_tensors_and_leaves_the_other_adapter_alone(trained, tiny_native):
    loaded, folder = trained
    want = _trainable(loaded.model)
    assert any(io.lora_adapter(n) == "speech" for n in want) and any(n.startswith(io.PEFT_PREFIX + SPEECH_PROJ) for n in want)
    cfg = json.loads((folder / io.ADAPTER_CONFIG).read_text())
    assert SPEECH_PROJ in cfg["modules_to_save"]  # unfrozen modules travel the PEFT way
    assert not (folder / io.EXTRA_FILE).exists()

    fresh = _load(tiny_native)
    vision_before = _vision(fresh.model)
    before = _trainable(fresh.model)
    assert all(not torch.equal(before[n], want[n]) for n in want)  # the load below has something to do
    n = io.load_adapter(fresh.model, "speech", folder)
    got = _trainable(fresh.model)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])][:3]
    assert n >= len(want)
    after = _vision(fresh.model)
    assert vision_before and all(torch.equal(after[k], vision_before[k]) for k in vision_before)


def test_sharded_load_state_names_the_model_tensors(trained, tiny_native):
    """What an FSDP loader scatters: every saved tensor keyed by the model's own name, full size."""
    loaded, folder = trained
    full = io.model_state(folder, "speech")
    params = dict(loaded.model.named_parameters())
    buffers = dict(loaded.model.named_buffers())
    assert set(_trainable(loaded.model)) <= set(full)
    assert set(full) <= set(params) | set(buffers)
    assert all(tuple(full[k].shape) == tuple({**buffers, **params}[k].shape) for k in full)
    # loading it the way the FSDP path does (torch's set_model_state_dict, full tensors) reproduces the trained tensors
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    fresh = _load(tiny_native)
    result = set_model_state_dict(fresh.model, full, options=StateDictOptions(full_state_dict=True, strict=False))
    assert not result.unexpected_keys
    got, want = _trainable(fresh.model), _trainable(loaded.model)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_save_from_a_gathered_state_dict_equals_save_from_live_parameters(trained, tmp_path):
    """FSDP/DeepSpeed save from a gathered dict of full tensors; the folder must be the same."""
    loaded, folder = trained
    gathered = _trainable(loaded.model)
    save_trained(loaded.model, loaded.adapters, tmp_path, state_dict=gathered)
    a, b = load_file(str(folder / io.ADAPTER_WEIGHTS)), load_file(str(tmp_path / io.ADAPTER_WEIGHTS))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / io.ADAPTER_CONFIG).read_text())["modules_to_save"] == \
        json.loads((folder / io.ADAPTER_CONFIG).read_text())["modules_to_save"]


def test_load_into_another_shape_is_one_clear_error(trained, tiny_native):
    _, folder = trained
    with pytest.warns(UserWarning, match="discarded"):
        small = load_model(ModelConfig(path=str(tiny_native)), "fp32", AdapterConfig(mode="fresh", r=3, alpha=6))
    with pytest.raises(UserError, match="does not fit this model"):
        io.load_adapter(small.model, "speech", folder)


def test_lora_names_match_what_peft_itself_names(trained):
    loaded, _ = trained
    peft = loaded.model
    # PEFT's own structure: every LoraLayer holds lora_A/lora_B ModuleDicts keyed by adapter name
    expected: dict[str, tuple[str, str]] = {}
    for mname, module in peft.named_modules():
        if isinstance(module, LoraLayer):
            for part, dct in (("A", module.lora_A), ("B", module.lora_B)):
                for adapter in dct:
                    expected[f"{mname}.lora_{part}.{adapter}.weight"] = (part, adapter)
    assert {a for _, a in expected.values()} == {"speech", "vision"}
    names = [n for n, _ in peft.named_parameters()]
    assert {n for n in names if io.is_lora(n)} == set(expected)
    for n, (part, adapter) in expected.items():
        module, p, a = io.lora_parts(n)
        assert (p, a) == (part, adapter) and module.endswith(("_proj", "lm_head")), n
    assert io.lora_weights_by_adapter(peft).keys() == {"speech", "vision"}
    # PEFT's saved keys: prefixed, without the adapter name; with_adapter gives the live name back
    for adapter in ("speech", "vision"):
        saved = get_peft_model_state_dict(peft, adapter_name=adapter)
        assert saved and all(k.startswith(io.PEFT_PREFIX) for k in saved)
        params = dict(peft.named_parameters())
        for k in saved:
            parts = io.lora_parts(k)
            assert parts is not None and parts[2] is None, k
            assert torch.equal(saved[k], params[io.with_adapter(k, adapter)]), k
        assert {io.with_adapter(k, adapter) for k in saved} == {n for n, (_, a) in expected.items() if a == adapter}
    # and the LoRA linear modules themselves (as reports and precision checks see them)
    lora_modules = [m for m, mod in peft.named_modules() if isinstance(mod, torch.nn.Linear) and ".lora_" in m]
    assert lora_modules and all(io.lora_adapter(m) in ("speech", "vision") for m in lora_modules)
    assert not any(io.is_lora(n) for n in names if n.endswith("base_layer.weight"))


@pytest.mark.parametrize(("key", "want"), [
    # official layout (official-layout.md): base_layer + lora_A|lora_B.{speech,vision}.weight in the shards
    ("model.layers.0.self_attn.qkv_proj.lora_A.speech.weight", ("model.layers.0.self_attn.qkv_proj", "A", "speech")),
    ("model.layers.31.mlp.gate_up_proj.lora_B.vision.weight", ("model.layers.31.mlp.gate_up_proj", "B", "vision")),
    ("model.layers.3.mlp.down_proj.lora_B.speech.weight", ("model.layers.3.mlp.down_proj", "B", "speech")),
    ("model.layers.0.self_attn.qkv_proj.base_layer.weight", None),
    ("model.embed_tokens_extend.audio_embed.encoder.encoders.0.self_attn.linear_q.weight", None),
    # the speech-lora/ folder and PEFT's file format: prefixed, no adapter name
    ("base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight", ("base_model.model.model.layers.0.self_attn.o_proj", "A", None)),
    ("base_model.model.model.layers.0.self_attn.o_proj.lora_dropout.speech", None),
    ("base_model.model.model.embed_tokens_extend.audio_embed.up_proj_for_speech.weight", None),
])
def test_lora_name_regex_on_the_published_spellings(key, want):
    assert io.lora_parts(key) == want
    assert io.is_lora(key) == (want is not None)


def test_prefix_helpers_are_inverse():
    name = "model.layers.0.self_attn.qkv_proj.base_layer.weight"
    assert io.strip_prefix(io.add_prefix(name)) == name
    assert io.strip_prefix(name) == name
    assert io.with_adapter("x.lora_B.weight", "speech") == "x.lora_B.speech.weight"
    assert io.with_adapter("x.lora_B.vision.weight", "speech") == "x.lora_B.vision.weight"
    assert io.with_adapter("x.up_proj.weight", "speech") == "x.up_proj.weight"


# ----------------------------------------------------------------------------- one home

SRC = Path(phi4mm_lora.__file__).parent
FORMAT_LITERALS = (io.ADAPTER_CONFIG, io.ADAPTER_WEIGHTS, io.EXTRA_FILE, io.PEFT_PREFIX,
                   "lora_[AB]", "lora_(?:A|B)", "lora_(A|B)")
#: Files that still hold a format literal because another change owns them: wire them to
#: adapter_io and drop them from here (the test fails while an entry is no longer needed).
PENDING: set[str] = set()


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module (f-string parts included), docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def _offenders(path: Path) -> list[str]:
    return [f"{path.relative_to(SRC)}:{line}: {lit!r}" for line, s in _code_strings(path)
            for lit in FORMAT_LITERALS if lit in s]


def test_only_adapter_io_knows_the_adapter_file_names_prefix_and_lora_regex():
    assert _offenders(SRC / "model" / "adapter_io.py")  # the scan does see the literals where they live
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel != "model/adapter_io.py":
            hits = _offenders(path)
            if hits:
                found[rel] = hits
    assert set(found) - PENDING == set(), [h for rel in sorted(set(found) - PENDING) for h in found[rel]]
    assert PENDING <= set(found), f"{sorted(PENDING - set(found))} no longer hold a format literal: drop from PENDING"
