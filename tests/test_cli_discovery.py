"""Finding your way without the source: config keys, the schema, did-you-mean, flags that exist,
and a CLI that answers ``--help`` at once (none of these load a model)."""

from __future__ import annotations

import ast
import json
import re
import statistics
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml

from phi4mm_lora.cli import build_parser, main
from phi4mm_lora.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "phi4mm_lora"
SCHEMA = ROOT / "configs" / "run-config.schema.json"


# ------------------------------------------------------------------ startup


def test_building_the_parser_imports_no_torch_or_transformers() -> None:
    code = ("import sys; from phi4mm_lora.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("argv", [["validate", "configs/demo.yaml"], ["config", "show"], ["config", "schema"]])
def test_commands_that_load_no_model_import_no_torch(argv: list[str]) -> None:
    """validate (with its pre-flight checks) and config answer from the config alone: torch and
    transformers cost 1-3 s of imports, more than the whole 1.5 s budget."""
    code = (f"import sys; from phi4mm_lora.cli import main; rc = main({argv!r}); "
            "print(rc, sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules), "
            "file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert res.stderr.strip().splitlines()[-1] == "0 []", res.stderr


def _median_seconds(argv: list[str], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_help_and_validate_start_fast_relative_to_bare_python() -> None:
    """Issue: ``--help`` and ``validate`` under 1.5 s on 2 cores. Measured as a ratio to a bare
    interpreter in the same run, so a slow machine slows both alike. A bare ``python -c pass``
    takes 9-40 ms here and these commands 0.25-0.5 s; under a load of 9 on the 2 cores a bare
    start took 9 ms and ``config show train`` 0.37 s (43 x), so a 40 x limit was flaky. The
    limit is the issue's budget over a typical bare start: 1.5 s / 15 ms = 100 x. A torch import
    (3 s or more) is caught exactly by the two tests above, not by this timing."""
    base = _median_seconds([sys.executable, "-c", "pass"])
    for argv in (["--help"], ["validate", "configs/demo.yaml"], ["config", "show", "train"]):
        t = _median_seconds([sys.executable, "-m", "phi4mm_lora", *argv])
        assert t / base < 100, f"phi4mm-lora {' '.join(argv)}: {t:.2f} s = {t / base:.0f} x bare python ({base:.3f} s)"


# ------------------------------------------------------------------ config show / schema


def test_config_show_lists_every_key_with_type_default_choices_and_description(capsys) -> None:
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    for section, field in RunConfig.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, RunConfig.__mro__[1]):  # a section
            for name, f in sub.model_fields.items():
                line = next((ln for ln in out.splitlines() if ln.strip().startswith(f"{section}.{name}:")), None)
                assert line is not None, f"{section}.{name} missing"
                default = f.get_default(call_default_factory=True)
                shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
                assert line.endswith(f"= {shown}"), line
                if typing.get_origin(f.annotation) is typing.Literal:
                    assert all(str(c) in line for c in typing.get_args(f.annotation)), line
                assert f.description, f"{section}.{name} has no description"
        else:
            assert f"  {section}:" in out
    assert main(["config", "show", "adapter"]) == 0
    out = capsys.readouterr().out
    assert "adapter.mode: pretrained | fresh | stacked = pretrained" in out and "train.lr:" not in out
    assert main(["config", "show", "train"]) == 0
    assert "Peak learning rate" in capsys.readouterr().out
    assert main(["config", "show", "trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_schema_is_committed_in_sync_and_shipped_configs_point_at_it_and_validate(tmp_path, capsys) -> None:
    import jsonschema

    out = tmp_path / "schema.json"
    assert main(["config", "schema", str(out)]) == 0
    assert out.read_text() == SCHEMA.read_text(), (
        "configs/run-config.schema.json is stale: run phi4mm-lora config schema configs/run-config.schema.json")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    shipped = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(shipped) >= 4
    for f in shipped:
        first = f.read_text().splitlines()[0]
        m = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
        assert m, f"{f.name}: first line must point YAML editors at the schema"
        assert (f.parent / m[1]).resolve() == SCHEMA.resolve()
        errors = list(validator.iter_errors(yaml.safe_load(f.read_text())))
        assert not errors, f"{f.name}: {errors[0].message}"
    # the schema rejects what load_config rejects: an unknown key, a value outside the choices
    assert list(validator.iter_errors({"train": {"lrr": 1}}))
    assert list(validator.iter_errors({"adapter": {"mode": "fersh"}}))


def test_unknown_keys_get_did_you_mean_and_a_command_that_lists_keys(capsys) -> None:
    assert main(["validate", "configs/demo.yaml", "train.lrr=1", "eval.subst=2", "zzz=1"]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "train.lrr: unknown key; did you mean `train.lr`? `phi4mm-lora config show train` lists the keys" in err
    assert "did you mean `eval.subset`?" in err
    assert "zzz: unknown key; `phi4mm-lora config show` lists the keys" in err
    assert "validate --help" not in err


# ------------------------------------------------------------------ every flag a message names exists


def _subparsers(parser) -> dict[str, object]:
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _resolve(words: list[str]):
    """(parser of the deepest subcommand named by ``words``, the path of its names)."""
    parser, path = build_parser(), []
    for w in words:
        sub = _subparsers(parser)
        if w not in sub:
            break
        parser, path = sub[w], [*path, w]
    return parser, path


def _flags(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def _strings(node: ast.AST) -> list[str]:
    """Text of every string literal under ``node``; f-string holes become ``X``."""
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.JoinedStr):
            out.append("".join(v.value if isinstance(v, ast.Constant) else "X" for v in n.values))
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            out.append(n.value)
    return out


def _sources() -> list[tuple[str, str]]:
    """(where, text) for every string in the package and every README line."""
    items = [(f"{p.relative_to(ROOT)}", s) for p in sorted(SRC.rglob("*.py")) for s in _strings(ast.parse(p.read_text()))]
    items += [("README.md", line) for line in (ROOT / "README.md").read_text().splitlines()]
    return items


COMMAND = re.compile(r"phi4mm-lora((?:\s+(?:[a-z][a-z-]*|--?[a-z][\w-]*|[^\s`'\";|)]+))+)")


def test_every_command_and_flag_in_messages_help_and_readme_exists() -> None:
    """``phi4mm-lora CMD ... --flag`` anywhere in the package's strings or the README must name
    a real (sub)command and flags that command accepts, checked against the real parser."""
    checked, bad = 0, []
    top_flags = _flags(build_parser())
    for where, text in _sources():
        for m in COMMAND.finditer(text):
            words = m[1].split()
            names = [w for w in words if re.fullmatch(r"[a-z][a-z-]*", w)]
            parser, path = _resolve(names[:2])
            if not path:
                # "phi4mm-lora loads the native classes" is prose about the project; a command
                # is quoted in backticks or carries flags
                quoted = text[max(m.start() - 1, 0):m.start()] == "`"
                if names and not words[0].startswith("-") and (quoted or "--" in m[1]):
                    bad.append(f"{where}: unknown command in {m[0]!r}")
                continue
            for flag in (w.split("=")[0] for w in words if w.startswith("--")):
                checked += 1
                if flag not in _flags(parser) | top_flags:
                    bad.append(f"{where}: {' '.join(path)} has no {flag} ({m[0]!r})")
    assert not bad, "\n".join(bad)
    assert checked > 10  # the scan really found the commands


#: Library code (outside cli/) that names a bare flag in a message: the one command it serves,
#: which must have every flag the module names. Any other library module must say
#: ``phi4mm-lora CMD --flag`` or name the config key: it cannot know which command called it.
LIBRARY_COMMAND = {
    "evaluate/score.py": "score",      # check_inputs: only the score command reads a sentence
    "evaluate/batch.py": "score",      # reading score --batch's CSV/JSONL/folder
    "train/checkpoint.py": "train",    # resume resolution exists only for train
    "train/finetune.py": "train",
    "train/preflight.py": ("train", "validate"),  # the checks both run before loading a model
    "export/__init__.py": "export",
    "export/card.py": "export",
    "serve/service.py": "serve",       # the address check runs before the model loads
    "model/run_folder.py": ("evaluate", "score", "serve", "export"),  # every command that opens a run
}
#: cli modules whose handlers serve a command another module registers.
CLI_ALSO_SERVES = {"cli/service_cmds.py": ["score"]}  # score --batch's handler lives with serve
MESSAGE_CALLS = {"UserError", "CheckFailed", "TrainingDiverged", "warn", "say", "print", "append", "ValueError"}


def _message_strings(tree: ast.AST) -> set[str]:
    out: list[str] = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Raise) and n.exc is not None:
            out += _strings(n.exc)
        elif isinstance(n, ast.Call):
            name = n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            if name in MESSAGE_CALLS:
                out += _strings(n)
    return set(out)


def _leaves(parser, path=()) -> list[tuple[tuple[str, ...], object]]:
    subs = _subparsers(parser)
    if not subs:
        return [(path, parser)]
    return [leaf for name, sub in subs.items() for leaf in _leaves(sub, (*path, name))]


def test_bare_flags_in_messages_exist_where_they_are_raised() -> None:
    """A message saying ``--model X`` must come from a command that has ``--model`` (the train
    command once said 'pass the local folder with --model'; train has no --model)."""
    leaves = _leaves(build_parser())
    bad = []
    for p in sorted(SRC.rglob("*.py")):
        rel = str(p.relative_to(SRC))
        module = "phi4mm_lora." + rel[:-3].replace("/", ".")
        # the commands whose handlers live in this cli module (they raise its messages)
        owners = [(path, sub) for path, sub in leaves
                  if getattr(sub.get_default("handler"), "__module__", None) == module
                  or " ".join(path) in CLI_ALSO_SERVES.get(rel, [])] or leaves
        for text in _message_strings(ast.parse(p.read_text())):
            text = re.sub(r"phi4mm-lora[^`'\";]*", "", text)  # whole commands: checked above
            text = re.sub(r"\b(tensorboard|torchrun|accelerate launch)\b[^`'\";)]*", "", text)  # other programs' flags
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]+", text):
                if rel.startswith("cli/"):
                    if not any(flag in _flags(sub) for _, sub in owners):
                        bad.append(f"{rel}: {flag} is not a flag of {[' '.join(o) for o, _ in owners]}")
                    continue
                cmds = LIBRARY_COMMAND.get(rel)
                if cmds is None:
                    bad.append(f"{rel}: library message names {flag}; name the config key or the full command")
                for cmd in [cmds] if isinstance(cmds, str) else cmds or []:
                    if flag not in _flags(_resolve([cmd])[0]):
                        bad.append(f"{rel}: {cmd} has no {flag}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("argv", [["validate", "--help"], ["config", "show", "--help"], ["evaluate", "--help"]])
def test_help_texts_render(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: phi4mm-lora" in capsys.readouterr().out


def _help_strings(tree: ast.AST) -> set[str]:
    """help=, description= and epilog= texts of the argparse calls."""
    return {t for n in ast.walk(tree) if isinstance(n, ast.Call)
            for kw in n.keywords if kw.arg in ("help", "description", "epilog") for t in _strings(kw.value)}


def test_every_config_key_named_in_messages_exists() -> None:
    """``train.batch_size``, ``adapter.mode=fresh`` ... in messages and help must be real keys."""
    sections = {name: f.annotation for name, f in RunConfig.model_fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, RunConfig.__mro__[1])}
    key = re.compile(r"(?<![\w./-])(" + "|".join(sections) + r")\.([a-z_]+)\b(?![./]\w)")
    texts = [(str(p.relative_to(ROOT)), t) for p in sorted(SRC.rglob("*.py"))
             for t in _message_strings(ast.parse(p.read_text())) | _help_strings(ast.parse(p.read_text()))]
    texts += [("README.md", ln) for ln in (ROOT / "README.md").read_text().splitlines() if "unknown key" not in ln]
    bad, checked = [], 0
    for where, text in texts:
        for m in key.finditer(text):
            if m[2] in ("py", "yaml", "jsonl", "json", "txt", "scp"):  # file names such as train.jsonl
                continue
            checked += 1
            if m[2] not in sections[m[1]].model_fields:
                bad.append(f"{where}: {m[0]} is not a config key ({text.strip()[:100]!r})")
    assert not bad, "\n".join(bad)
    assert checked > 20
