"""Every import in the package goes downward in the layer order of DESIGN.md: a layer imports
only from the layers listed before it (and from `errors`, `version` and `registry`, which every layer may)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "lowbit"

LAYERS = [  # (layer, the folders and files that hold it), in DESIGN.md's order
    ("base", ["errors.py", "version.py", "registry.py", "progress.py"]),
    ("numerics", ["core"]),
    ("modules", ["nn"]),
    ("algorithms", ["algorithms"]),
    ("data", ["data"]),
    ("transform", ["transform"]),
    ("runtimes", ["runtimes"]),
    ("measure", ["evaluate"]),
    ("decide", ["tune"]),
    ("files", ["formats"]),
    ("families", ["families", "sklearn.py"]),
    ("faces", ["cli.py", "demo.py", "report", "qat.py", "__init__.py"]),
]


def layer_of(path: Path) -> int:
    relative = path.relative_to(PACKAGE).as_posix()
    for rank, (_, places) in enumerate(LAYERS):
        if any(relative == place or relative.startswith(place + "/") for place in places):
            return rank
    raise AssertionError(f"{relative} belongs to no layer: add it to a layer folder")


def module_path(name: str) -> Path:
    """The file of `lowbit.x.y` (a module or a package's __init__)."""
    parts = name.split(".")[1:]
    candidate = PACKAGE.joinpath(*parts)
    return candidate / "__init__.py" if candidate.is_dir() else candidate.with_suffix(".py")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, lowbit module) for every import in a file, at any depth (inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lowbit":
                found += [(node.lineno, f"lowbit.{alias.name}") for alias in node.names]
            elif node.module.startswith("lowbit."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("lowbit.")]
    return found


def test_every_file_of_the_package_belongs_to_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(path)


def test_every_import_goes_downward_in_the_layer_order():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = layer_of(path)
        for line, name in imported_modules(path):
            target = module_path(name)
            if not target.exists():  # `from lowbit import quantize`: a name, not a module
                continue
            if layer_of(target) > own:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} ({LAYERS[own][0]}) imports {name} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert upward == [], "\n".join(upward)
