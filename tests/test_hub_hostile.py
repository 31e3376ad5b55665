"""The Hub client (hub.py, http_get.py) against a hostile server: test_hub.py's FakeHub, made
to misbehave in one way per test. Every failure must be a HubError of one line that names the
repo, as the command line shows it (`error: ...` and exit status 2), and nothing may be
written outside $HF_HOME. The limits are made tiny, so each test takes well under a second."""
import contextlib
import io
import json
import re
import time
import urllib.request

import pytest

import generate
from loaders import http_get, hub
from loaders.checkpoint import CheckpointError, load, report_errors
from loaders.hub import HubError
from test_hub import MAIN, REPO, FakeHub, folder_files, same_model, sibling, snapshot_dir
from tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("hostile") / "main", seed=0)


@pytest.fixture
def server(checkpoint, tmp_path, monkeypatch):
    """The FakeHub serving the tiny checkpoint as main; the working directory is empty, and
    stays so: with $HF_HOME, it is all there is in tmp_path."""
    fake = FakeHub({MAIN: folder_files(checkpoint)}, {"main": MAIN})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(hub, "TRIES", 2)
    yield fake
    fake.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) in (["cwd"], ["cwd", "hf"])
    assert not list((tmp_path / "cwd").iterdir())


@pytest.fixture
def refused(capsys):
    """refused(spec, pattern): the message of the HubError that loading spec ends in, checked
    to be one line that names the repo and matches pattern, and printed as one line by the
    command line's report_errors, which exits with status 2."""
    def refused(spec=REPO, pattern=""):
        with pytest.raises(HubError) as e:
            load(spec, device="cpu")
        message = str(e.value)
        assert len(message.splitlines()) == 1 and "\n" not in message, message
        assert message.startswith(REPO) and re.search(pattern, message), message
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop, report_errors():
            raise e.value
        assert stop.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
        return message
    return refused


def misbehave(fake, part, answer):
    """Requests whose path has `part` in it are answered by answer(h) (h: the request
    handler) from now on, the others as before."""
    usual = fake.answer
    fake.answer = lambda h: answer(h) if part in h.path else usual(h)


def raw(data):
    """An answer of these bytes, status line and headers included, then the connection
    closes (a body without a Content-Length ends there)."""
    def answer(h):
        with contextlib.suppress(OSError):
            h.wfile.write(data)
        h.close_connection = True
    return answer


def trickle(head, every=0.05, seconds=5):
    """An answer that sends `head`, then a byte every `every` seconds."""
    def answer(h):
        with contextlib.suppress(OSError):  # (the client hangs up)
            h.wfile.write(head)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                h.wfile.write(b" ")
                time.sleep(every)
        h.close_connection = True
    return answer


def listing(fake, change):
    """Serve the listing of main after change(info) has edited it; or change's own bytes."""
    def answer(h):
        info = {"id": REPO, "sha": MAIN,
                "siblings": [sibling(n, d) for n, d in fake.commits[MAIN].items()]}
        body = change(info)
        fake.send(h, 200, body if isinstance(body, bytes) else json.dumps(info).encode())
    misbehave(fake, "/api/", answer)


def find(info, name):
    return next(s for s in info["siblings"] if s["rfilename"] == name)


# ------------------------------------------------------------------------------ 1. deadlines
@pytest.mark.parametrize("head", [b"HTTP/1.0 200 OK\r\nContent-Length: 99999\r\n\r\n",
                                  b"HTTP/1.0 200 OK\r\nX-Slow: "])  # the body, the headers
def test_a_listing_that_trickles_in_is_cut_off(server, refused, monkeypatch, capsys, head):
    monkeypatch.setattr(http_get, "JSON_DEADLINE", 0.3)
    usual = server.answer
    misbehave(server, "/api/", trickle(head))
    began = time.monotonic()
    refused(pattern=r"@main: not in the cache .* cannot be reached \(no whole answer within "
                    r"0\.3 s\)")
    assert time.monotonic() - began < 2
    server.answer = usual
    folder = hub.snapshot(REPO)  # once in the cache, a Hub too slow to answer is not needed
    misbehave(server, "/api/", trickle(head))
    assert hub.snapshot(REPO) == folder
    assert "no whole answer within 0.3 s" in capsys.readouterr().err


def test_a_file_that_trickles_in_is_cut_off(server, refused, monkeypatch):
    monkeypatch.setattr(http_get, "FILE_DEADLINE", 0.3)
    monkeypatch.setattr(http_get, "MIN_RATE", 1e12)  # (no time for the size)
    misbehave(server, "model.safetensors", trickle(b"HTTP/1.0 200 OK\r\n\r\n"))
    began = time.monotonic()
    refused(pattern=r": downloading model.safetensors failed 2 times \(no whole answer within "
                    r"0\.3 s\); run again")
    assert time.monotonic() - began < 3


def test_the_deadline_of_a_file_grows_with_its_size(server, checkpoint, monkeypatch):
    """A file that comes slowly, but at MIN_RATE or faster, is not cut off."""
    data = folder_files(checkpoint)["model.safetensors"]
    monkeypatch.setattr(http_get, "FILE_DEADLINE", 0.1)
    monkeypatch.setattr(http_get, "MIN_RATE", len(data) / 2)  # 2.1 s for this file

    def slowly(h):  # 0.4 s in all
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        for i in range(4):
            time.sleep(0.1)
            h.wfile.write(data[i * len(data) // 4:(i + 1) * len(data) // 4])
    misbehave(server, "model.safetensors", slowly)
    assert (hub.snapshot(REPO)[0] / "model.safetensors").read_bytes() == data


# ------------------------------------------------------------------------------ 2. the size
@pytest.mark.parametrize("announced", [True, False])
def test_no_more_than_the_listed_size_is_written(server, checkpoint, refused, tmp_path,
                                                 announced):
    """40 MiB for a file the listing gives a few KiB: refused (with its Content-Length at
    once), and nothing kept."""
    data = folder_files(checkpoint)["model.safetensors"]
    length = f"Content-Length: {40 << 20}\r\n".encode() if announced else b""
    misbehave(server, "model.safetensors",
              raw(b"HTTP/1.0 200 OK\r\n" + length + b"\r\n" + data + bytes(40 << 20)))
    refused(pattern=f": model.safetensors: the server sends more than the {len(data)} bytes "
                    f"the file has; the download was deleted")
    assert not list(snapshot_dir(tmp_path).glob("model.safetensors*"))


# ------------------------------------------------------------------------------ 3. verifying
@pytest.mark.parametrize("drop", [("size", "blobId"), ("blobId",), ("size",)])
def test_a_file_without_a_size_and_a_hash_is_refused(server, refused, drop):
    listing(server, lambda info: [find(info, "config.json").pop(k) for k in drop])
    refused(pattern=r": config.json cannot be verified: the Hub's list of files gives no size "
                    r"or no hash")
    assert not server.resolves()


def test_a_size_too_large_to_be_true_is_only_a_size(server, refused):
    listing(server, lambda info: find(info, "config.json").__setitem__("size", 10 ** 30))
    refused(pattern=r": downloading config.json failed 2 times \(the connection closed after "
                    r"\d+ of 10{30} bytes\)")


def test_a_cached_file_of_another_size_is_downloaded_again(server, checkpoint, tmp_path):
    snap = snapshot_dir(tmp_path)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    same_model(REPO, checkpoint)
    assert (snap / "config.json").read_bytes() == (checkpoint / "config.json").read_bytes()


def test_a_cache_that_cannot_be_written_is_a_one_line_error(server, refused, tmp_path):
    (tmp_path / "hf").write_text("")  # $HF_HOME is a file
    refused(pattern=r"@main: the cache cannot be used \(\[Errno 20\] Not a directory: ")


# ------------------------------------------------------------------------------ 4. the caps
@pytest.mark.parametrize("announced", [True, False])
def test_a_json_answer_is_capped(server, refused, monkeypatch, announced):
    monkeypatch.setattr(http_get, "MAX_JSON", 4096)
    body = b'{"sha": "' + MAIN.encode() + b'", "siblings": []' + b" " * 5000 + b"}"
    length = f"Content-Length: {len(body)}\r\n".encode() if announced else b""
    misbehave(server, "/api/", raw(b"HTTP/1.0 200 OK\r\n" + length + b"\r\n" + body))
    refused(pattern=r"@main: the server's answer is larger than 4096 bytes$")


def test_the_number_of_files_is_capped(server, refused, monkeypatch):
    monkeypatch.setattr(hub, "MAX_FILES", 3)
    refused(pattern=r"@main: the Hub lists \d+ files, more than 3$")


def test_json_nested_200000_deep_is_refused(server, refused):
    listing(server, lambda info: b'{"siblings": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    refused(pattern=r"@main: the server's JSON is nested too deep$")


# ------------------------------------------------------------------------------ 5. revisions
def test_revisions_git_refuses_are_refused():
    for good in ("main", "v1.0", "refs/pr/1", "a" * 40, "feature/x-y_z", "caf\u00e9"):
        assert hub.parse(f"{REPO}@{good}") == (REPO, good), good
    for bad in ("", ".", "..", "a/../b", "a..b", ".hidden", "a/.b", "x.lock", "a.lock/b",
                "a@{1}", "@", "a b", "a\tb", "a\nb", "a\x00b", "a\x7fb", "a~1", "a^", "a:b",
                "a?", "a*", "a[b", "a\\b", "/a", "a/", "a.", "a//b", "a\u2028b"):
        assert hub.parse(f"{REPO}@{bad}") is None, bad


def test_a_dot_revision_is_refused_and_main_still_works(server, checkpoint, tmp_path):
    with pytest.raises(CheckpointError):  # (not a Hub name, and no such local path)
        load(REPO + "@.", device="cpu")
    assert not server.requests and not (tmp_path / "hf").exists()
    same_model(REPO, checkpoint)
    assert (snapshot_dir(tmp_path).parents[1] / "refs" / "main").read_text() == MAIN


# ------------------------------------------------------------------------------ 6. malformed
def set_in(name, key, value):
    return lambda info: find(info, name).__setitem__(key, value)


@pytest.mark.parametrize("change,pattern", [
    (set_in("model.safetensors", "lfs", "yes"), r"lfs is 'yes', not an object"),
    (set_in("config.json", "size", "109512"), r"size is '109512', not a number of bytes"),
    (set_in("config.json", "size", -1), r"size is -1, not"),
    (set_in("config.json", "size", True), r"size is True, not"),
    (set_in("config.json", "size", 1.5), r"size is 1.5, not"),
    (set_in("config.json", "rfilename", 5), r"rfilename is 5, not a file name"),
    (set_in("config.json", "rfilename", "con\x00fig.json"), r"rfilename is 'con\\x00fig"),
    (set_in("config.json", "rfilename", "con\nfig.json"), r"rfilename is 'con\\nfig"),
    (set_in("config.json", "rfilename", ""), r"rfilename is '', not"),
    (set_in("config.json", "blobId", 7), r"blobId is 7, not 40 hex digits"),
    (set_in("config.json", "blobId", "xyz"), r"blobId is 'xyz', not 40 hex digits"),
    (lambda info: find(info, "model.safetensors")["lfs"].__setitem__("sha256", "0" * 63),
     r"lfs.sha256 is '0{63}', not 64 hex digits"),
    (lambda info: find(info, "model.safetensors")["lfs"].__setitem__("size", "9"),
     r"lfs.size is '9', not"),
    (lambda info: info["siblings"].append("config.json"), r"the entry is 'config.json', not an"),
    (lambda info: info["siblings"].append(dict(info["siblings"][0])), r"is listed twice"),
    (lambda info: info.__setitem__("siblings", {"a": 1}), r"something other than the Hub's"),
    (lambda info: b"[1, 2]", r"something other than the Hub's model information"),
    (lambda info: b"not json", r"the server's answer is not JSON"),
    (lambda info: info.__setitem__("sha", 5), r"the Hub's commit id 5 is not 40 hex digits"),
    (lambda info: info.__setitem__("sha", "g" * 40), r"commit id 'g{40}' is not"),
])
def test_a_malformed_listing_is_a_one_line_error(server, refused, change, pattern):
    listing(server, change)
    refused(pattern=pattern)
    assert not server.resolves()


@pytest.mark.parametrize("shard,pattern", [
    ("model\x00.safetensors", r"'model\\x00.safetensors' is not a file of the model's folder"),
    ("../outside.safetensors", r"'../outside.safetensors' is not a file of the model's"),
    (5, r": 5 is not a file of the model's folder"),
])
def test_a_bad_shard_name_is_a_one_line_error(server, checkpoint, refused, shard, pattern):
    files = {k: v for k, v in folder_files(checkpoint).items() if k != "model.safetensors"}
    files["model.safetensors.index.json"] = json.dumps({"weight_map": {"w": shard}}).encode()
    if isinstance(shard, str) and "\x00" not in shard:
        files[shard] = b"listed too"
    server.commits[MAIN] = files
    refused(pattern=pattern)


def test_an_index_nested_too_deep_is_a_one_line_error(server, checkpoint, refused):
    files = {k: v for k, v in folder_files(checkpoint).items() if k != "model.safetensors"}
    files["model.safetensors.index.json"] = b"[" * 200_000 + b"]" * 200_000
    server.commits[MAIN] = files
    refused(pattern=r"@main: its model.safetensors.index.json is not JSON with a weight_map")


# ------------------------------------------------------------------------------ 7. bad HTTP
def test_a_redirect_loop_is_one_line_on_the_command_line(server, capsys):
    misbehave(server, "model.safetensors",
              lambda h: server.send(h, 302, b"", {"Location": server.url + h.path}))
    with pytest.raises(SystemExit) as stop:
        generate.main(["--prompt", "hi", "--checkpoint", REPO, "--device", "cpu"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {REPO}: model.safetensors: HTTP 302 from {server.url} (a redirect loop, or "
        f"more than {http_get.MAX_REDIRECTS} redirects)\n")


@pytest.mark.parametrize("answer,pattern", [
    (lambda n: {"Location": f"/{REPO}/resolve/{MAIN}/model.safetensors?{n}"},
     r"HTTP 302 .*\(a redirect loop, or more than 10 redirects\)$"),
    (lambda n: {"Location": "ftp://127.0.0.1/model.safetensors"},
     r"HTTP 302 redirects to 'ftp://127.0.0.1/model.safetensors', not a usable http or https"),
    (lambda n: {"Location": "http://127.0.0.1:99999/x"}, r"to 'http://127.0.0.1:99999/x', not a"),
    (lambda n: {"Location": "file:///etc/passwd"}, r"to 'file:///etc/passwd', not a usable"),
    (lambda n: {}, r"HTTP 302 .*\(a redirect that cannot be followed\)$"),
])
def test_a_bad_redirect_is_a_one_line_error(server, refused, answer, pattern):
    count = iter(range(1000))
    misbehave(server, "model.safetensors",
              lambda h: server.send(h, 302, b"", answer(next(count))))
    refused(pattern=r": model.safetensors: .*" + pattern)


@pytest.mark.parametrize("answer,pattern", [  # (\r\n and a space: a header on two lines)
    (lambda h, fake: fake.send(h, 404, b"", {"X-Error-Message": "Not\r\n Found"}),
     r"@main: HTTP 404 from .* \(Not Found\); no such model"),
    (lambda h, fake: fake.send(h, 403, b"", {"X-Error-Message": "x" * 10_000}),
     r"@main: HTTP 403 from .* \(x{197}\.\.\.\); HF_TOKEN has no access"),
    (lambda h, fake: fake.send(h, 503, b"", {"X-Error-Message": "down\r\n for a while"}),
     r"cannot be reached \(HTTP 503 from .* \(down for a while\)\)"),
    (lambda h, fake: raw(b"HTTP/1.1 2x0 OK\r\nA: b\r\n\r\n")(h),
     r"cannot be reached \(BadStatusLine: HTTP/1.1 2x0 OK\)"),
    (lambda h, fake: raw(b"HTTP/1.0 200 OK\r\nA: " + b"b" * 70_000 + b"\r\n\r\n")(h),
     r"cannot be reached \(LineTooLong: got more than 65536 bytes"),
    (lambda h, fake: raw(b'HTTP/1.0 200 OK\r\nContent-Length: 500\r\n\r\n{"sha"')(h),
     r"cannot be reached \(the connection closed after 6 of 500 bytes\)"),
])
def test_bad_http_is_a_one_line_error(server, refused, answer, pattern):
    misbehave(server, "/api/", lambda h: answer(h, server))
    refused(pattern=pattern)


# ------------------------------------------------------------------------------ 8. the token
@pytest.mark.parametrize("newurl,keeps", [
    ("https://hub.example/b", True), ("https://HUB.example:443/b", True),
    ("http://hub.example/b", False), ("http://hub.example:443/b", False),
    ("https://hub.example:8443/b", False), ("https://cdn.example/b", False)])
def test_the_token_goes_to_the_same_scheme_host_and_port_only(newurl, keeps):
    request = urllib.request.Request("https://hub.example/a",
                                     headers={"Authorization": "Bearer hf_secret"})
    new = http_get.Redirects().redirect_request(request, io.BytesIO(), 302, "Found", {}, newurl)
    assert new.full_url == newurl and new.has_header("Authorization") == keeps


# ------------------------------------------------------- what reaches the loader from the Hub
def test_a_bad_revision_is_named_and_deep_json_is_one_line(tmp_path):
    """`ORG/NAME@.` is not looked up at all and its error says why; a config.json nested
    200,000 deep (served with a matching hash) is one line from the loader, not a
    RecursionError."""
    with pytest.raises(CheckpointError, match=r"'\.' is not a valid revision"):
        load(f"{REPO}@.", device="cpu")
    folder = write_tiny_checkpoint(tmp_path / "deep")
    (folder / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointError, match="nested too deeply") as e:
        load(folder, device="cpu")
    assert "\n" not in str(e.value)
