"""What ``mesagen build`` leaves on disk: file modes, a regenerate command that runs as written, and no
silent overwrite of a layer another spec file generated (issue 7, item 12)."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import pytest

from mesagen.cli import main
from mesagen.writer import provenance

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"


def _project(base: Path, *names: str) -> Path:
    """A folder laid out like a checkout: ``base/specs/NAME.yaml`` copied from the shipped specs."""
    (base / "specs").mkdir(parents=True)
    for n in names:
        shutil.copyfile(SPECS / f"{n}.yaml", base / "specs" / f"{n}.yaml")
    return base


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- (a) file modes follow the umask

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_generated_files_get_the_umask_mode(tmp_path, capsys, umask, mode):
    old = os.umask(umask)
    try:
        assert main(["build", str(SPECS / "linear.yaml"), "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) == 4
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(mode)}
    assert not [p for p in (tmp_path / "out").rglob(".*.tmp")]  # no staged temp file left behind


# ---------------------------------------------------------------- (b) the regenerate command runs as written

def _regenerate_line(text: str) -> tuple[str, list[str]]:
    """(folder named by the header, argv of the command) from a generated file's header."""
    head = next(line for line in text.splitlines()[:8] if "regenerate" in line)
    prefix, command = head.split("): ", 1)
    folder = prefix.split("in the folder that holds ", 1)[1]
    argv = shlex.split(command)
    assert argv[:2] == ["mesagen", "build"], head
    return folder, argv[1:]


@pytest.mark.parametrize("where", ["default", "inside", "outside"])
def test_recorded_regenerate_command_reproduces_the_files(tmp_path, capsys, monkeypatch, where):
    proj = _project(tmp_path / "proj", "delta")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    out = {"default": proj / "generated", "inside": proj / "build" / "gen", "outside": tmp_path / "elsewhere" / "gen"}[where]
    if where == "default":
        monkeypatch.chdir(proj)
        argv = ["build", "specs/delta.yaml"]
    else:  # from an unrelated folder, absolute paths
        monkeypatch.chdir(elsewhere)
        argv = ["build", str(proj / "specs" / "delta.yaml"), "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    built = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert len(built) == 4
    commands = set()
    for path, data in built.items():
        text = data.decode()
        assert str(tmp_path) not in text  # no absolute path reaches a header
        folder, cmd = _regenerate_line(text)
        assert (proj / folder).is_dir()
        commands.add((folder, tuple(cmd)))
    assert len(commands) == 1
    folder, cmd = commands.pop()
    assert ("--out" in cmd) == (where != "default")
    shutil.rmtree(out)
    monkeypatch.chdir(proj)  # "in the folder that holds specs"
    assert main(list(cmd)) == 0
    capsys.readouterr()
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == built


def test_header_is_the_same_from_any_folder_and_location(tmp_path, capsys, monkeypatch):
    """Two copies of one layout, built from different working folders with absolute and relative paths,
    give byte-identical files."""
    a, b = _project(tmp_path / "a" / "proj", "ridge"), _project(tmp_path / "b" / "deeper" / "proj", "ridge")
    monkeypatch.chdir(tmp_path)
    assert main(["build", str(a / "specs" / "ridge.yaml"), "--out", str(a / "build")]) == 0
    monkeypatch.chdir(b / "specs")
    assert main(["build", "ridge.yaml", "--out", "../build"]) == 0
    capsys.readouterr()
    files_a = {str(p.relative_to(a)): p.read_bytes() for p in (a / "build").rglob("*") if p.is_file()}
    files_b = {str(p.relative_to(b)): p.read_bytes() for p in (b / "build").rglob("*") if p.is_file()}
    assert files_a and files_a == files_b
    assert all(b"mesagen build specs/ridge.yaml --out build\n" in data for data in files_a.values())


def test_unsafe_output_folder_name_is_refused(tmp_path, capsys):
    out = tmp_path / "my out"
    assert main(["build", str(SPECS / "linear.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "output folder names may hold only" in err[0] and "'my out'" in err[0]
    assert not out.exists()


# ---------------------------------------------------------------- (d) no silent overwrite of another spec's layer

def _impostor(folder: Path, name: str, text_from: str = "ridge") -> Path:
    """A spec file of another name and folder whose layer is called ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    src = (SPECS / f"{text_from}.yaml").read_text().replace(f"name: {text_from}\n", f"name: {name}\n")
    path = folder / f"my_{name}.yaml"
    path.write_text(src)
    return path


def test_spec_named_like_a_built_layer_is_refused(tmp_path, capsys):
    proj = _project(tmp_path / "proj", "linear")
    out = proj / "generated"
    assert main(["build", str(proj / "specs" / "linear.yaml"), "--out", str(out)]) == 0
    before = _snapshot(out)
    other = _impostor(tmp_path / "mine", "linear")
    capsys.readouterr()
    assert main(["build", str(other), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"mesagen: error: {out / 'linear'} holds layer 'linear' generated from another spec")
    assert "mesagen build specs/linear.yaml" in lines[0] and "--force" in lines[0]
    assert captured.out == ""
    assert _snapshot(out) == before  # nothing written
    # a valid spec beside it on the same command line does not get written either
    assert main(["build", str(proj / "specs" / "linear.yaml"), str(_impostor(tmp_path / "mine", "gd", "gd").parent
                 / "my_gd.yaml"), str(other), "--out", str(out)]) == 2
    capsys.readouterr()
    assert _snapshot(out) == before
    # --force overwrites, and the header then names the new spec file
    assert main(["build", str(other), "--out", str(out), "--force"]) == 0
    capsys.readouterr()
    head = provenance((out / "linear" / "layer_jax.py").read_text())
    assert head["spec"] == "mine/my_linear.yaml"


def test_rebuilding_the_same_spec_is_not_refused(tmp_path, capsys):
    proj = _project(tmp_path / "proj", "ridge")
    spec = proj / "specs" / "ridge.yaml"
    out = proj / "generated"
    assert main(["build", str(spec), "--out", str(out)]) == 0
    spec.write_text(spec.read_text().replace("init: 1.0", "init: 2.0"))  # edited: still the same spec file
    assert main(["build", str(spec), "--out", str(out)]) == 0
    capsys.readouterr()
    from mesagen.spec.loader import load_spec, spec_sha256

    assert f"spec sha256 (canonical): {spec_sha256(load_spec(spec))}" in (out / "ridge" / "layer_jax.py").read_text()


def test_a_file_mesagen_did_not_write_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "delta").mkdir(parents=True)
    (out / "delta" / "layer_jax.py").write_text("# my own delta layer\n")
    assert main(["build", str(SPECS / "delta.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "layer_jax.py exists and was not generated by mesagen" in err
    assert (out / "delta" / "layer_jax.py").read_text() == "# my own delta layer\n"
    assert sorted(p.name for p in (out / "delta").iterdir()) == ["layer_jax.py"]


def test_docs_quote_the_refusal_as_printed(tmp_path, capsys, monkeypatch):
    """docs/specs.md §8 shows the refusal of ``cd proj && mesagen build ../mine/ridge.yaml``: the real message."""
    proj = _project(tmp_path / "proj", "ridge")
    (tmp_path / "mine").mkdir()
    shutil.copyfile(SPECS / "ridge.yaml", tmp_path / "mine" / "ridge.yaml")
    monkeypatch.chdir(proj)
    assert main(["build", "specs/ridge.yaml"]) == 0
    capsys.readouterr()
    assert main(["build", "../mine/ridge.yaml"]) == 2
    line = capsys.readouterr().err.strip()
    doc = (ROOT / "docs" / "specs.md").read_text()
    assert "$ cd proj && mesagen build ../mine/ridge.yaml" in doc
    assert "\n  " + line + "\n" in doc, line


def test_files_with_the_previous_header_format_are_rebuilt(tmp_path, capsys):
    """Files generated before the regenerate line named its folder ('# regenerate: mesagen build ...') belong
    to the same spec: rebuilding them is not refused."""
    proj = _project(tmp_path / "proj", "gd")
    out = proj / "generated"
    assert main(["build", str(proj / "specs" / "gd.yaml"), "--out", str(out)]) == 0
    for p in (out / "gd").iterdir():
        text = p.read_text()
        assert "regenerate (in the folder that holds specs): " in text
        p.write_text(text.replace("regenerate (in the folder that holds specs): ", "regenerate: "))
    assert main(["build", str(proj / "specs" / "gd.yaml"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert "regenerate (in the folder that holds specs): " in (out / "gd" / "layer_jax.py").read_text()
