"""The package layout: a short root, layers that import only downwards, no import cycles, plain-torch
attention/model, and the top-level API; the documentation's code blocks run, and the commands and paths they name
exist."""

from __future__ import annotations

import ast
import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import proteinperformer
from tests.conftest import ROOT

PACKAGE = ROOT / "proteinperformer"
# Lower layers first; a module may import its own layer or any layer before it, never one after.
LAYERS = ["options", "tokenizer", "files", "progress", "attention", "model", "checkpoints", "data", "training",
          "analysis", "inference", "evaluation", "cli"]


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
        recorded = name.startswith(("results/", "tests/")) or (name.startswith("studies/") and "/results/" in name)
        if recorded or path.suffix not in {".py", ".yaml", ".md", ".ipynb", ".sh", ".sbatch", ".toml", ".txt", ""}:
            continue  # recorded results keep the paths they ran on
        text = path.read_text(errors="ignore") if path.is_file() else ""
        hits += [name for marker in ("/work/shared", "/work/main", "/root/") if marker in text]
    assert not hits, hits


# ---- documentation --------------------------------------------------------------------------------------------
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # every ```python block of these runs
# the pages whose shell blocks, inline commands and links are checked: the above, the studies' and folder READMEs
PAGES = [*DOCS, *sorted((ROOT / "studies").rglob("README.md")), ROOT / "results" / "README.md",
         ROOT / "notebooks" / "README.md", ROOT / "weights" / "README.md"]
# What some blocks compute, checked after they ran (the numbers the pages show).
EXPECTED = {
    "README.md": lambda ns: tuple(ns["reps"]["P69905"]["per_tok"][-1].shape) == (47, 192),
    "embeddings.md": lambda ns: tuple(ns["reps"]["BLAT_ECOLX"]["mean"][0].shape) == (192,),
    "variant_effects.md": lambda ns: ns["scores"].shape == (3,) and math.isnan(ns["scores"][2]),
    "attention_analysis.md": lambda ns: tuple(ns["maps"].shape) == (6, 6, 147, 147),
}
SHELL = ("bash", "sh", "shell", "console")
CONF_GROUPS = ("data", "model", "task", "trainer", "logger", "callbacks", "experiment")


def _blocks(text: str, languages: tuple[str, ...]) -> list[str]:
    """The fenced code blocks of a markdown text whose language is one of ``languages``."""
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S) if m.group(1) in languages]


def _console_scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def _conf_dir(group: str) -> Path:
    """The folder of a config group: conf/ at the root, or the copy shipped in the package."""
    for base in (ROOT / "conf", PACKAGE / "conf"):
        if (base / group).is_dir():
            return base / group
    raise AssertionError(f"no config group {group!r} in conf/ or proteinperformer/conf/")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_python_blocks_run(doc: Path, monkeypatch) -> None:
    """Every ```python block of README.md and docs/*.md runs as written, from the repository root (ESM's
    test_readme), each in a fresh namespace; where a page shows a result, the result is checked."""
    blocks = _blocks(doc.read_text(), ("python",))
    if doc.name in EXPECTED:
        assert blocks, f"{doc.name}: its python blocks are gone; update EXPECTED"
    monkeypatch.chdir(ROOT)
    spaces = []
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(doc.relative_to(ROOT)), "exec"), namespace)  # noqa: S102 - our own documentation
        spaces.append(namespace)
    if doc.name in EXPECTED:
        assert any(_shows(EXPECTED[doc.name], ns) for ns in spaces), f"{doc.name}: not the result the page shows"


def _shows(check, namespace: dict) -> bool:
    try:
        return bool(check(namespace))
    except KeyError:  # another block of the page
        return False


def test_doc_commands_and_paths_exist() -> None:
    """What the pages' shell blocks run exists: every pp-* command is a console script, every scripts/ or studies/
    script is a file, every other repository path an input file or the folder an output goes to, every config group
    option (data=..., experiment=...) a conf/ file; every pp-* named in the prose is a console script; every
    relative link resolves. Catches a renamed or removed command, script, config or page."""
    commands = _console_scripts()
    problems = []
    for page in PAGES:
        text = page.read_text()
        where = page.relative_to(ROOT)
        for block in _blocks(text, SHELL):
            block = block.replace("\\\n", " ")
            named = re.findall(r"(?<![\w./-])pp-[a-z][a-z-]*", block)
            problems += [f"{where}: {c}: not a console script" for c in named if c not in commands]
            for path in re.findall(r"(?:(?<=\s)|(?<=^)|(?<=[\"'=]))((?:scripts|studies|docs|conf|notebooks|data|"
                                   r"checkpoints)/[\w./-]*)", block, re.M):
                if "<" in path or "$" in path:
                    continue
                target = ROOT / path.rstrip("/")
                script = target.suffix in {".py", ".sh", ".sbatch"}
                if not (target.exists() or (not script and target.parent.is_dir())):
                    problems.append(f"{where}: {path}: no such {'script' if script else 'path'}")
            for group, values in re.findall(rf"(?<![\w.])({'|'.join(CONF_GROUPS)})=([\w,]+)(?=\s|$)", block, re.M):
                problems += [f"{where}: {group}={v}: no such config" for v in values.split(",")
                             if not (_conf_dir(group) / f"{v}.yaml").exists()]
        prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
        problems += [f"{where}: `{c}`: not a console script" for c in re.findall(r"`(pp-[a-z][a-z-]*)", prose)
                     if c not in commands]
        for link in re.findall(r"\]\(([^)\s]+)\)", prose):
            if link.startswith(("http://", "https://", "mailto:", "#")):
                continue
            target = (page.parent / link.split("#")[0]).resolve()
            if not target.exists():
                problems.append(f"{where}: link {link}: no such file")
    assert not problems, "\n".join(problems)


def _train_overrides(block: str) -> list[list[str]]:
    """The Hydra overrides of every training command in a shell block (scripts/train.py, pp-train, the SLURM
    script): key=value words up to a comment or redirection; placeholders (<...>, $VAR), sweeps (a,b) and hydra.*
    keys left out."""
    runs = []
    for line in block.replace("\\\n", " ").splitlines():
        words = line.split()
        starts = [i for i, w in enumerate(words) if w.endswith(("scripts/train.py", "train.sbatch")) or w == "pp-train"]
        if not starts:
            continue
        overrides = []
        for word in words[starts[0] + 1 :]:
            word = word.removeprefix("[").removesuffix("]")  # [data.mode=concat]: an optional override
            if word.startswith("#") or word in {"&", "&&", "|", ">", "2>&1"} or word.startswith(">"):
                break
            key, eq, value = word.partition("=")
            if eq and not key.startswith(("-", "hydra.")) and not re.search(r"[<$,]", value):
                overrides.append(word)
        runs.append(overrides)
    return runs


def test_doc_training_commands_compose() -> None:
    """Every training command the pages show composes with the project's config: each group option and key it sets
    exists (catches a renamed data.* or model.* option)."""
    from hydra import compose, initialize_config_dir

    runs = {(page.relative_to(ROOT), tuple(o)) for page in PAGES for block in _blocks(page.read_text(), SHELL)
            for o in _train_overrides(block)}
    assert len(runs) >= 10, runs
    problems = []
    with initialize_config_dir(config_dir=str(_conf_dir("model").parent), version_base="1.3"):
        for where, overrides in sorted(runs):
            try:
                compose("train", overrides=list(overrides))
            except Exception as err:  # noqa: BLE001 - every failure is reported with its page and command
                problems.append(f"{where}: {' '.join(overrides)}: {type(err).__name__}: {err}")
    assert not problems, "\n".join(problems)
