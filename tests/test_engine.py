"""The TensorRT layer up to the builder call: profiles, Polygraphy loaders, command lines, error paths.

TensorRT cannot be installed here, so the loaders are checked against Polygraphy itself: its CLI turns our
``polygraphy convert`` options into a script (``polygraphy run --gen-script``, which needs no TensorRT), and
that script must construct exactly the loaders we construct. Tests that build a real engine are marked
``tensorrt`` and skip without it.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mbexport.engine import (EngineSettings, Profile, build_engine, check_gpu, check_profiles, command_lines,
                             default_profiles, loaders, make_profile, tensorrt_available, trt_runner)
from mbexport.engine import build as engine_build
from mbexport.errors import MbexportError, MissingDependencyError
from mbexport.tasks import get_task

QA = get_task("qa")
MC = get_task("mc")


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make ``import tensorrt`` fail even where it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def workspace_pool(monkeypatch):
    """The memory-pool key is a TensorRT enum; name it by a string to inspect the config without TensorRT."""
    monkeypatch.setattr(engine_build, "_workspace_pool", lambda: "WORKSPACE")


def identity_onnx(path: Path, task) -> Path:
    """A graph with the task's input names and dynamic dims: enough for Polygraphy's argument handling."""
    inputs = [helper.make_tensor_value_info(s.name, TensorProto.INT64, list(s.dims)) for s in task.inputs]
    outputs = [helper.make_tensor_value_info(f"out_{s.name}", TensorProto.INT64, list(s.dims)) for s in task.inputs]
    nodes = [helper.make_node("Identity", [s.name], [f"out_{s.name}"]) for s in task.inputs]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", inputs, outputs)), path)
    return path


def test_profile_shapes_follow_the_registry():
    profile = Profile(batch=(1, 4, 16), sequence=(8, 64, 128), num_choices=(2, 3, 4))
    assert profile.shapes(QA) == {name: ((1, 8), (4, 64), (16, 128))
                                  for name in ("input_ids", "attention_mask", "token_type_ids")}
    assert profile.shapes(MC)["input_ids"] == ((1, 2, 8), (4, 3, 64), (16, 4, 128))
    assert list(profile.shapes(MC)) == MC.input_names
    assert profile.as_dict(QA) == {"batch": [1, 4, 16], "sequence": [8, 64, 128]}
    assert profile.as_dict(MC) == {"batch": [1, 4, 16], "num_choices": [2, 3, 4], "sequence": [8, 64, 128]}


def test_make_profile_checks_every_range():
    assert make_profile({"batch": [1, 2, 4]}) == Profile(batch=(1, 2, 4))
    for values, message in [({"batch": [1, 2]}, "batch must be"), ({"sequence": [8, 4, 16]}, "min <= opt <= max"),
                            ({"batch": [0, 1, 1]}, "1 <= min"), ({"seq": [1, 2, 3]}, "unknown profile dim 'seq'"),
                            ({"batch": [1, 2.5, 4]}, "integers")]:
        with pytest.raises(MbexportError, match=message) as error:
            make_profile(values, source="r.toml")
        assert str(error.value).startswith("r.toml: ")


def test_check_profiles():
    check_profiles([Profile(), Profile(batch=(1, 1, 32), sequence=(256, 384, 384))], QA, max_positions=512)
    with pytest.raises(MbexportError, match="share one max batch.*16, 32"):
        check_profiles([Profile(), Profile(batch=(1, 1, 16))], QA)
    with pytest.raises(MbexportError, match="max sequence 384 exceeds the model's 64 positions"):
        check_profiles([Profile()], QA, max_positions=64)
    with pytest.raises(MbexportError, match="at least one"):
        check_profiles([], QA)


def test_default_profiles_fit_the_model():
    assert default_profiles(512) == (Profile(batch=(1, 8, 32), sequence=(16, 128, 384)),)
    assert default_profiles(64) == (Profile(batch=(1, 8, 32), sequence=(16, 64, 64)),)
    check_profiles(default_profiles(64), QA, max_positions=64)


def test_loaders_are_strongly_typed_with_profiles_and_no_precision_flags(workspace_pool):
    profiles = [Profile(batch=(1, 8, 32), sequence=(16, 128, 384)), Profile(batch=(1, 1, 32), sequence=(1, 8, 16))]
    settings = EngineSettings(builder_optimization_level=5, workspace_mib=1024, timing_cache="t.cache")
    network, config = loaders("m.onnx", QA, profiles, settings)
    assert network.path == "m.onnx" and network.strongly_typed is True
    assert [{name: (tuple(s.min), tuple(s.opt), tuple(s.max)) for name, s in p.items()} for p in config.profiles] == \
        [p.shapes(QA) for p in profiles]
    assert config.builder_optimization_level == 5
    assert config.memory_pool_limits == {"WORKSPACE": 1024 * 2**20}
    assert config.timing_cache_path == "t.cache"
    # Precision lives in the ONNX: TensorRT 11 has none of these flags and Polygraphy raises on them there.
    assert (config.fp16, config.int8, config.fp8, config.bf16) == (False, False, False, False)
    assert config.precision_constraints is None and config.calibrator is None


def test_polygraphy_reads_our_command_line_as_our_loaders(tmp_path, workspace_pool):
    """Polygraphy's own CLI parser is the oracle for the recorded ``polygraphy convert`` command."""
    onnx_path = identity_onnx(tmp_path / "m.onnx", MC)
    profiles = [Profile(batch=(1, 8, 32), sequence=(16, 128, 384), num_choices=(2, 4, 4)),
                Profile(batch=(2, 2, 32), sequence=(1, 8, 16), num_choices=(4, 4, 4))]
    settings = EngineSettings(builder_optimization_level=2, workspace_mib=2048, timing_cache=str(tmp_path / "t.c"))
    argv = shlex.split(command_lines(str(onnx_path), str(tmp_path / "m.plan"), MC, profiles, settings)["polygraphy"])
    assert argv[:7] == ["polygraphy", "convert", str(onnx_path), "--convert-to", "trt", "-o", str(tmp_path / "m.plan")]
    script = tmp_path / "gen.py"
    polygraphy = Path(sys.executable).with_name("polygraphy")
    subprocess.run([str(polygraphy), "run", str(onnx_path), "--trt", "--gen-script", str(script), *argv[7:]],
                   check=True, capture_output=True, timeout=120)
    text = script.read_text()

    network, config = loaders(onnx_path, MC, profiles, settings)
    expected_profiles = ["Profile()" + "".join(f".add({n!r}, min={list(s.min)}, opt={list(s.opt)}, max={list(s.max)})"
                                               for n, s in p.items()) for p in config.profiles]
    generated_profiles = [re.sub(r"\s+", "", line) for line in
                          re.findall(r"^\s+(Profile\(\).*?)(?:,)?$", text, flags=re.M)]
    assert len(generated_profiles) == 2
    assert generated_profiles == [p.replace(" ", "") for p in expected_profiles]
    create = re.search(r"CreateTrtConfig\((.*)\)\n", text).group(1)
    assert f"builder_optimization_level={config.builder_optimization_level}" in create
    assert f"memory_pool_limits={{trt.MemoryPoolType.WORKSPACE: {config.memory_pool_limits['WORKSPACE']}}}" in create
    assert f"load_timing_cache={settings.timing_cache!r}" in create
    assert not re.search(r"fp16|int8|fp8|precision", create)
    assert re.search(rf"NetworkFromOnnxPath\({str(onnx_path)!r}, strongly_typed=True", text)
    assert f"save_timing_cache={settings.timing_cache!r}" in text


def test_trtexec_command_line():
    one = command_lines("qa/model.fp16.onnx", "qa/model.fp16.plan", QA,
                        [Profile(batch=(1, 8, 32), sequence=(16, 128, 384))],
                        EngineSettings(builder_optimization_level=3, workspace_mib=4096, timing_cache="timing.cache"))
    assert one["trtexec"] == (
        "trtexec --onnx=qa/model.fp16.onnx --saveEngine=qa/model.fp16.plan --stronglyTyped "
        "--minShapes=input_ids:1x16,attention_mask:1x16,token_type_ids:1x16 "
        "--optShapes=input_ids:8x128,attention_mask:8x128,token_type_ids:8x128 "
        "--maxShapes=input_ids:32x384,attention_mask:32x384,token_type_ids:32x384 "
        "--noTF32 --builderOptimizationLevel=3 --memPoolSize=workspace:4096 --timingCacheFile=timing.cache "
        "--skipInference")
    two = command_lines("a.onnx", "a.plan", QA, [Profile(), Profile(sequence=(1, 8, 16))])["trtexec"]
    # trtexec reads several profiles as --profile=N followed by that profile's three shape options
    assert re.search(r"--profile=0 --minShapes=\S+ --optShapes=\S+ --maxShapes=\S+ "
                     r"--profile=1 --minShapes=input_ids:1x1,", two)
    assert "timingCache" not in two and not re.search(r"--(fp16|int8|fp8|best)\b", two)


def test_fp8_needs_ada_or_hopper():
    check_gpu("fp8", {"gpu": "NVIDIA H100", "compute_capability": "9.0"})
    check_gpu("fp8", {"gpu": "NVIDIA L4", "compute_capability": "8.9"})
    check_gpu("int8", {"gpu": "NVIDIA A100", "compute_capability": "8.0"})
    check_gpu("fp8", {"gpu": "unknown", "compute_capability": "unknown"})  # the builder will say
    with pytest.raises(MbexportError, match="8.9.*A100.*8.0"):
        check_gpu("fp8", {"gpu": "NVIDIA A100", "compute_capability": "8.0"})


def test_without_tensorrt_one_line_error_and_no_file(tmp_path, no_tensorrt):
    assert not tensorrt_available()
    onnx_path = identity_onnx(tmp_path / "m.onnx", QA)
    with pytest.raises(MissingDependencyError) as error:
        build_engine(onnx_path, tmp_path / "m.plan", QA, [Profile()], precision="fp16")
    message = str(error.value)
    assert "\n" not in message and "pip install tensorrt-cu12" in message and "--target onnx" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    with pytest.raises(MissingDependencyError, match="tensorrt-cu12"):
        trt_runner(tmp_path / "m.plan")


def test_tests_needing_tensorrt_or_a_gpu_skip_in_one_wording(no_tensorrt, monkeypatch):
    import torch

    import conftest

    class Marked:  # what conftest's hook reads of a test marked tensorrt
        def get_closest_marker(self, name):
            return object() if name == "tensorrt" else None

    with pytest.raises(pytest.skip.Exception, match=r"^needs TensorRT, not installed here \(pip install"):
        conftest.pytest_runtest_setup(Marked())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert conftest.missing("gpu") == "needs a CUDA GPU, none visible to PyTorch here"


@pytest.mark.tensorrt
def test_engine_builds_and_matches_onnx_runtime(tmp_path):
    from mbexport.runtime import ort_session

    onnx_path = identity_onnx(tmp_path / "m.onnx", QA)
    profiles = [Profile(batch=(1, 2, 4), sequence=(1, 8, 16))]
    details = build_engine(onnx_path, tmp_path / "m.plan", QA, profiles, precision="fp32", root=tmp_path)
    assert details["profiles"] == [{"batch": [1, 2, 4], "sequence": [1, 8, 16]}]
    assert details["commands"]["trtexec"].startswith("trtexec --onnx=m.onnx --saveEngine=m.plan")
    feed = {name: np.arange(24, dtype=np.int64).reshape(3, 8) for name in QA.input_names}
    expected = ort_session(onnx_path).run(None, feed)
    with trt_runner(tmp_path / "m.plan") as runner:
        got = runner.infer(feed)
    for i, name in enumerate(QA.input_names):
        np.testing.assert_array_equal(got[f"out_{name}"], expected[i])
