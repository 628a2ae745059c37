"""Recipes: the shipped ones load and make sense; typos and bad values are one-line errors naming the file."""

from dataclasses import replace
from pathlib import Path

import pytest

from mbexport.engine import EngineSettings, Profile, check_profiles
from mbexport.errors import MbexportError
from mbexport.recipes import RECIPES_DIR, Calibration, find_recipe, load_recipe, shipped_recipes
from mbexport.tasks import get_task

REQUIRED = {"qa-fp16": ("question-answering", "fp16"), "qa-int8": ("question-answering", "int8"),
            "qa-fp8": ("question-answering", "fp8"), "mlm-fp16": ("masked-lm", "fp16"),
            "seq-cls-int8": ("sequence-classification", "int8")}

GOOD = """
version = 1
task = "qa"
precision = "int8"
target = "onnx"
[calibration]
text = "calib.txt"
size = 8
method = "entropy"
sequence = 32
[[profiles]]
batch = [1, 2, 4]
sequence = [8, 16, 32]
[[profiles]]
batch = [1, 1, 4]
sequence = [1, 4, 8]
[engine]
builder_optimization_level = 1
workspace_mib = 256
timing_cache = false
[tolerances]
agreement = 0.9
[tolerances.int8]
atol = 2.0
[output]
dir = "out/{checkpoint}-int8"
"""


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_recipes_load_by_name_and_path():
    assert {p.stem for p in shipped_recipes()} >= set(REQUIRED)
    for name, (task, precision) in REQUIRED.items():
        recipe = load_recipe(name)
        assert (recipe.name, recipe.task, recipe.precision) == (name, task, precision)
        assert recipe.description and recipe.profiles
        check_profiles(recipe.profiles, get_task(task), max_positions=512)
        by_path = load_recipe(RECIPES_DIR / f"{name}.toml")
        assert by_path.path.resolve() == recipe.path.resolve()
        assert replace(by_path, path=None) == replace(recipe, path=None)
    assert load_recipe("qa-int8").calibration.size >= 64


def test_every_field_is_read(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert recipe.name == "r" and recipe.task == "question-answering" and recipe.target == "onnx"
    assert recipe.calibration == Calibration(text=tmp_path / "calib.txt", size=8, method="entropy", sequence=32)
    assert recipe.profiles == (Profile(batch=(1, 2, 4), sequence=(8, 16, 32)),
                               Profile(batch=(1, 1, 4), sequence=(1, 4, 8)))
    assert recipe.engine == EngineSettings(builder_optimization_level=1, workspace_mib=256, timing_cache=None)
    assert recipe.tolerances == {"agreement": 0.9, "int8.atol": 2.0}
    assert recipe.out == "out/{checkpoint}-int8"


def test_minimal_recipe_takes_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, 'version = 1\ntask = "mlm"\nprecision = "fp16"\n'))
    assert recipe.task == "masked-lm" and recipe.target is None and recipe.profiles is None
    assert recipe.calibration == Calibration() and recipe.engine.timing_cache == "timing.cache"
    assert recipe.out == "artifacts/{checkpoint}"


@pytest.mark.parametrize("change, message", [
    (('precision = "int8"', 'precision = "int8"\nfoo = 1'), "unknown field 'foo'"),
    (("size = 8", "sise = 8"), "unknown field 'calibration.sise'"),
    (("workspace_mib = 256", "workspace = 256"), "unknown field 'engine.workspace'"),
    (("size = 8", 'size = "8"'), "'calibration.size' must be int"),
    (("timing_cache = false", "timing_cache = 1"), "'engine.timing_cache' must be bool"),
    (("version = 1", "version = 2"), "version 2 is not supported"),
    (('precision = "int8"', 'precision = "int4"'), "unknown precision 'int4'"),
    (('target = "onnx"', 'target = "triton"'), "unknown target 'triton'"),
    (('method = "entropy"', 'method = "percentile"'), "unknown calibration method 'percentile'"),
    (('task = "qa"', 'task = "squad"'), "unknown task 'squad'"),
    (('task = "qa"', ""), "missing field 'task'"),
    (("batch = [1, 2, 4]", "batch = [4, 2, 1]"), "min <= opt <= max"),
    (("batch = [1, 1, 4]", "batch = [1, 1, 8]"), "share one max batch"),
    (("agreement = 0.9", 'agreement = "high"'), "tolerance 'agreement' must be a number"),
    (("atol = 2.0", 'atol = "x"'), "tolerance 'int8' must be a number"),
    (("[output]", "[output"), "not valid TOML"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, change, message):
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(MbexportError, match=message) as error:
        load_recipe(path)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


def test_finding_recipes(tmp_path, monkeypatch):
    with pytest.raises(MbexportError, match="no recipe named 'qa-int9'.*qa-int8"):
        find_recipe("qa-int9")
    with pytest.raises(MbexportError, match="recipe file not found"):
        find_recipe(tmp_path / "missing.toml")
    monkeypatch.chdir(tmp_path)  # ./recipes/NAME.toml wins over the shipped one
    (tmp_path / "recipes").mkdir()
    write(tmp_path / "recipes", GOOD, "qa-int8.toml")
    assert find_recipe("qa-int8") == Path("recipes/qa-int8.toml")
    assert load_recipe("qa-int8").precision == "int8" and load_recipe("qa-int8").target == "onnx"


def test_flags_override_recipe_fields(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    same = recipe.override(task=None, precision=None, target=None, calib_text=None, calib_size=None, calib_method=None)
    assert same == recipe
    changed = recipe.override(task="mlm", precision="fp8", calib_size=3, calib_method="max", out="x")
    assert (changed.task, changed.precision, changed.out) == ("masked-lm", "fp8", "x")
    assert changed.calibration == Calibration(text=tmp_path / "calib.txt", size=3, method="max", sequence=32)
    assert changed.profiles == recipe.profiles
    with pytest.raises(MbexportError, match="^unknown precision 'bf16'"):  # the flag's fault, not the file's
        recipe.override(precision="bf16")


def test_sequence_lengths_are_cut_to_the_models_positions():
    recipe = load_recipe("qa-int8")  # SQuAD length: calibration and profiles at 384
    assert recipe.calibration.sequence == 384 and recipe.profiles[0].sequence == (16, 384, 384)
    fitted, notes = recipe.fit_positions(128)
    assert fitted.calibration.sequence == 128 and fitted.profiles[0].sequence == (16, 128, 128)
    assert len(notes) == 2 and all("128 positions" in note for note in notes)
    check_profiles(fitted.profiles, get_task("qa"), max_positions=128)
    assert recipe.fit_positions(512) == (recipe, [])


def test_precision_names_are_case_insensitive(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD.replace('precision = "int8"', 'precision = "INT8"')))
    assert recipe.precision == "int8" and recipe.override(precision="FP16").precision == "fp16"


def test_the_built_wheel_ships_the_recipes(tmp_path):
    """A non-editable install finds the shipped recipes only if the wheel carries them (package data)."""
    import subprocess
    import sys
    import zipfile

    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} is older than pyproject's build requirement (77)")
    import shutil

    root, source = Path(__file__).resolve().parent.parent, tmp_path / "source"  # a clean tree: no egg-info
    shutil.copytree(root / "mbexport", source / "mbexport", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    assert "is deprecated" not in built.stdout + built.stderr  # the license form setuptools warned about
    names = set(zipfile.ZipFile(next(tmp_path.glob("mbexport-*.whl"))).namelist())
    shipped = {f"mbexport/recipes/{path.name}" for path in shipped_recipes()}
    assert len(shipped) >= len(REQUIRED) and shipped | {"mbexport/recipes/README.md"} <= names
