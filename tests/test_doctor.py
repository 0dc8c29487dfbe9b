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


def test_versions_outside_the_tested_range_warn_once(monkeypatch, capsys):
    """Installed versions are read from package metadata and compared with the tested range:
    inside it no command warns; outside it every command prints one line naming the range,
    and doctor lists the library as a problem."""
    from phi4mm_lora import versions

    assert all(ok for *_, ok in versions.check_versions()), versions.check_versions()
    assert main(["doctor"]) == 0
    assert "warning" not in capsys.readouterr().err
    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda p: "4.40.0" if p == "transformers" else real(p))
    assert main(["verify", "--model", "/nonexistent/folder"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[1].startswith("error: "), err
    assert err[0].startswith("warning: ") and "transformers 4.40.0" in err[0]
    assert versions.SUPPORTED["transformers"] in err[0]
    assert main(["doctor"]) == 0
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and "outside the tested range" in out


def test_pyproject_states_the_tested_ranges():
    """pyproject.toml, README and versions.SUPPORTED say the same, and no wider."""
    import re
    from pathlib import Path

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from phi4mm_lora.versions import SUPPORTED

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    stated = {m[1]: m[2] for d in deps if (m := re.match(r"^([A-Za-z0-9_.-]+)(.*)$", d.replace(" ", "")))}
    readme = (root / "README.md").read_text()
    for pkg, spec in SUPPORTED.items():
        assert stated[pkg] == spec, (pkg, stated[pkg], spec)
        assert f"{pkg}{spec}" in readme.replace(" ", "").replace("`", ""), pkg



def test_missing_torchvision_is_named_with_its_fix(tiny_native, tmp_path):
    """transformers builds Phi-4-multimodal's processor with torchvision on every supported release,
    so a machine without it (a bare GPU image, a --no-deps install) cannot load any checkpoint.
    The commands say so in one line with the pip line that fixes it, and doctor lists it as a
    problem; transformers' own message is cut off before its advice."""
    import subprocess
    import sys

    import torch

    blocked = ("import sys; sys.modules['torchvision'] = None\n"  # what `import torchvision` meets when it is absent
               "from phi4mm_lora.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    from phi4mm_lora.data.examples import bundled_corpus_path

    audio = bundled_corpus_path() / "WAVE" / "SPEAKER0003" / "000300001.flac"
    run = subprocess.run([sys.executable, "-c", blocked, "score", "--model", str(tiny_native), "--precision", "fp32",
                          "--text", "COW", str(audio)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    err = run.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    minor = int(torch.__version__.split(".")[1])
    assert "torchvision is not installed" in err[0] and f"pip install 'torchvision==0.{minor + 15}.*'" in err[0], err
    assert "Traceback" not in run.stderr
    out = tmp_path / "doctor.json"
    run = subprocess.run([sys.executable, "-c", blocked, "doctor", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    problems = json.loads(out.read_text())["problems"]
    assert any("torchvision is not installed" in p["problem"] and "torchvision==" in p["fix"] for p in problems)


def test_torchvision_pairs_with_this_torch():
    """The fix's pairing rule (torchvision 0.N for torch 2.(N-15)) holds for the installed pair,
    and an installed, importable torchvision is no problem."""
    import torch
    import torchvision

    from phi4mm_lora.model.load import torchvision_problem

    assert torchvision_problem() is None
    assert int(torchvision.__version__.split(".")[1]) == int(torch.__version__.split(".")[1]) + 15
