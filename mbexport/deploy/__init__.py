"""Deploy: a Triton model repository (``triton``) and the local text-in, answer-out twin (``run``).

Nothing is imported here on purpose: Triton's Python models import ``mbexport.deploy.pipeline`` and should
not pay for ONNX Runtime, Polygraphy or the exporters. Use ``mbexport.deploy.triton.write_repository`` and
``mbexport.deploy.run.answer``.
"""
