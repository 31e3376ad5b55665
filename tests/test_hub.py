"""Loading a model from the Hugging Face Hub by name (hub.py), offline: a local HTTP server in
a thread plays the Hub, with its URL layout, serving the tiny checkpoint
(tests/tiny_checkpoint.py):
  /api/models/ORG/NAME/revision/REV   the commit and the files, with sizes and hashes
  /ORG/NAME/resolve/REV/FILE          a file (from byte N with `Range: bytes=N-`)
HF_HOME (the cache) and HF_ENDPOINT (the server) are set per test."""
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from loaders import hub
from loaders.checkpoint import load
from loaders.hub import HubError
from loaders.safetensors_file import read_safetensors, write_safetensors
from tiny_checkpoint import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REPO = "test-org/tiny"
MAIN, V2 = "a" * 40, "b" * 40  # the commits of the branches main and v2


def sibling(name, data):
    """The API's entry for a file: *.safetensors as Git LFS files (their sha256), the rest
    as plain git blobs (git's sha1 of the blob)."""
    entry = {"rfilename": name, "size": len(data),
             "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
    if name.endswith(".safetensors"):
        entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                        "pointerSize": 134}
    return entry


class FakeHub:
    """The Hub for one repo: {branch: commit}, {commit: {file: bytes}}. It records every
    request (path, headers); it can require a token, cut a file's first download off
    halfway (`drop`) and serve a file with one byte changed (`corrupt`)."""

    def __init__(self, commits, refs):
        self.commits, self.refs, self.requests = commits, refs, []
        self.token, self.drop, self.corrupt, self.redirect = None, set(), set(), False
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                fake.requests.append((self.path, dict(self.headers)))
                fake.answer(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def answer(self, h):
        cdn = h.path.startswith("/cdn/")  # the storage server large files may redirect to
        if self.token and not cdn and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self.send(h, 401, b"", {"X-Error-Message": "Access to this model is restricted"})
        api, resolve = f"/api/models/{REPO}/revision/", f"/{REPO}/resolve/"
        if h.path.startswith(api):
            rev = h.path[len(api):].split("?")[0]
            commit = self.refs.get(rev, rev)
            if commit not in self.commits:
                return self.send(h, 404, b"", {"X-Error-Message": "Revision Not Found"})
            siblings = [sibling(n, d) for n, d in self.commits[commit].items()]
            return self.send(h, 200, json.dumps({"id": REPO, "sha": commit,
                                                 "siblings": siblings}).encode())
        if not (cdn or h.path.startswith(resolve)):
            return self.send(h, 404, b"", {"X-Error-Message": "Repository Not Found"})
        rev, name = h.path[len("/cdn/" if cdn else resolve):].split("/", 1)
        if self.redirect and not cdn and name.endswith(".safetensors"):  # another host name
            cdn_url = self.url.replace("127.0.0.1", "localhost") + f"/cdn/{rev}/{name}"
            return self.send(h, 302, b"", {"Location": cdn_url})
        data = self.commits.get(self.refs.get(rev, rev), {}).get(name)
        if data is None:
            return self.send(h, 404, b"")
        if name in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        start = int(h.headers.get("Range", "bytes=0-")[6:-1])
        code, headers = 200, {}
        if start:
            code, headers = 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        if name in self.drop:  # announce the whole file, send half, hang up
            self.drop.discard(name)
            h.send_response(code)
            h.send_header("Content-Length", str(len(data) - start))
            h.end_headers()
            h.wfile.write(data[start:start + (len(data) - start) // 2])
            h.close_connection = True
            return
        self.send(h, code, data[start:], headers)

    @staticmethod
    def send(h, code, body, headers=()):
        h.send_response(code)
        for k, v in dict(headers).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def resolves(self, name=None):
        """The file requests made so far ((path, headers)), or those of one file."""
        return [(p, hd) for p, hd in self.requests if ("/resolve/" in p or "/cdn/" in p)
                and (name is None or p.endswith("/" + name))]


def folder_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny checkpoint as the branch main (seed 0) and as the branch v2 (seed 1)."""
    base = tmp_path_factory.mktemp("hub")
    return write_tiny_checkpoint(base / "main", seed=0), write_tiny_checkpoint(base / "v2", seed=1)


@pytest.fixture
def fake(folders, tmp_path, monkeypatch):
    fake = FakeHub({MAIN: folder_files(folders[0]), V2: folder_files(folders[1])},
                   {"main": MAIN, "v2": V2})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # conftest sets it for transformers
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield fake
    fake.stop()


def logits(model):
    with torch.no_grad():
        return model(torch.tensor([[5, 17, 200, 3, 42]]))[0]


def same_model(spec, folder):
    """Loading `spec` gives exactly the model of the local folder."""
    ours, ref = load(spec, device="cpu", dtype=torch.float32)[0], load(folder, device="cpu",
                                                                       dtype=torch.float32)[0]
    assert torch.equal(logits(ours), logits(ref))
    return ours


def snapshot_dir(tmp_path, commit=MAIN):
    return tmp_path / "hf" / "hub" / "models--test-org--tiny" / "snapshots" / commit


def test_names():
    assert hub.parse("ORG/NAME") == ("ORG/NAME", "main")
    assert hub.parse("HuggingFaceTB/SmolLM2-135M-Instruct@v1.0") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "v1.0")
    assert hub.parse("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for not_a_name in ("model.gguf", "/abs/path", "./a/b", "a/b/c", "a/b@", "a/..", "a/b@../x"):
        assert hub.parse(not_a_name) is None, not_a_name


def test_download_then_load_equals_the_local_folder(fake, folders, tmp_path):
    model = same_model(REPO, folders[0])
    assert model.name == "tiny@aaaaaaa"
    snap = snapshot_dir(tmp_path)
    assert sorted(p.name for p in snap.iterdir()) == sorted(folder_files(folders[0]))
    assert (snap.parents[1] / "refs" / "main").read_text() == MAIN
    assert all(f"/resolve/{MAIN}/" in p for p, _ in fake.resolves())  # by commit, not branch
    n = len(fake.resolves())
    load(REPO, device="cpu")  # a second time: nothing is downloaded again
    assert len(fake.resolves()) == n


def test_sharded_weights(fake, folders, tmp_path):
    tensors = read_safetensors(folders[0] / "model.safetensors")[0]
    names = sorted(tensors)
    files = {k: v for k, v in folder_files(folders[0]).items() if k != "model.safetensors"}
    weight_map = {}
    for i, part in enumerate((names[:5], names[5:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        write_safetensors(tmp_path / shard, {n: tensors[n] for n in part})
        files[shard] = (tmp_path / shard).read_bytes()
        weight_map |= dict.fromkeys(part, shard)
    files["model.safetensors.index.json"] = json.dumps({"metadata": {},
                                                        "weight_map": weight_map}).encode()
    fake.commits[MAIN] = files
    same_model(REPO, folders[0])
    assert len(fake.resolves("model-00001-of-00002.safetensors")) == 1
    assert len(fake.resolves("model-00002-of-00002.safetensors")) == 1
    assert not fake.resolves("model.safetensors")


def test_token_is_sent(fake, folders, monkeypatch):
    fake.token = "hf_secret"
    with pytest.raises(HubError, match="HTTP 401.*set HF_TOKEN") as e:
        load(REPO, device="cpu")
    assert "\n" not in str(e.value) and REPO in str(e.value)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    same_model(REPO, folders[0])
    assert all(h.get("Authorization") == "Bearer hf_secret" for _, h in fake.requests[1:])


def test_the_token_is_not_sent_to_another_host(fake, folders, monkeypatch):
    """The weights redirect to a storage server (another host): it gets no token."""
    fake.token, fake.redirect = "hf_secret", True
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    same_model(REPO, folders[0])
    [(path, headers)] = [r for r in fake.requests if r[0].startswith("/cdn/")]
    assert path == f"/cdn/{MAIN}/model.safetensors" and "Authorization" not in headers
    assert all("Authorization" in h for p, h in fake.requests if not p.startswith("/cdn/"))


def test_resume_after_the_connection_drops(fake, folders, tmp_path):
    fake.drop.add("model.safetensors")
    same_model(REPO, folders[0])
    first, second = fake.resolves("model.safetensors")
    half = len(folder_files(folders[0])["model.safetensors"]) // 2
    assert "Range" not in first[1] and second[1]["Range"] == f"bytes={half}-"
    assert not list(snapshot_dir(tmp_path).glob("*.incomplete"))


def test_resume_a_partial_file(fake, folders, tmp_path):
    data = folder_files(folders[0])["model.safetensors"]
    snap = snapshot_dir(tmp_path)
    snap.mkdir(parents=True)
    (snap / "model.safetensors.incomplete").write_bytes(data[:1000])  # an earlier run's part
    same_model(REPO, folders[0])
    [(_, headers)] = fake.resolves("model.safetensors")
    assert headers["Range"] == "bytes=1000-"
    assert (snap / "model.safetensors").read_bytes() == data


@pytest.mark.parametrize("name,hash_name", [("model.safetensors", "sha256"),
                                            ("config.json", "git blob id")])
def test_a_corrupt_download_is_an_error_and_is_not_kept(fake, tmp_path, name, hash_name):
    fake.corrupt.add(name)
    with pytest.raises(HubError, match=f"{REPO}: the download of {name} is corrupt "
                                       f"\\({hash_name}") as e:
        load(REPO, device="cpu")
    assert "\n" not in str(e.value)
    assert not (snapshot_dir(tmp_path) / name).exists()
    assert not (snapshot_dir(tmp_path) / (name + ".incomplete")).exists()
    assert not (snapshot_dir(tmp_path).parents[1] / "refs" / "main").exists()


def test_offline_uses_the_cache(fake, folders, monkeypatch, capsys):
    load(REPO, device="cpu")
    n = len(fake.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    same_model(REPO, folders[0])
    assert len(fake.requests) == n  # not one request
    monkeypatch.delenv("HF_HUB_OFFLINE")
    fake.stop()  # the Hub is unreachable: the cached copy, with a note
    same_model(REPO, folders[0])
    assert "cannot be reached" in capsys.readouterr().err


def test_offline_without_the_cache_is_a_one_line_error(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match=f"{REPO}@main: not in the cache .*HF_HUB_OFFLINE"):
        load(REPO, device="cpu")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    fake.stop()
    with pytest.raises(HubError, match=f"{REPO}@v2: not in the cache .*cannot be reached"):
        load(REPO + "@v2", device="cpu")
    assert not fake.requests
    # on the command line: one line on stderr, exit status 2
    run = subprocess.run([sys.executable, "generate.py", "--prompt", "hi", "--checkpoint",
                          REPO], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith(f"error: {REPO}@main: ")


def test_a_revision_selects_its_commit(fake, folders, tmp_path):
    model = same_model(REPO + "@v2", folders[1])
    assert model.name == "tiny@bbbbbbb"
    assert (snapshot_dir(tmp_path, V2).parents[1] / "refs" / "v2").read_text() == V2
    assert not snapshot_dir(tmp_path, MAIN).exists()
    assert not torch.equal(logits(model), logits(load(REPO, device="cpu",
                                                      dtype=torch.float32)[0]))
    same_model(f"{REPO}@{MAIN}", folders[0])  # a commit is a revision too
    with pytest.raises(HubError, match=f"{REPO}@v3: HTTP 404 .*Revision Not Found"):
        load(REPO + "@v3", device="cpu")


def test_a_local_folder_comes_first(fake, folders, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tiny_checkpoint(tmp_path / "test-org" / "tiny", seed=1)
    same_model(REPO, folders[1])  # the folder test-org/tiny, not the Hub's model
    assert not fake.requests
