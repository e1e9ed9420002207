"""Downloads of public prompt files, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest
from conftest import assert_user_error

from clipeval import fetch
from clipeval.errors import ClipevalError

PARTI_SHA = "fab29e41bb512a169b56acab4cf2a41dcb675e285df2efcde6640c7dd3c440eb"


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www; records the paths requested."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLIPEVAL_CACHE_DIR", str(cache))
    return cache


def test_download_verifies_caches_and_does_not_refetch(server, fresh_cache):
    root, base, requests = server
    (root / "f.txt").write_bytes(b"hello\n")
    digest = hashlib.sha256(b"hello\n").hexdigest()
    path = fetch.fetch("f.txt", f"{base}/f.txt", digest)
    assert path.read_bytes() == b"hello\n"
    assert path.is_relative_to(fresh_cache)
    assert fetch.fetch("f.txt", f"{base}/f.txt", digest) == path
    assert requests == ["/f.txt"]  # the second call used the cache


def test_wrong_hash_is_refused_and_not_cached(server, fresh_cache):
    root, base, _ = server
    (root / "f.txt").write_bytes(b"tampered\n")
    with pytest.raises(ClipevalError, match="sha256 .* expected .* refusing"):
        fetch.fetch("f.txt", f"{base}/f.txt", hashlib.sha256(b"hello\n").hexdigest())
    assert not [p for p in fresh_cache.rglob("*") if p.is_file()]


def test_corrupted_cache_entry_is_downloaded_again(server, fresh_cache):
    root, base, requests = server
    (root / "f.txt").write_bytes(b"hello\n")
    digest = hashlib.sha256(b"hello\n").hexdigest()
    path = fetch.fetch("f.txt", f"{base}/f.txt", digest)
    path.write_bytes(b"bit rot")
    assert fetch.fetch("f.txt", f"{base}/f.txt", digest).read_bytes() == b"hello\n"
    assert len(requests) == 2


def test_builtin_library_through_an_http_mirror(cli, server, fresh_cache, shared_data, monkeypatch):
    root, base, requests = server
    shutil.copy(shared_data / "PartiPrompts.tsv", root)
    monkeypatch.setenv("CLIPEVAL_LIBRARY_MIRROR", base + "/")
    result = cli("prompts", "parti")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("\n") >= 1633
    assert requests == ["/PartiPrompts.tsv"]
    assert (fresh_cache / "libraries" / PARTI_SHA / "PartiPrompts.tsv").is_file()


def test_builtin_library_with_a_tampered_mirror_is_an_error(cli, server, fresh_cache, shared_data, monkeypatch):
    root, base, _ = server
    data = (shared_data / "PartiPrompts.tsv").read_bytes().replace(b"wombat", b"wambat", 1)
    (root / "PartiPrompts.tsv").write_bytes(data)
    monkeypatch.setenv("CLIPEVAL_LIBRARY_MIRROR", base)
    assert_user_error(cli("prompts", "parti"), "PartiPrompts.tsv", "sha256", "refusing")


def test_unreachable_source_is_one_line_with_what_to_do(cli, fresh_cache, monkeypatch):
    monkeypatch.setenv("CLIPEVAL_LIBRARY_MIRROR", "http://127.0.0.1:9")  # discard port: refused
    result = cli("prompts", "drawbench")
    assert_user_error(result, "could not get drawbench.csv from CLIPEVAL_LIBRARY_MIRROR=http://127.0.0.1:9")
    assert "offline? set" not in result.stderr  # it is set: the line says what it lacks


def test_mirror_file_url_and_default_cache_location(shared_data, monkeypatch, tmp_path):
    monkeypatch.delenv("CLIPEVAL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetch.cache_dir() == tmp_path / "xdg" / "clipeval"
    monkeypatch.setenv("CLIPEVAL_LIBRARY_MIRROR", shared_data.as_uri())
    path = fetch.fetch("PartiPrompts.tsv", "https://example.invalid/x", PARTI_SHA)
    assert path.is_relative_to(tmp_path / "xdg" / "clipeval")
