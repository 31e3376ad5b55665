"""Models from the Hugging Face Hub by name, with the standard library only (no huggingface_hub).

`python train.py --checkpoint ORG/NAME[@REVISION]` (REVISION: a branch, tag or commit; default
`main`, and a name git's check-ref-format allows): checkpoint.load() asks snapshot() for a
local folder holding the model's files, then reads it as any Hugging Face folder.

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

Nothing the server says is taken on trust: the listing must have the form above (at most
MAX_FILES files, sizes whole numbers, hashes hex of the right length, names one printable
line), every file read needs a size and a hash in it, and a download must match both. The
requests themselves (http_get.py) have deadlines and size caps, and send the token to the
Hub's own address only. Every failure is a HubError of one line, naming the repo.

The cache, under $HF_HOME/hub (default ~/.cache/huggingface/hub), has the Hub's own layout,
which huggingface_hub reads too (files are stored as plain files, not links into blobs/):
  models--ORG--NAME/refs/REVISION                   the commit REVISION pointed to last time
  models--ORG--NAME/snapshots/COMMIT/FILE           a file, downloaded and verified
  models--ORG--NAME/snapshots/COMMIT/FILE.incomplete  a download under way, resumed next time
With $HF_HUB_OFFLINE=1, or when the Hub cannot be reached, a cached snapshot is used as it is.
"""
import hashlib
import json
import os
import re
import reprlib
import sys
import urllib.parse
from pathlib import Path
from typing import NamedTuple

from loaders import http_get
from loaders.http_get import Refused, Unreachable, clean

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+", re.ASCII)  # ORG/NAME
# What git's check-ref-format refuses in a branch or tag name, as the Hub does: control
# characters, space, ~^:?*[\, "..", "@{", "//", a "/" or "." at the end, a "/" at the start,
# a part that starts with "." or ends with ".lock", and "@" alone. (A revision also names a
# file under refs/ in the cache: these rules keep it inside, and off refs/ itself, which
# "@." once made a file, breaking every revision after it.)
BAD_REVISION = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|^/|[/.]$|(^|/)\.|"
                          r"\.lock(/|$)|^@$")
COMMIT = re.compile(r"[0-9a-f]{40}")
BLOB_ID, SHA256 = COMMIT, re.compile(r"[0-9a-f]{64}")
INDEX = "model.safetensors.index.json"
TRIES = 3               # attempts per file; each one resumes where the last stopped
MAX_FILES = 100_000     # files in a listing
SHORT = reprlib.Repr()  # (how values from the server are shown in messages)
SHORT.maxstring = SHORT.maxother = 80


class HubError(Exception):
    """A model that cannot be had from the Hub or the cache; the message names the repo and
    says what to do."""


def parse(spec):
    """'ORG/NAME[@REVISION]' -> ('ORG/NAME', REVISION or 'main'); None if it is not one."""
    repo, at, revision = spec.partition("@")
    if not REPO_ID.fullmatch(repo) or ".." in repo:
        return None
    if at and (not revision or BAD_REVISION.search(revision) or not revision.isprintable()):
        return None
    return repo, revision or "main"


def endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def cache_folder(repo):
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home).expanduser() / "hub" / ("models--" + repo.replace("/", "--"))


def offline():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def short(value):
    """A value from the server, as a short one-line repr for a message."""
    return clean(SHORT.repr(value), 100)


def snapshot(spec):
    """(folder, name) for ORG/NAME[@REVISION]: the cached folder of the files checkpoint.load
    reads, downloaded first if they are not there yet; name ('NAME@<commit>') names the
    model's cached vectors and runs."""
    repo, revision = parse(spec)
    try:
        return snapshot_of(repo, revision)
    except Refused as e:  # (its message names the request, and so the repo)
        refusal = e.code is not None and 400 <= e.code < 500
        raise HubError(f"{e}; {hint(e.code)}" if refusal else str(e)) from None
    except OSError as e:  # (the network's are handled below: these are the file system's)
        raise HubError(f"{repo}@{revision}: the cache cannot be used ({clean(e)})") from None


def hint(code):
    """What to do about an HTTP 4xx from the Hub."""
    return {401: "HF_TOKEN was refused" if os.environ.get("HF_TOKEN") else
                 "a gated or private model needs a token: set HF_TOKEN",
            403: "HF_TOKEN has no access: accept the model's terms on its page",
            404: "no such model, revision or file (nor a local file or folder)",
            }.get(code, "the request was refused")


def snapshot_of(repo, revision):
    """snapshot(), where the Hub's refusals and the file system's errors may escape."""
    folder = cache_folder(repo)
    if offline():
        return cached(repo, revision, folder, "HF_HUB_OFFLINE is set")
    # 1. Ask the Hub which commit the revision is, and what files that commit holds.
    try:
        commit, files = list_files(repo, revision)
    except Unreachable as e:  # no network, the Hub is down, or too slow
        why = f"{endpoint()} cannot be reached ({e})"
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
    if INDEX in files:  # sharded: the index names the shards
        if (files[INDEX].size or 0) > http_get.MAX_JSON:  # (it is read whole, as JSON)
            raise HubError(f"{repo}@{revision}: its {INDEX} of {files[INDEX].size} bytes is "
                           f"larger than the {http_get.MAX_JSON} bytes allowed")
        shard_names = shards(fetch(repo, commit, snap, INDEX, files))
        if shard_names is None:
            raise HubError(f"{repo}@{revision}: its {INDEX} is not JSON with a weight_map "
                           f"(tensor name -> file name) in it")
        names += shard_names
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
    index = snap / INDEX
    if not index.is_file():
        return (snap / "model.safetensors").is_file()
    names = shards(index)  # (a bad index: the loader says what is wrong)
    return names is None or all(isinstance(s, str) and (snap / s).is_file() for s in names)


def shards(index):
    """The shard files a model.safetensors.index.json names (its weight_map: tensor name ->
    file name); None if it has none."""
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()), key=str)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


# ------------------------------------------------------------------------------ the listing
class Entry(NamedTuple):
    """What the listing says of a file, to check the download against."""
    size: int | None
    sha256: str | None    # a Git LFS file's
    blob_id: str | None   # a plain git blob's


def list_files(repo, revision):
    """(commit, {file name: Entry}) from the Hub's API, whose answer is checked strictly."""
    what = f"{repo}@{revision}"
    info = http_get.get_json(f"{endpoint()}/api/models/{urllib.parse.quote(repo)}/revision/"
                             f"{urllib.parse.quote(revision, safe='')}?blobs=true", what)
    if not isinstance(info, dict) or not isinstance(info.get("siblings"), list):
        raise HubError(f"{what}: {endpoint()} answered with something other than the Hub's "
                       f"model information")
    commit, siblings = info.get("sha"), info["siblings"]
    if not isinstance(commit, str) or not COMMIT.fullmatch(commit):
        raise HubError(f"{what}: the Hub's commit id {short(commit)} is not 40 hex digits")
    if len(siblings) > MAX_FILES:
        raise HubError(f"{what}: the Hub lists {len(siblings)} files, more than {MAX_FILES}")
    files = {}
    for i, sibling in enumerate(siblings, 1):
        try:
            name, listed = entry(sibling)
            if name in files:
                raise ValueError(f"{short(name)} is listed twice")
        except ValueError as e:
            raise HubError(f"{what}: the Hub's list of files is malformed (file {i}: {e})"
                           ) from None
        files[name] = listed
    return commit, files


def entry(sibling):
    """(name, Entry) of one of the listing's "siblings"; a ValueError says what is wrong."""
    def need(ok, key, value, kind):
        if not ok:
            raise ValueError(f"{key} is {short(value)}, not {kind}")

    def is_size(value):
        return type(value) is int and value >= 0  # (not True, nor 1.5, nor "704")

    need(isinstance(sibling, dict), "the entry", sibling, "an object")
    name, size, blob_id, lfs = (sibling.get(k) for k in ("rfilename", "size", "blobId", "lfs"))
    need(isinstance(name, str) and name and name.isprintable(), "rfilename", name,
         "a file name (one printable line)")
    need(size is None or is_size(size), "size", size, "a number of bytes")
    need(blob_id is None or isinstance(blob_id, str) and BLOB_ID.fullmatch(blob_id), "blobId",
         blob_id, "40 hex digits")
    if lfs is None:
        return name, Entry(size, None, blob_id)
    need(isinstance(lfs, dict), "lfs", lfs, "an object")
    size, sha256 = lfs.get("size", size), lfs.get("sha256")
    need(is_size(size), "lfs.size", size, "a number of bytes")
    need(isinstance(sha256, str) and SHA256.fullmatch(sha256), "lfs.sha256", sha256,
         "64 hex digits")
    return name, Entry(size, sha256, None)  # (blobId is then git's id of the LFS pointer)


# ------------------------------------------------------------------------------ the files
def fetch(repo, commit, snap, name, files):
    """snap/name, downloaded unless it is there already, and verified."""
    listed = files.get(name) if isinstance(name, str) else None  # (a shard's name comes from
    if listed is None or Path(name).name != name or name in (".", ".."):  # the index: check it)
        raise HubError(f"{repo}: {short(name)} is not a file of the model's folder on the Hub")
    if listed.size is None or not (listed.sha256 or listed.blob_id):
        raise HubError(f"{repo}: {name} cannot be verified: the Hub's list of files gives no "
                       f"size or no hash (lfs.sha256 or blobId) for it")
    path = snap / name
    if path.is_file() and path.stat().st_size == listed.size:
        return path  # downloaded and verified before
    partial = snap / (name + ".incomplete")
    url = f"{endpoint()}/{urllib.parse.quote(repo)}/resolve/{commit}/{urllib.parse.quote(name)}"
    for attempt in range(1, TRIES + 1):
        try:
            http_get.download(url, partial, listed.size, f"{repo}: {name}")
            break
        except OSError as e:  # Unreachable, or the file system
            if attempt == TRIES:
                raise HubError(f"{repo}: downloading {name} failed {TRIES} times ({clean(e)}); "
                               f"run again to resume from {partial}") from None
    verify(partial, listed, repo, name)
    partial.replace(path)  # whole and verified: only now under its own name
    return path


def verify(partial, listed, repo, name):
    """Check a download against the size and hash the Hub publishes; delete it if wrong."""
    n, problem = partial.stat().st_size, None
    with open(partial, "rb") as f:  # (hashed a chunk at a time by file_digest)
        if n != listed.size:
            problem = f"{n} bytes, the Hub says {listed.size}"
        elif listed.sha256 and (got := hashlib.file_digest(f, "sha256").hexdigest()
                               ) != listed.sha256:
            problem = f"sha256 {got[:16]}..., the Hub says {listed.sha256[:16]}..."
        elif listed.blob_id and (got := hashlib.file_digest(
                f, lambda: hashlib.sha1(b"blob %d\0" % n)).hexdigest()) != listed.blob_id:
            problem = f"git blob id {got[:16]}..., the Hub says {listed.blob_id[:16]}..."
    if problem:
        partial.unlink()
        raise HubError(f"{repo}: the download of {name} is corrupt ({problem}); it was "
                       f"deleted: run again to download it again")
