"""Build and load TensorRT engines through Polygraphy, and record how to rebuild them by hand.

Precision is not a builder setting: TensorRT 11 removed the FP16/INT8/FP8 flags and 10 deprecated them.
The ONNX carries it (an FP16-typed graph, or Q/DQ nodes), and the network is parsed strongly typed, which
works on 10.x and 11.x alike. Everything up to the builder call is plain Polygraphy loader objects, which
construct without TensorRT; only calling them needs it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from mbexport.engine.profiles import Profile
from mbexport.errors import MbexportError, MissingDependencyError, first_line
from mbexport.fsutil import atomic_file
from mbexport.precisions import PRECISIONS, get_precision
from mbexport.tasks import Task


@dataclass(frozen=True)
class EngineSettings:
    """Builder knobs that are not precision: they change build time and speed, never the numbers' meaning."""

    builder_optimization_level: int = 3  # TensorRT's default; 0-5
    workspace_mib: int = 4096
    timing_cache: str | None = None  # path; loaded when present, updated after the build


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # an ImportError, or a broken install failing to load its libraries
        return False
    return True


def require_tensorrt() -> None:
    if not tensorrt_available():
        raise MissingDependencyError(
            "building a TensorRT engine needs TensorRT: pip install tensorrt-cu12 (or tensorrt-cu13) "
            "--extra-index-url https://pypi.nvidia.com; or use --target onnx")


def loaders(onnx_path: str | Path, task: Task, profiles: list[Profile] | tuple[Profile, ...],
            settings: EngineSettings = EngineSettings()):
    """Polygraphy's (network, config) loaders for this build; no TensorRT call happens here."""
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath
    from polygraphy.backend.trt import Profile as TrtProfile

    trt_profiles = []
    for profile in profiles:
        trt_profile = TrtProfile()
        for name, (low, opt, high) in profile.shapes(task).items():
            trt_profile.add(name, min=low, opt=opt, max=high)
        trt_profiles.append(trt_profile)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    config = CreateConfig(profiles=trt_profiles, load_timing_cache=settings.timing_cache,
                          builder_optimization_level=settings.builder_optimization_level,
                          memory_pool_limits={_workspace_pool(): settings.workspace_mib << 20})
    return network, config


def _workspace_pool():
    import tensorrt

    return tensorrt.MemoryPoolType.WORKSPACE


def command_lines(onnx_path: str, engine_path: str, task: Task, profiles: list[Profile] | tuple[Profile, ...],
                  settings: EngineSettings = EngineSettings()) -> dict[str, str]:
    """The same build as ``trtexec`` and ``polygraphy convert`` commands, for machines without mbexport.

    ``--stronglyTyped`` is needed on TensorRT 10 (11 is always strongly typed). trtexec takes several
    profiles as ``--profile=N`` each followed by its shapes; Polygraphy repeats its shape options.
    """
    trtexec = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--stronglyTyped"]
    polygraphy = ["polygraphy", "convert", onnx_path, "--convert-to", "trt", "-o", engine_path, "--strongly-typed"]
    for index, profile in enumerate(profiles):
        if len(profiles) > 1:
            trtexec.append(f"--profile={index}")
        shapes = profile.shapes(task)
        for i, which in enumerate(("min", "opt", "max")):
            trtexec.append(f"--{which}Shapes=" + ",".join(f"{name}:{'x'.join(map(str, s[i]))}"
                                                          for name, s in shapes.items()))
            polygraphy += [f"--trt-{which}-shapes",
                           *(f"{name}:[{','.join(map(str, s[i]))}]" for name, s in shapes.items())]
    # --noTF32: Polygraphy's CreateConfig leaves TF32 off, trtexec turns it on unless told.
    trtexec += ["--noTF32", f"--builderOptimizationLevel={settings.builder_optimization_level}",
                f"--memPoolSize=workspace:{settings.workspace_mib}"]  # MiB, trtexec's default unit
    polygraphy += ["--builder-optimization-level", str(settings.builder_optimization_level),
                   "--pool-limit", f"workspace:{settings.workspace_mib}M"]
    if settings.timing_cache:
        trtexec.append(f"--timingCacheFile={settings.timing_cache}")
        polygraphy += ["--load-timing-cache", settings.timing_cache, "--save-timing-cache", settings.timing_cache]
    trtexec.append("--skipInference")
    return {"trtexec": shlex.join(trtexec), "polygraphy": shlex.join(polygraphy)}


def gpu_info() -> dict[str, str]:
    """Name and compute capability of GPU 0: an engine only runs on the GPU model it was built for."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except Exception:  # a torch without CUDA support, or a driver problem: try nvidia-smi
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        name, capability = (part.strip() for part in out.strip().rsplit(",", 1))
        return {"gpu": name, "compute_capability": capability}
    except (OSError, subprocess.SubprocessError, ValueError):
        return {"gpu": "unknown", "compute_capability": "unknown"}


def environment() -> dict[str, str]:
    """What an engine is specific to: the TensorRT version and the GPU model."""
    require_tensorrt()
    import tensorrt

    return {"tensorrt": tensorrt.__version__, **gpu_info()}


def check_gpu(precision: str, gpu: dict[str, str], *, source=None) -> None:
    """Some precisions' kernels need a recent GPU (FP8: compute capability 8.9, Ada and Hopper); say so before a
    long build fails obscurely."""
    needed = get_precision(precision).min_capability
    if needed is None or gpu["compute_capability"] == "unknown":
        return
    have = tuple(int(x) for x in gpu["compute_capability"].split("."))
    if have < needed:
        fits = [p.name for p in PRECISIONS.values() if p.min_capability is None or p.min_capability <= have]
        raise MbexportError(f"{precision.upper()} engines need compute capability {needed[0]}.{needed[1]}+; "
                            f"{gpu['gpu']} is {gpu['compute_capability']}: build {', '.join(fits)} instead", source)


def build_engine(onnx_path: str | Path, out_path: str | Path, task: Task, profiles: list[Profile] | tuple[Profile, ...],
                 *, precision: str, settings: EngineSettings = EngineSettings(), root: str | Path | None = None
                 ) -> dict:
    """Build ``out_path`` (atomically) from a precision-typed ONNX; return the manifest details.

    ``root`` is the folder the recorded command lines are relative to (the output folder).
    """
    env = environment()
    from polygraphy.backend.trt import EngineFromNetwork, SaveEngine
    from polygraphy.exception import PolygraphyException

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    check_gpu(precision, env, source=onnx_path)
    network, config = loaders(onnx_path, task, profiles, settings)
    start = time.perf_counter()
    with atomic_file(out_path) as tmp:
        try:
            SaveEngine(EngineFromNetwork(network, config=config, save_timing_cache=settings.timing_cache),
                       str(tmp))()
        except PolygraphyException as error:  # parser or builder failure, already logged in full
            raise MbexportError(f"TensorRT could not build an engine ({first_line(error)})",
                                onnx_path) from None
    root = Path(root) if root is not None else out_path.parent

    def rel(path):
        return os.path.relpath(path, root) if path else path

    cache = EngineSettings(settings.builder_optimization_level, settings.workspace_mib, rel(settings.timing_cache))
    return {
        **env,
        "precision": precision,
        "strongly_typed": True,
        "profiles": [p.as_dict(task) for p in profiles],
        "builder_optimization_level": settings.builder_optimization_level,
        "workspace_mib": settings.workspace_mib,
        "build_seconds": round(time.perf_counter() - start, 3),
        "commands": command_lines(rel(onnx_path), rel(out_path), task, profiles, cache),
    }


def trt_runner(engine_path: str | Path):
    """A Polygraphy TrtRunner for a saved engine (use it as a context manager)."""
    require_tensorrt()
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    if not Path(engine_path).is_file():
        raise MbexportError("engine file not found", engine_path)
    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))))
