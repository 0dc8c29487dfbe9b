"""doctor reports real versions, the device, and each known problem with its fix."""

from __future__ import annotations

import importlib.metadata as md
import json

from phi4mm_lora.cli import main


def test_doctor_json(tmp_path, capsys):
    out = tmp_path / "doctor.json"
    assert main(["doctor", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    d = json.loads(out.read_text())
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "soundfile"):
        assert d["versions"][pkg] == md.version(pkg), pkg
    assert d["device"] == "cpu"  # tests run with CUDA hidden
    assert d["memory"]["ram_total_gb"] > 0
    # transformers >= 4.50 here: the remote-code failure is a fact (nothing runs remote code), not a
    # problem: a problem is something the user must act on, and each comes with its fix
    assert any("prepare_inputs_for_generation" in n and "convert" in n for n in d["facts"])
    assert not any("prepare_inputs_for_generation" in p["problem"] for p in d["problems"])
    assert all(p["fix"] and "nothing to do" not in p["fix"].lower() for p in d["problems"])
    assert any("plans that work here" in n and "fp32" in n for n in d["facts"])
    if d["versions"]["flash-attn"] is None:
        assert any("sdpa" in n for n in d["facts"])
    if d["versions"]["torchcodec"] is None:
        assert not any("torchcodec" in p["problem"] for p in d["problems"])
    assert "facts" in printed
    if d["problems"]:
        assert "problem:" in printed and "fix:" in printed
    else:
        assert "no problems found" in printed and "problem:" not in printed
