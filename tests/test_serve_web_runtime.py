"""Fetching onnxruntime-web for the browser decoder, against a local tarball and a stub `npm`.

The stub stands in for the npm client: it writes a tarball built here into the folder npm would
write it to (``npm pack ... --pack-destination DIR``), so these tests check what the fetcher
does with npm's answer (hash check, extraction, atomic cache, messages) without a network.
"""

import base64
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from sam_drop_in._errors import WebRuntimeError
from sam_drop_in.serve import web_runtime

ROOT = Path(__file__).resolve().parents[1]
CONTENT = {"dist/ort.wasm.bundle.min.mjs": b"export const fake = 1;\n",
           "dist/ort-wasm-simd-threaded.wasm": b"\0asm\1\0\0\0" + bytes(range(256)) * 4,
           "README.md": b"not extracted\n"}


def _tarball(path, content=CONTENT):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in content.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return "sha512-" + base64.b64encode(hashlib.sha512(Path(path).read_bytes()).digest()).decode()


def _stub_npm(folder, tgz, exit_code=0):
    """An `npm` that logs its arguments and copies ``tgz`` to --pack-destination."""
    folder.mkdir(parents=True, exist_ok=True)
    npm = folder / "npm"
    npm.write_text(f"""#!{sys.executable}
import shutil, sys
args = sys.argv[1:]
with open({str(folder / 'calls.log')!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
if {exit_code}:
    sys.stderr.write("npm ERR! 404 Not Found\\n")
    sys.exit({exit_code})
dest = args[args.index("--pack-destination") + 1]
shutil.copy({str(tgz)!r}, dest + "/onnxruntime-web-{web_runtime.VERSION}.tgz")
""")
    npm.chmod(npm.stat().st_mode | stat.S_IXUSR)
    return npm


@pytest.fixture()
def fake(tmp_path):
    tgz = tmp_path / "fake.tgz"
    integrity = _tarball(tgz)
    return tgz, integrity


def test_fetch_extracts_verified_files_once(tmp_path, fake):
    tgz, integrity = fake
    npm = _stub_npm(tmp_path / "bin", tgz)
    cache = tmp_path / "cache"
    lines = []
    folder = web_runtime.fetch(cache, npm=str(npm), integrity=integrity, log=lines.append)
    assert folder == web_runtime.runtime_dir(cache)
    for name in web_runtime.FILES:
        assert (folder / Path(name).name).read_bytes() == CONTENT[name]
    assert not (folder / "README.md").exists()
    assert json.loads((folder / "manifest.json").read_text())["integrity"] == integrity
    assert web_runtime.installed(cache) == folder
    # npm was asked for the pinned version, and nothing but the runtime folder is left.
    calls = (tmp_path / "bin" / "calls.log").read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith(f"pack onnxruntime-web@{web_runtime.VERSION} ")
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]
    assert any("verified" in line for line in lines)
    # A second fetch finds the copy and does not run npm.
    assert web_runtime.fetch(cache, npm=str(npm), integrity=integrity) == folder
    assert len((tmp_path / "bin" / "calls.log").read_text().splitlines()) == 1


def test_fetch_refuses_wrong_hash_and_leaves_nothing(tmp_path, fake):
    tgz, integrity = fake
    npm = _stub_npm(tmp_path / "bin", tgz)
    cache = tmp_path / "cache"
    wrong = "sha512-" + base64.b64encode(hashlib.sha512(b"another tarball").digest()).decode()
    with pytest.raises(WebRuntimeError, match="refused"):
        web_runtime.fetch(cache, npm=str(npm), integrity=wrong)
    assert list(cache.iterdir()) == []          # no runtime folder, no temporary leftovers
    assert web_runtime.installed(cache) is None


def test_fetch_incomplete_copy_is_not_installed(tmp_path, fake):
    tgz, integrity = fake
    cache = tmp_path / "cache"
    folder = web_runtime.fetch(cache, npm=str(_stub_npm(tmp_path / "bin", tgz)), integrity=integrity)
    (folder / "ort-wasm-simd-threaded.wasm").write_bytes(b"truncated")
    assert web_runtime.installed(cache) is None
    # Fetching again replaces the damaged copy.
    web_runtime.fetch(cache, npm=str(_stub_npm(tmp_path / "bin", tgz)), integrity=integrity)
    assert web_runtime.installed(cache) == folder


def test_fetch_tarball_without_the_files_is_refused(tmp_path):
    tgz = tmp_path / "other.tgz"
    integrity = _tarball(tgz, {"README.md": b"x"})
    cache = tmp_path / "cache"
    with pytest.raises(WebRuntimeError, match="has no dist/"):
        web_runtime.fetch(cache, npm=str(_stub_npm(tmp_path / "bin", tgz)), integrity=integrity)
    assert list(cache.iterdir()) == []


def test_fetch_npm_failure_and_npm_missing(tmp_path, fake, monkeypatch):
    tgz, integrity = fake
    cache = tmp_path / "cache"
    with pytest.raises(WebRuntimeError, match="failed .*404"):
        web_runtime.fetch(cache, npm=str(_stub_npm(tmp_path / "bin", tgz, exit_code=1)), integrity=integrity)
    assert list(cache.iterdir()) == []
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(WebRuntimeError, match="npm is not installed.*--fetch-web-runtime"):
        web_runtime.fetch(cache, integrity=integrity)


def test_cache_root_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert web_runtime.cache_root() == tmp_path / "sam_drop_in"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert web_runtime.cache_root() == Path.home() / ".cache" / "sam_drop_in"


def test_decoder_choice_falls_back_to_server_without_npm(monkeypatch, tmp_path, capsys):
    from sam_drop_in.cli.serve import _decoder_setup

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for choice in ("auto", "browser"):
        decoder, folder, note = _decoder_setup(choice)
        assert (decoder, folder) == ("server", None)
        assert "unavailable" in note and ("npm is not installed" in note or "onnx" in note)
    assert "browser decoding unavailable" in capsys.readouterr().err   # --decoder browser warns
    assert _decoder_setup("server") == ("server", None, "")


def _cli(args, env):
    full = dict(os.environ, **env)
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "sam_drop_in", "serve", *args], capture_output=True, text=True,
                          env=full, cwd=ROOT, timeout=300)


def test_cli_fetch_web_runtime_messages(tmp_path, fake):
    tgz, _ = fake
    xdg = str(tmp_path / "xdg")
    # No npm: exit 1 and one line that says what to install.
    r = _cli(["--fetch-web-runtime"], {"XDG_CACHE_HOME": xdg, "PATH": str(tmp_path / "empty")})
    assert r.returncode == 1 and "npm is not installed" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    # An npm that hands over a tarball other than the pinned release: refused, nothing cached.
    _stub_npm(tmp_path / "bin", tgz)
    r = _cli(["--fetch-web-runtime"], {"XDG_CACHE_HOME": xdg, "PATH": str(tmp_path / "bin")})
    assert r.returncode == 1 and "refused" in r.stderr, r.stderr
    assert not web_runtime.runtime_dir(Path(xdg) / "sam_drop_in").exists()
