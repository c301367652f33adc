"""The package layout: a short root, layers that import only downwards, no import cycles, plain-torch
attention/model, and the top-level API."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import proteinperformer
from tests.conftest import ROOT

PACKAGE = ROOT / "proteinperformer"
# Lower layers first; a module may import its own layer or any layer before it, never one after.
LAYERS = ["tokenizer", "files", "progress", "attention", "model", "checkpoints", "data", "training", "analysis",
          "inference", "evaluation", "cli"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports, at module level or inside functions (``from pkg import sub`` counts
    as importing ``pkg.sub`` when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            subs = {f"{node.module}.{a.name}" for a in node.names}
            out |= (subs & set(modules)) or {node.module}
            if subs - set(modules):
                out.add(node.module)
    return out


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_package_root_is_short() -> None:
    root_modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root_modules) <= 6, root_modules
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert set(folders) <= set(LAYERS), folders


def test_layers_import_only_downwards() -> None:
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        mine = _layer(name)
        for target in _imports(path, modules):
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*trail, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*trail, node])):
                return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            assert (cycle := visit(name, [])) is None, " -> ".join(cycle)


def test_attention_and_model_import_without_lightning_or_hydra() -> None:
    code = ("import sys, proteinperformer.attention, proteinperformer.model, proteinperformer.checkpoints; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pytorch_lightning', 'lightning', 'lightning_fabric', 'hydra', 'omegaconf', 'torchmetrics')); "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_top_level_api() -> None:
    from proteinperformer import embed, exact_attention, favor_attention, load_model, sample

    assert callable(embed) and callable(load_model) and callable(sample)
    assert favor_attention.__module__ == "proteinperformer.attention.favor"
    assert exact_attention.__module__ == "proteinperformer.attention.exact"
    for name in proteinperformer.__all__:
        assert getattr(proteinperformer, name) is not None, name
    # no submodule at the root is named like a function users call
    assert not set(proteinperformer.__all__) & {p.stem for p in PACKAGE.glob("*.py")}
    try:
        proteinperformer.no_such_thing  # noqa: B018
    except AttributeError as err:
        assert "no_such_thing" in str(err)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_every_console_script_is_a_cli_module() -> None:
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for command, target in scripts.items():
        module, _, func = target.partition(":")
        assert module.startswith("proteinperformer.cli."), (command, target)
        assert func == "main" and (PACKAGE / "cli" / f"{module.rsplit('.', 1)[1]}.py").exists()


def test_no_machine_paths_in_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT).stdout.split()
    if not tracked:  # not a git checkout (an sdist): nothing to check
        return
    hits = []
    for name in tracked:
        path = ROOT / name
        if name.startswith(("results/", "tests/")) or path.suffix not in {".py", ".yaml", ".md", ".ipynb", ".sh",
                                                                           ".sbatch", ".toml", ".txt", ""}:
            continue  # recorded results keep the paths they ran on
        text = path.read_text(errors="ignore") if path.is_file() else ""
        hits += [name for marker in ("/work/shared", "/work/main", "/root/") if marker in text]
    assert not hits, hits


def test_readme_python_snippets_run(monkeypatch) -> None:
    """Every ```python block of README.md runs as written, from the repository root (ESM's test_readme)."""
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert len(blocks) >= 2
    monkeypatch.chdir(ROOT)
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert tuple(namespace["reps"]["P69905"]["per_tok"][-1].shape) == (47, 192)
