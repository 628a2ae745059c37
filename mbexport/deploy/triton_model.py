"""The ``model.py`` of the ensemble's Python-backend models (copied as is by ``mbexport triton``).

One file serves both roles, chosen by the config's ``role`` parameter: ``tokenizer`` turns the request's
strings into encoder inputs, ``postprocess`` turns the model's outputs into one JSON answer per row. Both
defer to :class:`mbexport.deploy.pipeline.TextPipeline`, so Triton's answers are ``mbexport run``'s answers.
The folder beside this file holds the pipeline's vocab and settings.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mbexport.deploy.pipeline import TextPipeline


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.role = config["parameters"]["role"]["string_value"]
        self.pipeline = TextPipeline.load(Path(args["model_repository"]) / args["model_version"])
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = {tensor["name"]: pb_utils.triton_string_to_numpy(tensor["data_type"])
                        for tensor in config["output"]}

    def execute(self, requests):
        responses = []
        for request in requests:
            arrays = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            try:
                results = self._tokenize(arrays) if self.role == "tokenizer" else self._postprocess(arrays)
            except Exception as error:  # a bad request must not take the model down: answer it with the error
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(error))))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, np.ascontiguousarray(results[name], dtype=dtype))
                for name, dtype in self.outputs.items()]))
        return responses

    def _tokenize(self, arrays):
        texts = {name: [_text(v) for v in array.reshape(-1)] for name, array in arrays.items()}
        return self.pipeline.encode(texts)

    def _postprocess(self, arrays):
        answers = self.pipeline.answers(arrays, arrays)
        [name] = self.outputs
        return {name: np.array([[json.dumps(answer).encode("utf-8")] for answer in answers], dtype=np.object_)}


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
