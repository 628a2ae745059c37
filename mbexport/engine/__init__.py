"""TensorRT engines: optimization profiles from the task registry, a thin Polygraphy build, and a runner."""

from mbexport.engine.build import (EngineSettings, build_engine, check_gpu, command_lines, environment, gpu_info,
                                   loaders, require_tensorrt, tensorrt_available, trt_runner)
from mbexport.engine.profiles import Profile, check_profiles, default_profiles, make_profile

__all__ = ["EngineSettings", "Profile", "build_engine", "check_gpu", "check_profiles", "command_lines",
           "default_profiles", "environment", "gpu_info", "loaders", "make_profile", "require_tensorrt",
           "tensorrt_available", "trt_runner"]
