"""verify passes on a healthy setup and fails naming the tensor; CLI errors are one line, exit 2."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from phi4mm_lora.cli import main
from phi4mm_lora.config import AdapterConfig, ModelConfig
from phi4mm_lora.model.load import load_model
from phi4mm_lora.model.verify import verify_loaded


@pytest.mark.parametrize("mode", ["pretrained", "fresh"])
def test_verify_passes(tiny_native, mode):
    loaded = load_model(ModelConfig(path=str(tiny_native)), "fp32", AdapterConfig(mode=mode))
    res = verify_loaded(loaded, gen_tokens=3)
    assert res.ok, res.failures
    assert res.trainable == 16 and res.frozen > 100
    assert len(res.losses) == 2 and res.generated


def test_verify_names_a_frozen_lora_tensor(tiny_native):
    loaded = load_model(ModelConfig(path=str(tiny_native)), "fp32", AdapterConfig())
    victim = next(n for n, p in loaded.model.named_parameters() if ".lora_B.speech." in n)
    dict(loaded.model.named_parameters())[victim].requires_grad_(False)
    res = verify_loaded(loaded, gen_tokens=2)
    assert not res.ok
    assert any(victim in f and "LoRA frozen" in f for f in res.failures)


def test_verify_command_exit_codes(tiny_native, capsys):
    assert main(["verify", "--model", str(tiny_native)]) == 0
    assert "verify passed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["verify", "--model", "/nonexistent/dir"], r"does not exist"),
        (["verify", "adapter.r=0"], r"adapter\.r: .*positive"),
        (["verify", "adapter.alpha=-1", "adapter.dropout=1.5", "trian.lr=1"], r"3 problem\(s\)"),
        (["verify", "adapter.mode=fresh", r"adapter.target_modules=model\.nope"], r"matches no linear module"),
        (["verify", "--precision", "fp16"], r"fp16 .*plans that work here"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, pattern, capsys, tiny_native):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(pattern, err), err
    assert "Traceback" not in err


def test_non_phi4_folder_subprocess(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    r = subprocess.run([sys.executable, "-m", "phi4mm_lora", "verify", "--model", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "not Phi-4-multimodal" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "phi4mm_lora", "--debug", "verify", "--model", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" in r.stderr
