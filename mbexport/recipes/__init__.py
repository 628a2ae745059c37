"""Build recipes: named, versioned TOML files that say what ``mbexport build`` makes.

A recipe fixes everything about a build except the checkpoint: task, precision, target, optimization
profiles, calibration, validation tolerances and the output folder. The shipped ones are package data in
this folder (``mbexport recipes`` lists them and says where it is); users copy one and edit it; command-line
flags override single fields. Unknown fields are errors, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mbexport.engine import EngineSettings, Profile, check_profiles, make_profile
from mbexport.errors import MbexportError
from mbexport.precisions import CALIBRATION_METHODS, get_precision
from mbexport.tasks import get_task

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

VERSION = 1
TARGETS = ("engine", "onnx")
# Shipped recipes: package data beside this file (pyproject's package-data); ./recipes is searched first for
# bare names.
RECIPES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Calibration:
    """INT8/FP8 calibration data: text lines (tokenized with the vocab) or, without text, seeded token ids."""

    text: Path | None = None
    size: int = 64
    method: str = "max"
    sequence: int = 128


@dataclass(frozen=True)
class Recipe:
    name: str
    task: str  # canonical task name
    precision: str
    description: str = ""
    target: str | None = None  # None: engine when TensorRT is importable, else onnx
    profiles: tuple[Profile, ...] | None = None  # None: derived from the model's position limit
    calibration: Calibration = Calibration()
    engine: EngineSettings = EngineSettings(timing_cache="timing.cache")  # cache path relative to the output
    tolerances: dict = field(default_factory=dict)  # passed to validate
    out: str = "artifacts/{checkpoint}"  # {checkpoint}: the checkpoint's file stem
    path: Path | None = None

    def override(self, **fields) -> "Recipe":
        """A copy with the given fields replaced; ``None`` values (flags not given) keep the recipe's."""
        calibration = {k[len("calib_"):]: v for k, v in fields.items() if k.startswith("calib_") and v is not None}
        plain = {k: v for k, v in fields.items() if not k.startswith("calib_") and v is not None}
        if "task" in plain:
            plain["task"] = get_task(plain["task"]).name
        if "precision" in plain:
            plain["precision"] = get_precision(plain["precision"]).name
        recipe = dataclasses.replace(self, calibration=dataclasses.replace(self.calibration, **calibration), **plain)
        recipe.check()  # the recipe's own values were checked when it was read: a bad value came from a flag
        return recipe

    def fit_positions(self, max_positions: int) -> tuple["Recipe", list[str]]:
        """Clamp sequence lengths to the model's position limit, with a note per change.

        A SQuAD-length recipe (384 tokens) then also builds a small model (the built-in example has 128).
        """
        notes, calibration, profiles = [], self.calibration, self.profiles
        if calibration.sequence > max_positions:
            notes.append(f"calibration sequence {calibration.sequence} is cut to the model's {max_positions} positions")
            calibration = dataclasses.replace(calibration, sequence=max_positions)
        if profiles and any(p.sequence[2] > max_positions for p in profiles):
            notes.append(f"profile sequence ranges are cut to the model's {max_positions} positions")
            profiles = tuple(dataclasses.replace(p, sequence=tuple(min(v, max_positions) for v in p.sequence))
                             for p in profiles)
        return dataclasses.replace(self, calibration=calibration, profiles=profiles), notes

    def check(self, source: Path | None = None) -> None:
        try:
            get_precision(self.precision)
        except MbexportError as error:
            raise MbexportError(str(error), source) from None
        if self.target is not None and self.target not in TARGETS:
            raise MbexportError(f"unknown target '{self.target}' (choose {', '.join(TARGETS)})", source)
        if self.calibration.method not in CALIBRATION_METHODS:
            raise MbexportError(f"unknown calibration method '{self.calibration.method}' "
                                f"(choose {', '.join(CALIBRATION_METHODS)})", source)
        if self.calibration.size < 1 or self.calibration.sequence < 2:
            raise MbexportError("calibration size must be >= 1 and sequence >= 2", source)


# field -> type, per TOML table; checked strictly so typos are caught.
_TOP = {"version": int, "name": str, "description": str, "task": str, "precision": str, "target": str,
        "profiles": list, "calibration": dict, "engine": dict, "tolerances": dict, "output": dict}
_CALIBRATION = {"text": str, "size": int, "method": str, "sequence": int}
_ENGINE = {"builder_optimization_level": int, "workspace_mib": int, "timing_cache": bool}
_OUTPUT = {"dir": str}


def _typed(table: dict, schema: dict, where: str, path: Path) -> dict:
    for key, value in table.items():
        if key not in schema:
            raise MbexportError(f"unknown field '{where}{key}' (known: {', '.join(schema)})", path)
        want = schema[key]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise MbexportError(f"field '{where}{key}' must be {want.__name__}, got {value!r}", path)
    return table


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read a recipe file, or a shipped recipe by name (``qa-int8``)."""
    path = find_recipe(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise MbexportError(f"not valid TOML ({error})", path) from None
    _typed(data, _TOP, "", path)
    if data.get("version") != VERSION:
        raise MbexportError(f"recipe version {data.get('version')!r} is not supported (this mbexport reads "
                            f"version = {VERSION})", path)
    for key in ("task", "precision"):
        if key not in data:
            raise MbexportError(f"missing field '{key}'", path)
    calibration = _typed(data.get("calibration", {}), _CALIBRATION, "calibration.", path)
    engine = _typed(data.get("engine", {}), _ENGINE, "engine.", path)
    output = _typed(data.get("output", {}), _OUTPUT, "output.", path)
    tolerances = {}  # validate's overrides: "atol" for every precision, [tolerances.int8] as "int8.atol"
    for key, value in data.get("tolerances", {}).items():
        for name, number in (value.items() if isinstance(value, dict) else [("", value)]):
            if not isinstance(number, (int, float)) or isinstance(number, bool):
                raise MbexportError(f"tolerance '{key}' must be a number, got {number!r}", path)
            tolerances[f"{key}.{name}" if name else key] = number
    profiles = None
    if "profiles" in data:
        if not all(isinstance(p, dict) for p in data["profiles"]) or not data["profiles"]:
            raise MbexportError("profiles must be one or more [[profiles]] tables", path)
        profiles = tuple(make_profile(p, source=path) for p in data["profiles"])
    try:
        task, precision = get_task(data["task"]), get_precision(data["precision"])
    except MbexportError as error:
        raise MbexportError(str(error), path) from None
    if profiles:
        check_profiles(profiles, task, source=path)
    text = calibration.get("text")
    recipe = Recipe(
        name=data.get("name", path.stem), task=task.name, precision=precision.name,
        description=data.get("description", ""), target=data.get("target"), profiles=profiles,
        calibration=Calibration(text=(path.parent / text) if text else None,
                                **{k: v for k, v in calibration.items() if k != "text"}),
        engine=EngineSettings(builder_optimization_level=engine.get("builder_optimization_level", 3),
                              workspace_mib=engine.get("workspace_mib", 4096),
                              timing_cache="timing.cache" if engine.get("timing_cache", True) else None),
        tolerances=dict(tolerances), out=output.get("dir", Recipe.out), path=path)
    recipe.check(path)
    return recipe


def find_recipe(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or len(path.parts) > 1:
        if not path.is_file():
            raise MbexportError("recipe file not found", path)
        return path
    for folder in (Path("recipes"), RECIPES_DIR):
        if (folder / f"{name_or_path}.toml").is_file():
            return folder / f"{name_or_path}.toml"
    known = ", ".join(r.stem for r in shipped_recipes())
    raise MbexportError(f"no recipe named '{name_or_path}' (shipped: {known or 'none'})")


def shipped_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.toml"))
