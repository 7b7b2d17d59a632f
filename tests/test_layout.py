"""The package's layout holds: imports go one way between layers, no module reaches into another's
private names, and no file grows past what one reader can hold."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "diffc"
MAX_LINES = 450

# Each package and the packages it may import (the drawing in the README). Shared leaves (errors,
# _json, _progress, metrics) import nothing of diffc.
LEAVES = {"errors", "_json", "_progress", "metrics"}
ALLOWED = {
    "ir": set(),
    "calibration": {"ir"},
    "backends": {"ir"},
    "runtime": {"ir"},
    "passes": {"ir", "calibration"},
    "models": set(),
    "evaluate": set(),
    "api": {"ir", "calibration", "passes", "backends", "runtime"},
    "bench": {"api", "backends", "calibration", "evaluate", "ir", "runtime", "models"},
    "cli": {"<root>", "api", "backends", "bench", "evaluate", "ir", "runtime", "models", "calibration", "passes"},
    "<root>": {"api", "ir", "runtime"},
}


def _modules() -> dict[str, tuple[pathlib.Path, ast.Module, bool]]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        out[name] = (path, ast.parse(path.read_text(), filename=str(path)), is_package)
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) for every import of a diffc module in `name`."""
    _, tree, is_package = MODULES[name]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
    return [entry for entry in found if entry[1] == "diffc" or entry[1].startswith("diffc.")]


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


# public API of Python's own types that happens to start with an underscore (namedtuple)
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in PUBLIC_UNDERSCORED


def test_no_module_imports_a_private_name_of_another():
    offences = []
    for name in MODULES:
        for line, module, names in _imports(name):
            if module == name:
                continue
            offences += [f"{name}:{line} imports {n} from {module}" for n in names if _private(n)]
    assert not offences, "private names imported across modules (make the helper public where it is shared):\n" + \
        "\n".join(offences)


def _private_definitions(tree: ast.Module) -> set[str]:
    """Private functions, methods and attributes a module defines (self._x = ..., def _x)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _private(node.name):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr):
            names.add(node.attr)
    return names


def test_no_module_uses_a_private_attribute_defined_in_another():
    defined = {name: _private_definitions(tree) for name, (_, tree, _) in MODULES.items()}
    offences = []
    for name, (_, tree, _) in MODULES.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)) or node.attr in defined[name]:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            owners = sorted(other for other, names in defined.items() if node.attr in names and other != name)
            if owners:
                offences.append(f"{name}:{node.lineno} uses {node.attr}, private to {', '.join(owners)}")
    assert not offences, "private attributes used across modules:\n" + "\n".join(offences)


def test_packages_import_only_the_layers_below_them():
    backward = []
    for name in MODULES:
        package = _package(name)
        for line, module, _ in _imports(name):
            target = _package(module)
            if target == package or target in LEAVES:
                continue
            if package in LEAVES or target not in ALLOWED.get(package, set()):
                backward.append(f"{name}:{line} ({package}) imports {module} ({target})")
    assert not backward, "imports against the layering (see the README's drawing):\n" + "\n".join(backward)


def test_the_allowed_layering_has_no_cycle():
    visiting, done = set(), set()

    def visit(package: str, path: tuple[str, ...]) -> None:
        if package in done:
            return
        assert package not in visiting, f"import cycle: {' -> '.join(path + (package,))}"
        visiting.add(package)
        for below in ALLOWED.get(package, ()):
            visit(below, path + (package,))
        visiting.discard(package)
        done.add(package)

    for package in ALLOWED:
        visit(package, ())


def test_no_file_is_over_the_line_limit():
    long = {str(path.relative_to(ROOT.parent)): len(path.read_text().splitlines()) for path, _, _ in MODULES.values()}
    over = {path: lines for path, lines in long.items() if lines > MAX_LINES}
    assert not over, f"files over {MAX_LINES} lines (split them by concern): {over}"
