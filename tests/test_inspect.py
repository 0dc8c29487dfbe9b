"""``inspect``: exact full-size counts and bytes on meta, and the report of a loaded model."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import warnings

import pytest
import torch
from transformers import Phi4MultimodalForCausalLM

from phi4mm_lora.config import AdapterConfig, ModelConfig
from phi4mm_lora.model.inventory import architecture_report, int8_bytes, model_report, nf4_bytes, stored_bytes
from phi4mm_lora.model.load import load_model
from phi4mm_lora.model.tiny import tiny_config

# Domain facts (docs/domain.md section 1).
TOTAL = 5_574_476_224
BASE = 4_744_004_032
SPEECH = 461_373_440
VISION = 369_098_752
LORA = SPEECH + VISION
# Full-size decoder linears (out, in): 32 layers of qkv, o, gate_up, down.
LAYERS = 32
DECODER_LINEARS = [(3072 + 2 * 1024, 3072), (3072, 3072), (2 * 8192, 3072), (3072, 8192)]
DECODER_LINEAR_PARAMS = LAYERS * sum(o * i for o, i in DECODER_LINEARS)


def _nf4(n: int) -> int:
    """Written out again here, not imported: packed nibbles + uint8 absmax per 64 + fp32 per
    256 absmax blocks + the 16- and 256-entry fp32 codes and the fp32 offset."""
    blocks = -(-n // 64)
    return n // 2 + blocks + 4 * -(-blocks // 256) + 4 * (16 + 256 + 1)


@pytest.fixture(scope="module")
def reports():
    return {p: architecture_report(p, AdapterConfig()) for p in ("bf16", "fp16", "fp32", "int8", "nf4", "selective")}


def test_full_size_counts(reports):
    r = reports["bf16"]
    assert abs(r["total_params"] - TOTAL) / TOTAL < 0.005
    assert r["total_params"] == TOTAL and r["base_params"] == BASE
    assert r["adapters"]["speech"]["params"] == SPEECH
    assert r["adapters"]["vision"]["params"] == VISION
    assert r["lora_tensors"] == 512
    assert r["adapters"]["speech"]["r"] == 320 and r["adapters"]["vision"]["r"] == 256
    assert r["trainable_params"] == SPEECH  # pretrained mode: the speech adapter trains
    assert r["tied_embeddings"] and r["components"]["embeddings/lm_head"]["params"] == 200064 * 3072
    assert sum(c["params"] for c in r["components"].values()) + LORA == TOTAL


def test_weight_bytes_per_plan_are_exact(reports):
    rest = BASE - DECODER_LINEAR_PARAMS  # everything but the decoder base linears, w/o LoRA
    # bf16/fp16: base in half precision; PEFT keeps LoRA in fp32 (autocast_adapter_dtype).
    # Only the speech adapter is loaded by default (adapter.keep_unused=false): the vision
    # adapter counts in the checkpoint's totals but takes no bytes.
    assert reports["bf16"]["weight_bytes"] == BASE * 2 + SPEECH * 4
    assert reports["fp16"]["weight_bytes"] == BASE * 2 + SPEECH * 4
    assert reports["fp32"]["weight_bytes"] == (BASE + SPEECH) * 4
    int8 = LAYERS * sum(o * i + 4 * o for o, i in DECODER_LINEARS)
    assert reports["int8"]["weight_bytes"] == int8 + rest * 2 + SPEECH * 4
    nf4_dec = LAYERS * sum(_nf4(o * i) for o, i in DECODER_LINEARS)
    assert reports["nf4"]["weight_bytes"] == nf4_dec + rest * 2 + SPEECH * 4
    assert reports["nf4"]["quantised_modules"] == LAYERS * 4
    # selective also quantises the frozen towers' linears and keeps LoRA in bf16.
    assert reports["selective"]["quantised_modules"] > LAYERS * 4
    assert reports["selective"]["weight_bytes"] < nf4_dec + rest * 2 + SPEECH * 2
    assert reports["bf16"]["adapters"]["vision"]["loaded"] is False
    # the expected orders (GB = 1e9 bytes): bf16 about 11 GB, selective under 5 GB
    assert 10.5e9 < reports["bf16"]["weight_bytes"] < 11.5e9
    assert reports["selective"]["weight_bytes"] < 5.0e9
    keep = architecture_report("bf16", AdapterConfig(keep_unused=True))
    assert keep["weight_bytes"] == BASE * 2 + LORA * 4 and keep["adapters"]["vision"]["loaded"] is True


def test_optimizer_bytes(reports):
    # speech adapter trains: fp32 in bf16/fp16/fp32/int8/nf4 -> 8 B; bf16 in selective -> 12 B
    for plan in ("bf16", "fp16", "fp32", "int8", "nf4"):
        assert reports[plan]["optimizer_bytes"] == SPEECH * 8, plan
        assert reports[plan]["gradient_bytes"] == SPEECH * 4, plan
    assert reports["selective"]["optimizer_bytes"] == SPEECH * 12
    assert reports["selective"]["gradient_bytes"] == SPEECH * 2
    assert "master copy" in reports["selective"]["formulas"]["optimizer"]


def test_architecture_follows_adapter_settings():
    r = architecture_report("selective", AdapterConfig(mode="fresh", r=64, alpha=128))
    fresh = LAYERS * sum(64 * (o + i) for o, i in DECODER_LINEARS)  # A: r x in, B: out x r
    assert r["adapters"]["speech"]["params"] == fresh and r["adapters"]["speech"]["r"] == 64
    assert r["trainable_params"] == fresh
    assert any("discarded" in w for w in r["warnings"])
    u = architecture_report("selective", AdapterConfig(trainable="unfreeze"))
    assert u["components"]["audio encoder"]["quantised_modules"] == 0  # unfrozen: never quantised
    assert u["components"]["audio encoder"]["trainable"] == u["components"]["audio encoder"]["params"]
    assert u["components"]["vision tower"]["quantised_modules"] > 0


def test_cli_architecture_only_is_fast_and_small(tmp_path):
    """A fresh process: under 30 s and 2 GB peak RSS, including Python/torch/transformers import."""
    out = tmp_path / "arch.json"
    code = (
        "import re, sys; from phi4mm_lora.cli import main; "
        f"rc = main(['inspect', '--architecture-only', '--precision', 'selective', '--json', {str(out)!r}]); "
        # VmHWM is this process's own peak RSS (ru_maxrss would include the forking parent's)
        "print('PEAK_KB', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1], file=sys.stderr); sys.exit(rc)"
    )
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    wall = time.time() - t
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert wall < 30, f"took {wall:.1f} s"
    peak_mb = int(re.search(r"PEAK_KB (\d+)", proc.stderr)[1]) / 1024
    assert peak_mb < 2048, f"peak RSS {peak_mb:.0f} MB"
    text = re.sub(r"\s+", " ", proc.stdout)
    data = json.loads(out.read_text())
    assert data["total_params"] == TOTAL and data["precision"] == "selective"
    assert data["weight_bytes"] < 5e9
    # what is printed is what was computed (the JSON), in GB
    assert f"weights {data['weight_bytes'] / 1e9:.2f} GB" in text
    assert f"optimizer {data['optimizer_bytes'] / 1e9:.2f} GB" in text


def test_cli_architecture_only_each_plan_prints_bytes(capsys):
    from phi4mm_lora.cli import main

    assert main(["inspect", "--architecture-only", "--precision", "int8"]) == 0
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    r = architecture_report("int8", AdapterConfig())
    int8 = LAYERS * sum(o * i + 4 * o for o, i in DECODER_LINEARS)
    assert r["weight_bytes"] == int8 + (BASE - DECODER_LINEAR_PARAMS) * 2 + SPEECH * 4
    assert f"weights {r['weight_bytes'] / 1e9:.2f} GB" in text and "optimizer 3.69 GB" in text and "LLM.int8" in text


# ----------------------------------------------------------------------------- loaded tiny model


def _plain_params() -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Phi4MultimodalForCausalLM(tiny_config()).parameters())


def _load(path, plan="fp32", **adapter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(ModelConfig(path=str(path), device="cpu"), plan, AdapterConfig(**adapter))


def test_model_report_counts_and_components(tiny_native):
    loaded = _load(tiny_native, keep_unused=True)
    r = model_report(loaded)
    cfg = tiny_config()
    lora = sum(p.numel() for n, p in loaded.model.named_parameters() if ".lora_" in n)
    assert r["total_params"] == _plain_params() + lora
    assert sum(c["params"] for c in r["components"].values()) + lora == r["total_params"]
    assert r["tied_embeddings"] and r["components"]["embeddings/lm_head"]["params"] == cfg.vocab_size * cfg.hidden_size
    assert r["adapters"]["speech"]["trainable_tensors"] == cfg.num_hidden_layers * 4 * 2
    assert r["adapters"]["vision"]["trainable_tensors"] == 0
    assert r["lora_tensors"] == cfg.num_hidden_layers * 4 * 2 * 2
    assert r["trainable_params"] == r["adapters"]["speech"]["params"]
    assert r["trainable_pct"] == pytest.approx(100 * r["trainable_params"] / r["total_params"], abs=1e-3)
    assert r["quantised_modules"] == 0 and r["warnings"] == []
    assert r["components"]["decoder"]["dtypes"] == {"float32": r["components"]["decoder"]["params"]}


def test_model_report_counts_4bit_params_logically_and_bytes_match_formulas(tiny_native):
    full = model_report(_load(tiny_native))
    loaded = _load(tiny_native, "selective")
    r = model_report(loaded)
    assert r["total_params"] == full["total_params"]  # not the packed uint8 count
    for name, c in r["components"].items():
        assert c["params"] == full["components"][name]["params"], name
    assert r["components"]["decoder"]["quantised_modules"] == tiny_config().num_hidden_layers * 4
    assert r["components"]["audio encoder"]["quantised_modules"] > 0
    assert r["components"]["vision tower"]["quantised_modules"] > 0
    assert r["quantised_modules"] == r["planned_quantised"] == len(loaded.planned_quantised)
    assert any(k.startswith("nf4") for k in r["components"]["decoder"]["dtypes"])
    # bitsandbytes' real storage equals the formula the architecture report uses
    mods = dict(loaded.model.named_modules())
    for name in loaded.planned_quantised[:4]:
        w = mods["base_model.model." + name + (".base_layer" if name.startswith("model.layers.") else "")].weight
        assert stored_bytes(w) == nf4_bytes(math.prod(w.quant_state.shape)), name
    i8 = _load(tiny_native, "int8")
    mods = dict(i8.model.named_modules())
    for name in i8.planned_quantised:
        m = mods["base_model.model." + name + ".base_layer"]
        assert stored_bytes(m.weight) == int8_bytes(m.out_features, m.in_features), name
    assert model_report(i8)["total_params"] == full["total_params"]


def test_model_report_warnings(tiny_native):
    fresh = model_report(_load(tiny_native, mode="fresh", r=4, alpha=8))
    assert any("pretrained 'speech' adapter discarded" in w for w in fresh["warnings"])
    assert fresh["adapters"]["speech"]["lora_B_all_zero"] is True  # fresh LoRA starts at B = 0
    assert not any("all zeros" in w for w in fresh["warnings"])  # ... which is fine for the trainable one

    loaded = _load(tiny_native, keep_unused=True)
    with torch.no_grad():
        for n, p in loaded.model.named_parameters():
            if ".lora_B.vision." in n:
                p.zero_()
            if ".lora_A.speech." in n:
                p.requires_grad_(False)
    r = model_report(loaded)
    assert any(w.startswith("adapter 'vision' is all zeros") for w in r["warnings"])
    assert any(w.startswith("LoRA frozen") for w in r["warnings"])

    for p in loaded.model.parameters():
        p.requires_grad_(False)
    assert any(w.startswith("nothing trainable") for w in model_report(loaded)["warnings"])


def test_cli_inspect_tiny_model_and_bad_input(tiny_native, tmp_path, capsys):
    from phi4mm_lora.cli import main

    out = tmp_path / "r.json"
    assert main(["inspect", "--model", str(tiny_native), "--precision", "selective", "--json", str(out), "adapter.mode=stacked"]) == 0
    text = capsys.readouterr().out
    assert "LoRA task" in text and "quantised modules" in text
    data = json.loads(out.read_text())
    assert data["adapter_state"]["trainable_adapter"] == "task"
    # selective: the 8 decoder linears plus every frozen tower linear (counted on a plain model)
    with torch.device("meta"):
        plain = Phi4MultimodalForCausalLM(tiny_config())
    towers = sum(1 for n, m in plain.named_modules() if type(m) is torch.nn.Linear and n.startswith(
        ("model.embed_tokens_extend.audio_embed.encoder.", "model.embed_tokens_extend.image_embed.img_processor.")))
    assert data["quantised_modules"] == 8 + towers
    assert main(["inspect", "--model", str(tiny_native), "--precision", "fp16"]) == 2
    assert "plans that work here" in capsys.readouterr().err
    assert main(["inspect", "--architecture-only", "--json", str(tmp_path)]) == 2
    assert main(["inspect", "--model", str(tmp_path / "missing")]) == 2
