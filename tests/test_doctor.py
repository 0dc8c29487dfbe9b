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

