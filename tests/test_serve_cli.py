"""`sam-drop-in serve` as a user starts it: a real process, random weights, a free port."""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve-test]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve-test]'")

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_serve_random_weights_serves_page_and_api(tmp_path):
    # --decoder auto on a machine without npm (empty PATH, empty cache): the server starts,
    # decodes on the server and says why.
    env = dict(_env(), PATH=str(tmp_path / "empty"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "sam_drop_in", "serve", "--checkpoint", "random", "--port", "0",
                             "--decoder", "auto"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        before = []
        line = proc.stdout.readline()
        while line and "http://" not in line:
            before.append(line)
            line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, (before, line, proc.stderr.read() if proc.poll() is not None else "")
        assert any("browser decoding unavailable" in b for b in before), before
        assert "decoding in the server" in proc.stdout.readline()
        url = line.split("http://", 1)[1].split()[0]
        with urllib.request.urlopen(f"http://{url}", timeout=60) as r:
            assert b"sam-drop-in" in r.read()
        with urllib.request.urlopen(f"http://{url}api/info", timeout=60) as r:
            info = json.loads(r.read())
        assert info["model_type"] == "vit_t" and info["random_weights"] is True
        assert info["decoder"] == "server" and info["browser_decoder"] is None
        assert "unavailable" in info["decoder_note"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
    assert "RANDOM weights" in proc.stderr.read()


@pytest.mark.parametrize("argv, words", [
    (["--port", "70000"], "--port"),
    (["--max-upload-mb", "0"], "--max-upload-mb"),
    (["--host", "no-such-host.invalid"], "--host"),
])
def test_serve_bad_options_exit_2(argv, words):
    r = subprocess.run([sys.executable, "-m", "sam_drop_in", "serve", "--checkpoint", "random", *argv],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    assert words in r.stderr and r.stderr.count("\n") == 1
