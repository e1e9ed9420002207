"""Regenerate clipeval/simpletuner_models.toml from SimpleTuner's source, read with ``ast``.

Each model family SimpleTuner registers (``ModelRegistry.register("sd1x", StableDiffusion1)``)
names its flavours' base models (``HUGGINGFACE_PATHS``), its default flavour, its validation
noise scheduler and its prediction type as class attributes. clipeval resolves a config's
``model_family``/``model_flavour`` through this table, as SimpleTuner does, without importing it.

    python tools/simpletuner_models.py PATH/TO/SimpleTuner [COMMIT] > clipeval/simpletuner_models.toml

PATH is a checkout or a bare git directory (then COMMIT is read from it, default HEAD).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ATTRIBUTES = ("HUGGINGFACE_PATHS", "DEFAULT_MODEL_FLAVOUR", "DEFAULT_NOISE_SCHEDULER", "PREDICTION_TYPE", "NAME")


def sources(repo: Path, commit: str) -> dict[str, str]:
    names = subprocess.run(["git", f"--git-dir={repo}", "ls-tree", "-r", "--name-only", commit,
                            "simpletuner/helpers/models/"], capture_output=True, text=True, check=True).stdout.split()
    out = {}
    for name in names:
        if name.endswith("/model.py") or name.endswith("/model_flavours.py"):
            out[name] = subprocess.run(["git", f"--git-dir={repo}", "show", f"{commit}:{name}"],
                                       capture_output=True, text=True, check=True).stdout
    return out


def literal(node: ast.AST, constants: dict | None = None):
    """A literal, ``PredictionTypes.X``, or a dict whose values name string constants of the class."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "PredictionTypes":
        return node.attr.lower()  # PredictionTypes.EPSILON -> "epsilon"
    if isinstance(node, ast.Name) and constants and node.id in constants:
        return constants[node.id]
    if isinstance(node, ast.Dict) and constants is not None:
        items = {literal(k, constants): literal(v, constants) for k, v in zip(node.keys, node.values) if k is not None}
        return items if None not in items and None not in items.values() else None
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def main() -> None:
    repo, commit = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "HEAD"
    if (repo / ".git").exists():
        repo = repo / ".git"
    commit = subprocess.run(["git", f"--git-dir={repo}", "rev-parse", commit], capture_output=True, text=True,
                            check=True).stdout.strip()
    classes: dict[str, tuple[list[str], dict]] = {}
    registered: dict[str, str] = {}
    for text in sources(repo, commit).values():
        tree = ast.parse(text)
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                values, constants = {}, {}
                for item in node.body:
                    target = (item.targets[0] if isinstance(item, ast.Assign) and len(item.targets) == 1
                              else item.target if isinstance(item, ast.AnnAssign) and item.value is not None else None)
                    if isinstance(target, ast.Name) and isinstance(literal(item.value), str):
                        constants[target.id] = literal(item.value)
                    if isinstance(target, ast.Name) and target.id in ATTRIBUTES:
                        values[target.id] = literal(item.value, constants)
                classes[node.name] = ([b.id for b in node.bases if isinstance(b, ast.Name)], values)
            elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                call = node.value
                if getattr(call.func, "attr", None) == "register" and len(call.args) == 2:
                    key, cls = literal(call.args[0]), call.args[1]
                    if isinstance(key, str) and isinstance(cls, ast.Name):
                        registered[key.lower()] = cls.id  # ModelRegistry.register lowercases

    def resolved(name: str) -> dict:
        bases, values = classes.get(name, ([], {}))
        out: dict = {}
        for base in bases:
            out.update(resolved(base))
        out.update({k: v for k, v in values.items() if v is not None})
        return out

    print(f"# SimpleTuner's model families at commit {commit}, read from its source by tools/simpletuner_models.py:")
    print("# the base model of each flavour (HUGGINGFACE_PATHS), the default flavour, the validation noise")
    print("# scheduler and the prediction type. Regenerate with that script; never edit by hand.")
    print(f'commit = "{commit}"')
    for key in sorted(registered):
        values = resolved(registered[key])
        paths = values.get("HUGGINGFACE_PATHS")
        if not isinstance(paths, dict) or not paths:
            continue
        print(f"\n[{json.dumps(key)}]")
        print(f"name = {json.dumps(str(values.get('NAME', key)))}")
        if values.get("DEFAULT_MODEL_FLAVOUR") is not None:
            print(f"default_flavour = {json.dumps(values['DEFAULT_MODEL_FLAVOUR'])}")
        if values.get("DEFAULT_NOISE_SCHEDULER") is not None:
            print(f"noise_scheduler = {json.dumps(values['DEFAULT_NOISE_SCHEDULER'])}")
        if values.get("PREDICTION_TYPE") is not None:
            print(f"prediction_type = {json.dumps(values['PREDICTION_TYPE'])}")
        print(f"[{json.dumps(key)}.flavours]")
        for flavour, path in paths.items():
            print(f"{json.dumps(str(flavour))} = {json.dumps(str(path))}")


if __name__ == "__main__":
    main()
