"""Hostile input, faults and concurrency (issue 11): nothing outside the output folder is touched, nothing a
user has is replaced without --overwrite, two writers never lose an artifact, bad input and a failing file
system get one line and leave nothing behind, text prints literally, and killed writers' leftovers go.

Every hostile file is built here; processes these tests start are stopped by their own pid.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from mbexport.build import build
from mbexport.checkpoint.example import make_example
from mbexport.errors import MbexportError
from mbexport.fsutil import LOCK, check_output, clean_leftovers, folder_lock
from mbexport.manifest import Manifest
from mbexport.recipes import Recipe

MLM = Recipe(name="test", task="mlm", precision="fp16", target="onnx")


@pytest.fixture
def cli(cli):
    """conftest's in-process ``mbexport``, taking paths as well as strings."""
    return lambda *args: cli(*map(str, args))


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return make_example(tmp_path_factory.mktemp("example"), seed=0)  # (checkpoint zip, vocab.txt)


@pytest.fixture(scope="module")
def built(example, tmp_path_factory):
    """masked-LM fp32 + fp16 (made_from fp32), vocab, validation: a complete output folder."""
    out = tmp_path_factory.mktemp("built") / "out"
    build(example[0], MLM, out_dir=out, vocab=example[1])
    return out


@pytest.fixture
def folder(built, tmp_path):
    """A private copy of the built folder, beside a file that must survive everything: the victim."""
    (tmp_path / "victim.txt").write_text("precious")
    return Path(shutil.copytree(built, tmp_path / "out"))


def mbexport(*args, **kwargs) -> subprocess.Popen:
    """``mbexport ARGS`` as its own process (stdout and stderr to files when given)."""
    return subprocess.Popen([sys.executable, "-m", "mbexport", *map(str, args)], text=True, **kwargs)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def edit_manifest(root: Path, change) -> None:
    data = json.loads((root / "manifest.json").read_text())
    change(data)
    (root / "manifest.json").write_text(json.dumps(data))


def artifact(data, precision):
    return next(a for a in data["artifacts"] if a["precision"] == precision and a["kind"] == "onnx")


# ---- class 1: every path in a manifest stays inside its folder -------------------------------------------------------
LEAVING = ["../victim.txt", "/etc/passwd", "masked-lm/../../victim.txt", "./masked-lm/model.fp16.onnx",
           "masked-lm//model.fp16.onnx", "..\\victim.txt", "C:/victim.txt", "masked-lm/\0x", "", "masked-lm/"]


@pytest.mark.parametrize("path", LEAVING)
@pytest.mark.parametrize("field", ["path", "external_data", "made_from"])
def test_manifest_paths_that_leave_the_folder_are_refused(folder, path, field):
    def change(data):
        fp16 = artifact(data, "fp16")
        if field == "path":
            fp16["path"] = path
        else:
            fp16["details"][field] = {"path": path, "sha256": "0" * 64}

    edit_manifest(folder, change)
    with pytest.raises(MbexportError, match=r"manifest\.json: malformed manifest: .*" + field):
        Manifest.load(folder)


def test_external_data_is_a_file_beside_its_model(folder):
    edit_manifest(folder, lambda d: artifact(d, "fp16")["details"].update(
        external_data={"path": "sub/model.data", "sha256": "0" * 64}))
    with pytest.raises(MbexportError, match="not a file name beside its model"):
        Manifest.load(folder)


def test_a_symbolic_link_out_of_the_folder_is_refused(folder, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.move(folder / "masked-lm", outside)
    (folder / "masked-lm").symlink_to(outside, target_is_directory=True)
    with pytest.raises(MbexportError, match="leads outside the folder through a symbolic link"):
        Manifest.load(folder)


def test_build_cleanup_never_deletes_outside_the_folder(folder, example, tmp_path, cli):
    """The stale-artifact cleanup used to delete whatever an fp16 entry "made from" a changed fp32 named."""
    def change(data):
        fp16 = artifact(data, "fp16")
        fp16["path"] = "../victim.txt"
        fp16["details"]["made_from"]["sha256"] = "f" * 64  # stale: made from an fp32 that is not there any more

    edit_manifest(folder, change)
    code, out, err = cli("build", example[0], "--task", "mlm", "--precision", "fp32", "--target", "onnx",
                         "--out", folder, "--vocab", example[1])
    assert code == 2 and "manifest.json" in one_line(err) and "../victim.txt" in err
    assert (tmp_path / "victim.txt").read_text() == "precious"


def test_triton_never_copies_a_file_from_outside(folder, tmp_path, cli):
    from mbexport.fsutil import sha256_file

    victim = tmp_path / "victim.txt"
    edit_manifest(folder, lambda d: artifact(d, "fp16").update(path=str(victim), sha256=sha256_file(victim)))
    code, out, err = cli("triton", folder, "--repo", tmp_path / "repo")
    assert code == 2 and "is absolute" in one_line(err) and not (tmp_path / "repo").exists()


# ---- class 2: a folder or file the user has is never silently replaced -----------------------------------------------
def test_convert_refuses_a_non_empty_folder_and_a_file(example, tmp_path, cli):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    a_file = tmp_path / "a-file"
    a_file.write_text("mine too")
    for out, message in [(mine, "is not empty (1 entry: notes.txt); choose a new or empty folder, or pass "
                                "--overwrite"), (a_file, "is a file, not a folder")]:
        code, _, err = cli("convert", example[0], "--out", out)
        assert code == 2 and str(out) in one_line(err) and message in err
    assert (mine / "notes.txt").read_text() == "mine" and a_file.read_text() == "mine too"
    code, _, err = cli("convert", example[0], "--out", a_file, "--overwrite")  # a file is never replaced
    assert code == 2 and a_file.read_text() == "mine too"
    code, _, err = cli("convert", example[0], "--out", mine, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary, no moved-aside folder


def test_an_output_never_replaces_its_input(example, tmp_path, cli):
    src = tmp_path / "src"
    shutil.copytree(example[0].parent, src)
    ckpt, vocab = src / example[0].name, src / example[1].name
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    cases = [("convert", ckpt, "--out", src), ("convert", ckpt, "--out", src, "--overwrite"),
             ("convert", ckpt, "--out", ckpt, "--overwrite"),
             ("build", ckpt, "--task", "mlm", "--precision", "fp32", "--out", src, "--overwrite"),
             ("export", ckpt, "--task", "mlm", "--out", src, "--overwrite"),
             ("build", ckpt, "--task", "mlm", "--precision", "fp32", "--out", tmp_path / "o", "--vocab",
              tmp_path / "o" / "vocab.txt", "--overwrite")]
    (tmp_path / "o").mkdir()
    shutil.copy(vocab, tmp_path / "o" / "vocab.txt")
    for args in cases:
        code, _, err = cli(*args)
        assert code == 2 and "the input" in one_line(err), (args, err)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert (tmp_path / "o" / "vocab.txt").exists()
    hf = tmp_path / "hf"
    assert cli("convert", ckpt, "--out", hf)[0] == 0
    code, _, err = cli("convert", hf, "--out", hf / "inside")
    assert code == 2 and "lies inside the input" in one_line(err)


@pytest.mark.parametrize("command", ["export", "build"])
def test_export_and_build_update_their_own_folder_and_refuse_others(command, example, folder, tmp_path, cli):
    args = {"export": ("export", example[0], "--task", "mlm"),
            "build": ("build", example[0], "--task", "mlm", "--precision", "fp32", "--target", "onnx")}[command]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, _, err = cli(*args, "--out", mine)
    assert code == 2 and "was not written by mbexport (no manifest.json)" in one_line(err)
    assert os.listdir(mine) == ["notes.txt"]
    code, _, err = cli(*args, "--out", tmp_path / "victim.txt")
    assert code == 2 and "is a file, not a folder" in one_line(err)
    code, _, err = cli(*args, "--out", folder)  # an mbexport output folder: updated in place, as before
    assert code == 0, err
    code, _, err = cli(*args, "--out", mine, "--overwrite")  # replaced: the notes go, only mbexport's files stay
    assert code == 0, err
    assert not (mine / "notes.txt").exists() and Manifest.load(mine).find("masked-lm", "fp32", "onnx")


def test_example_and_triton_obey_the_same_rule(folder, tmp_path, cli):
    ex = tmp_path / "ex"
    assert cli("example", ex)[0] == 0
    code, _, err = cli("example", ex)
    assert code == 2 and "--overwrite" in one_line(err)
    code, _, err = cli("example", tmp_path / "victim.txt")
    assert code == 2 and "is a file, not a folder" in one_line(err)
    assert cli("example", ex, "--overwrite")[0] == 0
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "notes.txt").write_text("mine")
    code, _, err = cli("triton", folder, "--repo", repo)
    assert code == 2 and "--overwrite" in one_line(err) and (repo / "notes.txt").exists()
    code, _, err = cli("triton", folder, "--repo", folder / "repo")
    assert code == 2 and "lies inside the input" in one_line(err)
    code, _, err = cli("triton", folder, "--repo", repo, "--overwrite")
    assert code == 0, err
    assert not (repo / "notes.txt").exists()
    assert cli("triton", folder, "--repo", repo)[0] == 0  # its own repository: rewritten without the flag


def test_the_rule_in_one_function(tmp_path):
    assert check_output(tmp_path / "new") == "new"
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty") == "empty"
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "manifest.json").write_text("{}")
    assert check_output(tmp_path / "ours", marker="manifest.json") == "ours"
    with pytest.raises(MbexportError, match="no other.json"):
        check_output(tmp_path / "ours", marker="other.json")
    assert check_output(tmp_path / "ours", overwrite=True) == "replace"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(MbexportError, match="dangling"):
        check_output(tmp_path / "dangling")


def test_outputs_get_the_modes_the_umask_gives(example, tmp_path, cli):
    """What users share (an output folder read by a server or a colleague) gets the modes their umask gives new
    files, not the private 0600/0700 of the temporaries it was written as."""
    old = os.umask(0o027)
    try:
        make_example(tmp_path / "example", seed=1)
        assert cli("convert", example[0], "--out", tmp_path / "hf", "--vocab", example[1])[0] == 0
        build(example[0], Recipe(name="test", task="mlm", precision="fp32", target="onnx"), out_dir=tmp_path / "out",
              vocab=example[1])
    finally:
        os.umask(old)
    paths = [p for root in ("example", "hf", "out") for p in (tmp_path / root, *(tmp_path / root).rglob("*"))]
    assert {oct(p.stat().st_mode & 0o777) for p in paths if p.is_dir()} == {oct(0o750)}
    assert {oct(p.stat().st_mode & 0o777) for p in paths if p.is_file()} == {oct(0o640)}


# ---- class 3: concurrent writers -------------------------------------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from mbexport.fsutil import folder_lock
with folder_lock(Path(sys.argv[1])):
    Path(sys.argv[2]).write_text("locked")
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
"""


def hold_lock(folder: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    ready, release = tmp_path / "ready", tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(ready), str(release)])
    wait_for(lambda: ready.exists(), holder)
    return holder, release


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the process ended first"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_second_writer_waits_and_says_who_holds_the_lock(folder, tmp_path):
    holder, release = hold_lock(folder, tmp_path)
    try:
        with open(tmp_path / "err", "w") as err:
            second = mbexport("validate", folder, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: f"waiting for pid {holder.pid}" in (tmp_path / "err").read_text(), second)
            time.sleep(0.5)
            assert second.poll() is None  # still waiting
            release.write_text("go")
            assert second.wait(120) == 0, (tmp_path / "err").read_text()
        finally:
            second.kill()
            second.wait()
    finally:
        release.write_text("go")
        holder.wait(30)
    assert not (folder / LOCK).exists()


def test_the_lock_of_a_killed_writer_is_taken_over(folder, tmp_path, cli):
    holder, _ = hold_lock(folder, tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    assert str(holder.pid) in (folder / LOCK).read_text()  # the stale lock file, with its holder's pid
    code, _, err = cli("validate", folder)
    assert code == 0 and f"took over the lock left by pid {holder.pid}" in err
    assert not (folder / LOCK).exists()


def test_two_concurrent_builds_both_land_in_the_manifest(example, tmp_path):
    out = tmp_path / "out"
    common = ("--precision", "fp32", "--target", "onnx", "--out", out, "--vocab", example[1])
    logs = [tmp_path / "qa.err", tmp_path / "mlm.err"]
    with open(logs[0], "w") as qa_err, open(logs[1], "w") as mlm_err:
        builds = [mbexport("build", example[0], "--task", "qa", "--init-missing-head", "0", *common,
                           stdout=subprocess.DEVNULL, stderr=qa_err),
                  mbexport("build", example[0], "--task", "mlm", *common, stdout=subprocess.DEVNULL, stderr=mlm_err)]
        try:
            codes = [b.wait(300) for b in builds]
        finally:
            for b in builds:
                b.kill()
                b.wait()
    errs = [log.read_text() for log in logs]
    assert codes == [0, 0], errs
    assert any(f"waiting for pid {other.pid}" in err for other, err in zip(builds[::-1], errs)), errs
    manifest = Manifest.load(out)
    recorded = {manifest.path_of(a) for a in manifest.artifacts}
    on_disk = {p for p in out.rglob("*") if p.is_file() and p.suffix in (".onnx", ".safetensors")}
    assert {a.task for a in manifest.find(kind="onnx")} == {"question-answering", "masked-lm"}
    assert on_disk <= recorded and all(manifest.verify(a) is None for a in manifest.artifacts)


# ---- class 5: one line, exit 2, nothing left behind ------------------------------------------------------------------
WRONG_TYPES = [
    lambda d: d.update(artifacts={"a": 1}),
    lambda d: d["artifacts"].append("model.onnx"),
    lambda d: d.update(config=[1, 2]),
    lambda d: d["config"].update(hidden_size="wide"),
    lambda d: d["config"].update(num_attention_heads=0),
    lambda d: d.update(source="ckpt.zip"),
    lambda d: d["source"].update(path=5),
    lambda d: artifact(d, "fp16").update(path=7),
    lambda d: artifact(d, "fp16").update(sha256="abc"),
    lambda d: artifact(d, "fp16").update(task="../qa"),
    lambda d: artifact(d, "fp16").update(kind="script"),
    lambda d: artifact(d, "fp16").update(precision=["fp16"]),
    lambda d: artifact(d, "fp16").update(details=[]),
    lambda d: artifact(d, "fp16").update(io=None),
    lambda d: artifact(d, "fp16").update(extra=1),
    lambda d: artifact(d, "fp16").pop("sha256"),
    lambda d: artifact(d, "fp16")["details"].update(made_from="model.fp32.onnx"),
    lambda d: artifact(d, "fp16")["details"].update(cache_key=3),
    lambda d: artifact(d, "fp16")["details"].update(profiles=[{"batch": [1, 8]}]),
    lambda d: artifact(d, "fp16")["details"].update(profiles={"batch": [1, 8, 32]}),
    lambda d: artifact(d, "fp16")["details"].update(warnings="x"),
]


@pytest.mark.parametrize("change", WRONG_TYPES)
def test_manifest_fields_of_the_wrong_type(folder, change, cli):
    edit_manifest(folder, change)
    for command in (("validate", folder), ("bench", folder, "--backends", "ort-cpu", "--iters", "1"),
                    ("run", folder, "--task", "mlm", "--text", "the [MASK]")):
        code, _, err = cli(*command)
        assert code == 2 and "manifest.json: malformed manifest" in one_line(err), (command, err)


def test_a_manifest_that_is_not_json(folder, cli):
    for data in (b"\xff\xfe not utf-8", b"{", b"[]", b"null"):
        (folder / "manifest.json").write_bytes(data)
        code, _, err = cli("validate", folder)
        assert code == 2 and "manifest.json: malformed manifest" in one_line(err)


@pytest.mark.parametrize("option", ["--vocab", "--calib-text"])
@pytest.mark.parametrize("content", [b"\x00\x01\x02binary", b"\xff\xd8\xff\xe0 jpeg-ish", b"PK\x03\x04\x14\x00"])
def test_a_binary_file_as_vocab_or_calibration_text(example, tmp_path, option, content, cli):
    binary = tmp_path / "file.bin"
    binary.write_bytes(content)
    vocab = () if option == "--vocab" else ("--vocab", example[1])
    code, _, err = cli("build", example[0], "--task", "mlm", "--precision", "int8", "--target", "onnx",
                       "--out", tmp_path / "out", *vocab, option, binary)
    assert code == 2 and "file.bin: not a text file" in one_line(err)
    assert not (tmp_path / "out").exists()  # refused before anything was written
    if option == "--vocab":
        code, _, err = cli("export", example[0], "--task", "mlm", "--out", tmp_path / "out", "--vocab", binary)
        assert code == 2 and "file.bin: not a text file" in one_line(err) and not (tmp_path / "out").exists()


def test_a_failure_after_work_leaves_no_new_folder(example, tmp_path, cli):
    """The output folder a failed build created goes again, with what the build had written in it."""
    code, _, err = cli("build", example[0], "--task", "qa", "--precision", "fp32", "--target", "onnx",
                       "--out", tmp_path / "a" / "b" / "out")
    assert code == 2 and "no 'question-answering' head" in one_line(err)
    assert os.listdir(tmp_path) == []


def test_library_warnings_stay_off_the_terminal(monkeypatch, cli):
    import mbexport.build

    def noisy(*args, **kwargs):
        warnings.warn("a library's note", UserWarning)  # raised from this file: not mbexport's own
        raise MbexportError("the [real] problem", "ckpt[v2].zip")

    monkeypatch.setattr(mbexport.build, "build", noisy)
    code, _, err = cli("build", "x", "--task", "qa")
    assert code == 2 and one_line(err) == "error: ckpt[v2].zip: the [real] problem"


def namespace_mount(tmp_path: Path, options: str, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) with a fresh tmpfs at ``$MNT`` (mount options ``options``), in a private user and
    mount namespace: a real full or read-only file system without root. Skips where namespaces are off."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs tmpfs {mnt}"], capture_output=True,
                           text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode:
        pytest.skip(f"no user and mount namespaces here ({probe.stderr.strip() if probe else 'no unshare'})")
    env = {**os.environ, "MNT": str(mnt), "PY": sys.executable}
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {mnt} && {script}"],
                          capture_output=True, text=True, env=env, timeout=300)


def test_a_full_disk(example, tmp_path):
    result = namespace_mount(tmp_path, "size=256k", f'"$PY" -m mbexport build {example[0]} --task mlm --precision '
                             f'fp32 --target onnx --out "$MNT/out" --vocab {example[1]}; echo "rc=$?"; ls -A "$MNT"')
    assert result.stdout.splitlines()[-1] == "rc=2", result.stdout + result.stderr  # and `ls -A` listed nothing
    line = one_line(result.stderr)
    assert "/mnt/out" in line and "cannot write it: no space left on device" in line


def test_a_read_only_output_folder(example, tmp_path):
    script = (f'mkdir "$MNT/out" && mount -o remount,ro "$MNT" && "$PY" -m mbexport build {example[0]} --task mlm '
              f'--precision fp32 --target onnx --out "$MNT/out" --vocab {example[1]}; echo "rc=$?"')
    result = namespace_mount(tmp_path, "size=8m", script)
    assert result.stdout.splitlines()[-1] == "rc=2", result.stdout + result.stderr
    line = one_line(result.stderr)
    assert "/mnt/out: cannot write in this folder" in line and "read-only file system" in line.lower()


# ---- class 6: text prints literally ----------------------------------------------------------------------------------
def test_brackets_survive_every_console(example, tmp_path, monkeypatch, cli):
    ckpt = tmp_path / "ckpt[v2].zip"
    shutil.copy(example[0], ckpt)
    code, out, err = cli("inspect", ckpt)  # a table whose title is the path
    assert code == 0 and "ckpt[v2].zip" in out
    code, _, err = cli("convert", ckpt, "--out", tmp_path / "hf[x]")
    assert code == 0 and "hf[x]" in err
    code, _, err = cli("build", ckpt, "--task", "mlm", "--precision", "int8", "--target", "onnx", "--out",
                       tmp_path / "o[1]", "--calib-text", tmp_path / "calib[1].txt")
    assert code == 2 and "calib[1].txt" in err.splitlines()[-1]
    assert "o[1]" not in os.listdir(tmp_path)


def test_bench_hint_keeps_its_extra(folder, monkeypatch, cli):
    import mbexport.bench

    monkeypatch.setattr(mbexport.bench, "bench", lambda *a, **k: {"plot": None, "results": []})
    monkeypatch.setattr(mbexport.bench, "summary", lambda report: "[bold]no[/bold] rows")
    code, out, _ = cli("bench", folder)
    assert code == 0 and "pip install 'mbexport[bench]'" in out and "[bold]no[/bold] rows" in out


def test_help_texts_keep_their_brackets(cli):
    import re

    from mbexport.cli import app

    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        helps = [p.default.help or "" for p in __import__("inspect").signature(command.callback).parameters.values()
                 if hasattr(p.default, "help")]
        brackets = {b for text in helps for b in re.findall(r"\[[^\]\s]+\]", text)}
        if brackets:
            code, out, _ = cli(name, "--help")
            assert code == 0 and all(b in out for b in brackets), (name, brackets)


# ---- class 8: a killed writer's leftovers ----------------------------------------------------------------------------
def test_a_killed_build_leaves_leftovers_that_the_next_build_cleans(example, tmp_path, cli):
    out = tmp_path / "out"
    args = ("build", example[0], "--task", "mlm", "--precision", "fp32", "--target", "onnx", "--out", out,
            "--vocab", example[1])
    killed = mbexport(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(f".tmp-{killed.pid}-" in p.name for p in out.rglob("*")), killed)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
    leftovers = [p for p in out.rglob("*") if f".tmp-{killed.pid}-" in p.name]
    assert leftovers and (out / LOCK).exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        decoy = out / "masked-lm" / f".model.fp32.onnx.tmp-{live.pid}-abcdefgh"  # a live writer's: kept
        decoy.parent.mkdir(exist_ok=True)
        decoy.write_text("still being written")
        code, _, err = cli(*args)
        assert code == 0, err
        assert not [p for p in out.rglob("*") if f".tmp-{killed.pid}-" in p.name] and decoy.exists()
        assert f"left by pid {killed.pid} (no longer running)" in err
        assert f"took over the lock left by pid {killed.pid}" in err
    finally:
        live.kill()
        live.wait()


def test_an_interrupted_replace_puts_the_old_folder_back(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    moved = tmp_path / f".repo.old-{dead.pid}-abcdefgh"
    (moved / "repo").mkdir(parents=True)
    (moved / "repo" / "config.pbtxt").write_text("mine")
    (tmp_path / f".repo.tmp-{dead.pid}-abcdefgh").mkdir()
    removed = clean_leftovers(tmp_path, only="repo")
    assert len(removed) == 2 and (tmp_path / "repo" / "config.pbtxt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["repo"]


def test_a_nested_writer_in_one_process_does_not_wait_for_itself(tmp_path):
    with folder_lock(tmp_path / "out") as created:
        assert created == tmp_path / "out"
        with folder_lock(tmp_path / "out") as again:
            assert again is None
    assert os.listdir(tmp_path / "out") == []
