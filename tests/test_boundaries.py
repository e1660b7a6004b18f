"""The layers of tasks/ (README, "Layout"), checked by walking the packages rather than a list of names.

- Only the top level of tasks/ (the stages, config, CLI, result types) and flows/ import Prefect.
- Only tasks/engine/ imports torch and the libraries built on it.
- Dependencies point down: flows -> stages (with config and results beside them) -> engine -> plain
  packages (data, planning, store, scoring, reports, tracking). Nothing in a package imports the top of tasks/;
  a plain package never imports the engine; a stage never imports another stage (they share
  tasks/results.py).
- Every module outside the engine imports without Prefect (packages), torch or transformers, and every
  module without mlflow (the optional `mlflow` extra, imported only when tracking is on).
"""
import ast
import subprocess
import sys

from conftest import ROOT

TASKS = ROOT / "tasks"
TORCH_STACK = {"torch", "peft", "bitsandbytes", "liger_kernel", "accelerate", "transformers"}
# Tokenizers come from transformers but need no torch: loading one is data preparation.
TRANSFORMERS_OUTSIDE_ENGINE = {"tasks.data.tokenization"}
PLAIN_PACKAGES = {"data", "planning", "store", "scoring", "reports", "tracking"}
SHARED_TOP = {"tasks.config", "tasks.results"}  # the top-level modules every layer may use


def module_name(path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imported(path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "flows":
        return "flow"
    if len(parts) == 1:
        return "shared"
    if parts[1] in PLAIN_PACKAGES:
        return "plain"
    if parts[1] == "engine":
        return "engine"
    return "shared" if module in SHARED_TOP else "stage"


def modules():
    return {module_name(p): p for p in sorted([*TASKS.rglob("*.py"), *(ROOT / "flows").glob("*.py")])
            if "metric_modules" not in p.parts}


def test_the_walk_sees_every_layer():
    seen = {layer(m) for m in modules()}
    assert seen == {"flow", "shared", "stage", "engine", "plain"}
    assert {p.name for p in TASKS.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == PLAIN_PACKAGES | {"engine"}


def test_each_layer_imports_only_what_it_may():
    problems = []
    for module, path in modules().items():
        own = layer(module)
        for name in imported(path):
            root = name.split(".")[0]
            if root == "prefect" and own not in ("stage", "flow"):
                problems.append(f"{module} imports prefect: only the stages at the top of tasks/ and flows/ may")
            if root in TORCH_STACK and own != "engine" and not (
                    root == "transformers" and module in TRANSFORMERS_OUTSIDE_ENGINE):
                problems.append(f"{module} imports {name}: only tasks/engine/ may")
            if root != "tasks" or name == "tasks":
                continue
            target = layer(name)
            if own in ("plain", "shared") and target == "engine":
                problems.append(f"{module} imports {name}: a plain package never imports the engine")
            if own in ("plain", "engine") and target in ("stage", "shared"):
                problems.append(f"{module} imports {name}: nothing in a package imports the top of tasks/")
            if own == "shared" and target == "stage":
                problems.append(f"{module} imports {name}: config and results never import a stage")
            if own == "stage" and target == "stage" and name != module:
                problems.append(f"{module} imports {name}: stages share tasks/results.py, not each other")
    assert not problems, "\n".join(problems)


def test_modules_outside_the_engine_import_without_heavy_dependencies():
    light = [m for m in modules() if layer(m) in ("plain", "shared")] + ["tasks.cli"]
    code = (f"import sys\nfor m in {light!r}: __import__(m)\n"
            "print(','.join(h for h in ('prefect', 'torch', 'transformers', 'peft', 'bitsandbytes', 'mlflow') "
            "if h in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_flow_modules_import_without_torch():
    # Workers and deployment tooling import the flows and stages; torch loads only when a task runs.
    stages = [m for m in modules() if layer(m) in ("stage", "flow")]
    code = f"import sys\nfor m in {stages!r}: __import__(m)\nprint('torch' in sys.modules, 'mlflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False False"
