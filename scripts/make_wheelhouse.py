"""Build a wheelhouse for installing proteinperformer on an air-gapped GPU node (docs/install.md).

    python scripts/make_wheelhouse.py --out wheelhouse                       # CPython 3.12, manylinux x86_64
    python scripts/make_wheelhouse.py --out wheelhouse --python-version 3.11 --glibc 2.36

Run it on a machine with internet access (any OS: pip downloads for the named Python and platform, not for the
running one). The folder gets this project's wheel and every dependency's wheel, except torch and the CUDA stack
that comes with it (``nvidia-*``, ``cuda-*``, ``triton``): the node has its own CUDA build of torch, and these would
be gigabytes. On the node (torch already installed)::

    pip install --no-index --find-links wheelhouse proteinperformer
    pp-gpu-check --out gpu_check

How: pip resolves the project's wheel for the target (``pip install --dry-run --report``, which reads the packages'
metadata, not their wheels), then downloads the resolved versions (``pip download --no-deps --only-binary=:all:``)
less the excluded ones. Dependencies that come with torch and are small (sympy, networkx, jinja2, ...) stay in.
A dependency published only as a source archive (Hydra's antlr4-python3-runtime) is built into a wheel here first.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXCLUDE = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")  # the node's torch and its CUDA libraries
SOURCES = ("pyproject.toml", "README.md", "conf", "proteinperformer")  # what the wheel is built from


def build_wheel(out: Path, isolation: bool = True) -> Path:
    """This project's wheel, built with ``pip wheel`` from a clean copy of its sources (a ``build/`` folder left in
    the checkout could carry deleted modules into the wheel); returns the wheel's path in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, dist = Path(tmp) / "src", Path(tmp) / "dist"
        src.mkdir()
        for name in SOURCES:
            if (ROOT / name).is_dir():  # symlinks stay links: proteinperformer/conf -> ../conf
                shutil.copytree(ROOT / name, src / name, symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(ROOT / name, src / name)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist), str(src)]
        subprocess.run(cmd + ([] if isolation else ["--no-build-isolation"]), check=True)
        wheel = next(dist.glob("proteinperformer-*.whl"))
        return Path(shutil.move(wheel, out / wheel.name))  # replaces an older build of the same version


def platforms(glibc: str, arch: str = "x86_64") -> list[str]:
    """pip ``--platform`` tags a node with this glibc accepts: manylinux_2_N for N = glibc's minor down to 17, and
    the manylinux2014 / 2010 / 1 names (pip 23 does not expand one tag to the older ones itself)."""
    major, minor = (int(x) for x in glibc.split("."))
    tags = [f"manylinux_{major}_{n}_{arch}" for n in range(minor, 16, -1)]
    return tags + [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]


def target_options(python_version: str, glibc: str, arch: str) -> list[str]:
    """pip options that pick wheels for the target interpreter and platform instead of the running one."""
    options = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for tag in platforms(glibc, arch):
        options += ["--platform", tag]
    return options


def resolve(wheel: Path, options: list[str]) -> list[dict]:
    """The report entries (``metadata``, ``download_info``) of every package pip would install with ``wheel`` for
    ``options`` (empty: for the running interpreter), the project excluded; nothing is installed."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--target",
               str(Path(tmp) / "target"), "--report", str(report), *options, str(wheel)]
        subprocess.run(cmd, check=True)
        items = json.loads(report.read_text())["install"]
    return [i for i in items if i["metadata"]["name"].lower() != "proteinperformer"]


def pins(items: list[dict]) -> list[str]:
    """``name==version`` of report entries."""
    return [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in items]


def build_source_only(wheel: Path, out: Path) -> list[str]:
    """Wheels of the dependencies published only as source archives (antlr4-python3-runtime 4.9.3, which Hydra pins),
    built here into ``out``: ``--only-binary`` resolution for another platform cannot use a source archive. They are
    pure Python, so the wheel built here suits the node too. Returns their pins."""
    source = [i for i in resolve(wheel, []) if i["download_info"]["url"].endswith((".tar.gz", ".zip", ".tar.bz2"))]
    if source:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out),
                        *pins(source)], check=True)
    return pins(source)


def keep(items: list[dict]) -> list[dict]:
    """The entries to download: all but torch, triton, nvidia-* and cuda-* (names normalised: NVIDIA_cublas counts)."""
    return [i for i in items if not EXCLUDE.match(re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower())]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("wheelhouse"), help="folder for the wheels")
    parser.add_argument("--python-version", default="3.12", help="the node's Python, major.minor")
    parser.add_argument("--glibc", default="2.28", help="the node's glibc (torch's own wheels need 2.28 or newer)")
    parser.add_argument("--arch", default="x86_64")
    args = parser.parse_args(argv)
    options = target_options(args.python_version, args.glibc, args.arch)
    wheel = build_wheel(args.out)
    built = build_source_only(wheel, args.out)
    items = resolve(wheel, [*options, "--find-links", str(args.out)])
    wanted = keep(items)
    left_out = sorted({i["metadata"]["name"] for i in items} - {i["metadata"]["name"] for i in wanted})
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(args.out),
                    "--find-links", str(args.out), *options, *pins(wanted)], check=True)
    files = sorted(args.out.glob("*.whl"))
    size = sum(f.stat().st_size for f in files) / 2**20
    print(f"{args.out}: {len(files)} wheels, {size:,.0f} MiB, for CPython {args.python_version} on manylinux "
          f"(glibc {args.glibc}) {args.arch}; built here from source: {', '.join(built) or 'none'}; left out (the "
          f"node's own): {', '.join(left_out) or 'nothing'}")
    print(f"on the node: pip install --no-index --find-links {args.out} proteinperformer")


if __name__ == "__main__":
    main()
