"""Models from the Hugging Face Hub by name, with the standard library only (no huggingface_hub).

`python train.py --checkpoint ORG/NAME[@REVISION]` (REVISION: a branch, tag or commit; default
`main`): checkpoint.load() asks snapshot() for a local folder holding the model's files, then
reads it as any Hugging Face folder.

The Hub's URL layout (ENDPOINT is $HF_ENDPOINT, default https://huggingface.co):
  ENDPOINT/api/models/ORG/NAME/revision/REVISION?blobs=true
      JSON: "sha" is the commit REVISION points to now; "siblings" lists the commit's files:
        {"rfilename": "config.json", "size": 704, "blobId": "<git's id of the file>"}
        {"rfilename": "model.safetensors", "size": 269060552, "blobId": "...",
         "lfs": {"sha256": "<sha256 of the file>", "size": 269060552, "pointerSize": 135}}
      Large files are kept in Git LFS, and the Hub publishes their sha256; small files are
      plain git blobs, whose id is the sha1 of b"blob <size>\\0" + the file's bytes.
  ENDPOINT/ORG/NAME/resolve/COMMIT/FILE
      the file itself (a large one by a redirect to a storage server); a `Range: bytes=N-`
      header asks for the rest of a file from byte N on.
A gated or private model needs a token: $HF_TOKEN is sent as `Authorization: Bearer ...`.

The cache, under $HF_HOME/hub (default ~/.cache/huggingface/hub), has the Hub's own layout,
which huggingface_hub reads too (files are stored as plain files, not links into blobs/):
  models--ORG--NAME/refs/REVISION                   the commit REVISION pointed to last time
  models--ORG--NAME/snapshots/COMMIT/FILE           a file, downloaded and verified
  models--ORG--NAME/snapshots/COMMIT/FILE.incomplete  a download under way, resumed next time
With $HF_HUB_OFFLINE=1, or when the Hub cannot be reached, a cached snapshot is used as it is.
"""
import hashlib
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # ORG/NAME
COMMIT = re.compile(r"[0-9a-f]{40}")
CHUNK = 1 << 20         # bytes read at a time
BAR_FROM = 10 << 20     # a progress bar for files of 10 MiB and more
TIMEOUT = 30            # seconds without an answer before a request fails
TRIES = 3               # attempts per file; each one resumes where the last stopped


class HubError(Exception):
    """A model that cannot be had from the Hub or the cache; the message names the repo and
    says what to do."""


def parse(spec):
    """'ORG/NAME[@REVISION]' -> ('ORG/NAME', REVISION or 'main'); None if it is not one."""
    repo, at, revision = spec.partition("@")
    if (not REPO_ID.fullmatch(repo) or ".." in repo or (at and not revision)  # the revision
            or ".." in revision.split("/") or revision.startswith("/")):  # names a cache file
        return None
    return repo, revision or "main"


def endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def cache_folder(repo):
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home).expanduser() / "hub" / ("models--" + repo.replace("/", "--"))


def offline():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def snapshot(spec):
    """(folder, name) for ORG/NAME[@REVISION]: the cached folder of the files checkpoint.load
    reads, downloaded first if they are not there yet; name ('NAME@<commit>') names the
    model's cached vectors and runs."""
    repo, revision = parse(spec)
    folder = cache_folder(repo)
    if offline():
        return cached(repo, revision, folder, "HF_HUB_OFFLINE is set")
    # 1. Ask the Hub which commit the revision is, and what files that commit holds.
    try:
        commit, files = list_files(repo, revision)
    except (OSError, http.client.HTTPException) as e:  # no network, or the Hub is down
        why = f"{endpoint()} cannot be reached ({getattr(e, 'reason', e)})"
        snap, name = cached(repo, revision, folder, why)
        print(f"note: {why}; using the cached copy of {repo}@{revision}", file=sys.stderr)
        return snap, name
    # 2. Download what the loader reads (each file only once), into snapshots/COMMIT/.
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    if "config.json" not in files or "tokenizer.json" not in files:
        raise HubError(f"{repo}@{revision} has no config.json or tokenizer.json: only Hugging "
                       f"Face model folders (with safetensors weights) can be loaded")
    names = [n for n in ("config.json", "tokenizer.json", "tokenizer_config.json",
                         "chat_template.jinja") if n in files]  # (the last two if there)
    if "model.safetensors.index.json" in files:  # sharded: the index names the shards
        index = fetch(repo, commit, snap, "model.safetensors.index.json", files)
        names += shards(index) or []  # (a bad index: the loader says what is wrong)
    elif "model.safetensors" in files:
        names.append("model.safetensors")
    else:
        raise HubError(f"{repo}@{revision} has no model.safetensors (or its sharded index): "
                       f"only safetensors weights can be loaded")
    for name in names:
        fetch(repo, commit, snap, name, files)
    # 3. Remember the commit, for loading the same revision offline later.
    if revision != commit:
        ref = folder / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    return snap, f"{repo.split('/')[1]}@{commit[:7]}"


def cached(repo, revision, folder, why):
    """(folder, name) of the cached snapshot of repo@revision, if it is whole; else an error."""
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = folder / "snapshots" / commit
    if COMMIT.fullmatch(commit) and complete(snap):
        return snap, f"{repo.split('/')[1]}@{commit[:7]}"
    raise HubError(f"{repo}@{revision}: not in the cache ({folder}) and {why}; download it "
                   f"once with the network on and HF_HUB_OFFLINE unset (or give a local path)")


def complete(snap):
    """Whether a snapshot folder holds every file checkpoint.load reads."""
    if not all((snap / n).is_file() for n in ("config.json", "tokenizer.json")):
        return False
    index = snap / "model.safetensors.index.json"
    if not index.is_file():
        return (snap / "model.safetensors").is_file()
    names = shards(index)  # (a bad index: the loader says what is wrong)
    return names is None or all(isinstance(s, str) and (snap / s).is_file() for s in names)


def shards(index):
    """The shard files a model.safetensors.index.json names (its weight_map: tensor name ->
    file name); None if it has none."""
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()), key=str)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# ------------------------------------------------------------------------------ requests
class TokenStaysHome(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but send the token only to the host it was given for: a large file
    redirects to a storage server, which must not see it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        host = urllib.parse.urlsplit(req.full_url).netloc
        if new is not None and urllib.parse.urlsplit(newurl).netloc != host:
            new.remove_header("Authorization")
        return new


OPENER = urllib.request.build_opener(TokenStaysHome)


def get(url, what, start=0):
    """The response to GET url (from byte `start` on); refusals become HubErrors that say
    why, while network trouble and server errors (5xx) stay OSErrors."""
    headers = {"User-Agent": "steering-vector-distillation (urllib)"}
    if os.environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return OPENER.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code >= 500:
            raise
        hint = {401: "HF_TOKEN was refused" if os.environ.get("HF_TOKEN") else
                     "a gated or private model needs a token: set HF_TOKEN",
                403: "HF_TOKEN has no access: accept the model's terms on its page",
                404: "no such model, revision or file (nor a local file or folder)"}
        detail = e.headers.get("X-Error-Message") or e.reason
        raise HubError(f"{what}: HTTP {e.code} from {endpoint()} ({detail}); "
                       f"{hint.get(e.code, 'the request was refused')}") from None


def list_files(repo, revision):
    """(commit, {file name: its sibling entry}) from the Hub's API."""
    quoted = urllib.parse.quote(revision, safe="")
    with get(f"{endpoint()}/api/models/{repo}/revision/{quoted}?blobs=true",
             f"{repo}@{revision}") as r:
        body = r.read()
    try:
        info = json.loads(body)
        commit, siblings = info["sha"], info["siblings"]
        files = {s["rfilename"]: s for s in siblings}
    except (ValueError, KeyError, TypeError):
        raise HubError(f"{repo}@{revision}: {endpoint()} answered with something other than "
                       f"the Hub's model information") from None
    if not isinstance(commit, str) or not COMMIT.fullmatch(commit):
        raise HubError(f"{repo}@{revision}: the Hub's commit id {commit!r} is not 40 hex digits")
    return commit, files


def fetch(repo, commit, snap, name, files):
    """snap/name, downloaded unless it is there already, and verified."""
    entry = files.get(name)  # (a shard's name comes from the index: check it)
    if not isinstance(entry, dict) or Path(name).name != name or name in (".", ".."):
        raise HubError(f"{repo}: {name!r} is not a file of the model's folder on the Hub")
    lfs = entry.get("lfs") or {}
    size = lfs.get("size", entry.get("size"))
    path = snap / name
    if path.is_file() and (size is None or path.stat().st_size == size):
        return path  # downloaded and verified before
    partial = snap / (name + ".incomplete")
    url = f"{endpoint()}/{repo}/resolve/{commit}/{urllib.parse.quote(name)}"
    for attempt in range(1, TRIES + 1):
        try:
            receive(url, partial, size, f"{repo}: {name}")
            break
        except (OSError, http.client.HTTPException) as e:
            if attempt == TRIES:
                raise HubError(f"{repo}: downloading {name} failed {TRIES} times ({e}); run "
                               f"again to resume from {partial}") from None
    verify(partial, size, lfs.get("sha256"), None if lfs else entry.get("blobId"), repo, name)
    partial.replace(path)  # whole and verified: only now under its own name
    return path


def receive(url, partial, size, what):
    """Download url into `partial`, continuing what is there already (with a Range request)
    when the expected size is known; an error if the connection ends early."""
    start = partial.stat().st_size if partial.exists() else 0
    if size is None or start > size:
        start = 0  # without the size, a partial file cannot be checked: start over
    if size is not None and start == size:
        return  # whole already (verify() decides whether it is right)
    with get(url, what, start) as r:
        if start and not (r.status == 206 and  # the server may ignore Range: start over
                          r.headers.get("Content-Range", "").startswith(f"bytes {start}-")):
            start = 0
        length = r.headers.get("Content-Length", "")
        total = size if size is not None else (start + int(length) if length.isdigit() else None)
        with open(partial, "ab" if start else "wb") as f, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=partial.stem, disable=(total or 0) < BAR_FROM) as bar:
            while chunk := r.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    got = partial.stat().st_size
    if total is not None and got < total:
        raise ConnectionError(f"the connection closed after {got} of {total} bytes")


def verify(partial, size, sha256, blob_id, repo, name):
    """Check a download against the size and hash the Hub publishes; delete it if wrong."""
    n, problem = partial.stat().st_size, None
    with open(partial, "rb") as f:  # (hashed a chunk at a time by file_digest)
        if size is not None and n != size:
            problem = f"{n} bytes, the Hub says {size}"
        elif sha256 and (got := hashlib.file_digest(f, "sha256").hexdigest()) != sha256:
            problem = f"sha256 {got[:16]}..., the Hub says {sha256[:16]}..."
        elif blob_id and (got := hashlib.file_digest(
                f, lambda: hashlib.sha1(b"blob %d\0" % n)).hexdigest()) != blob_id:
            problem = f"git blob id {got[:16]}..., the Hub says {blob_id[:16]}..."
    if problem:
        partial.unlink()
        raise HubError(f"{repo}: the download of {name} is corrupt ({problem}); it was "
                       f"deleted: run again to download it again")
