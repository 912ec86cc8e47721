"""Pure parts of model delivery: filtering, manifests, per-host diffs, confinement of listed paths."""

from __future__ import annotations

import pytest

from cluster.delivery import manifest as d

SHA_A, SHA_B = "a" * 64, "b" * 64


def entry(path, size, sha256=None, oid=None, mtime=None):
    e = {"path": path, "size": size, "sha256": sha256, "oid": oid}
    if mtime is not None:
        e["mtime"] = mtime
    return e


def test_select_include_exclude_like_huggingface_hub():
    files = [entry(p, 1) for p in ("config.json", "model.safetensors", "consolidated.pth", "onnx/model.onnx",
                                   "tokenizer.json", "original/params.json")]
    paths = lambda fs: [f["path"] for f in fs]  # noqa: E731
    assert paths(d.select(files)) == sorted(f["path"] for f in files)
    assert paths(d.select(files, exclude=["*.pth", "onnx/"])) == ["config.json", "model.safetensors",
                                                                  "original/params.json", "tokenizer.json"]
    assert paths(d.select(files, include=["*.json"])) == ["config.json", "original/params.json", "tokenizer.json"]
    assert paths(d.select(files, include=["*.json"], exclude=["original/*"])) == ["config.json", "tokenizer.json"]
    assert d.select(files, include=["nothing*"]) == []




def test_sha256sum_parsing():
    out = f"{SHA_A}  config.json\n{SHA_B}  sub/a b.bin\n\\{SHA_A}  we\\nird\n"
    assert d.parse_sha256sum(out) == {"config.json": SHA_A, "sub/a b.bin": SHA_B}


def test_plan_host_missing_wrong_size_unvouched_and_trusted():
    expected = [entry("a", 10, SHA_A), entry("b", 20, SHA_B), entry("c", 5, oid="1" * 40), entry("d", 7, SHA_A)]
    scanned = {"a": (10, 111), "b": (19, 222), "c": (5, 333)}          # d absent, b truncated
    manifest = {"a": entry("a", 10, SHA_A, mtime=111), "c": entry("c", 5, "c" * 64, oid="1" * 40, mtime=999)}
    need, check = d.plan_host(expected, scanned, manifest)
    assert need == ["b", "d"]
    assert check == ["c"]          # c's mtime changed since it was verified: hash it again
    need, check = d.plan_host(expected, scanned, manifest, verify=True)
    assert (need, check) == (["b", "d"], ["a", "c"])
    need, check = d.plan_host(expected, scanned, None)
    assert (need, check) == (["b", "d"], ["a", "c"])   # no manifest: hash everything present


def test_plan_host_manifest_for_other_content_is_not_trusted():
    expected = [entry("a", 10, SHA_A)]
    scanned = {"a": (10, 5)}
    assert d.plan_host(expected, scanned, {"a": entry("a", 10, SHA_B, mtime=5)}) == ([], ["a"])
    assert d.plan_host(expected, scanned, {"a": entry("a", 10, SHA_A, mtime=5)}) == ([], [])




def test_manifest_roundtrip_and_spec_match():
    spec = {"model": "org/m", "revision": "main", "include": [], "exclude": ["*.pth"]}
    doc = d.manifest_doc(spec, "abc123", [entry("b", 2, SHA_B, mtime=2), entry("a", 1, SHA_A, oid="f" * 40, mtime=1)])
    assert [f["path"] for f in doc["files"]] == ["a", "b"]
    assert "oid" not in doc["files"][1]
    files = d.manifest_files(doc, spec)
    assert files["a"]["sha256"] == SHA_A and files["a"]["mtime"] == 1
    assert d.manifest_files(doc, {**spec, "revision": "v2"}) is None     # another revision: not vouched
    assert d.manifest_files(doc, {**spec, "exclude": []}) is None        # other filters: not vouched
    assert d.manifest_files({"garbage": True}, spec) is None
    assert d.manifest_files(None, spec) is None




def test_identity_prefers_sha256_then_git_oid():
    assert d.identity_matches(entry("x", 1, SHA_A), entry("x", 1, SHA_A))
    assert not d.identity_matches(entry("x", 1, SHA_A), entry("x", 2, SHA_A))
    assert d.identity_matches(entry("x", 1, None, oid="1" * 40), entry("x", 1, None, oid="1" * 40))
    assert not d.identity_matches(entry("x", 1, SHA_A, oid="2" * 40), entry("x", 1, None, oid="1" * 40))


def test_safe_relpath():
    assert d.safe_relpath("a/b.json")
    for bad in ("", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\b"):
        assert not d.safe_relpath(bad)

    assert d.human(1234567) == "1.2 MB"


def test_confined_refuses_paths_that_leave_the_folder(tmp_path):
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "link").symlink_to(tmp_path)             # a symlink inside the folder that points out of it
    assert d.confined(str(root), "sub/a.bin") == str(root / "sub" / "a.bin")
    for bad in ("../escaped.txt", "/tmp/x", "sub/../../x", "link/x", "", "a\\b", "sub//x"):
        with pytest.raises(ValueError):
            d.confined(str(root), bad)


def test_usable_hash_and_what_a_file_is_checked_against():
    assert d.usable_hash(SHA_A.upper(), 64) == SHA_A and d.usable_hash("1" * 40, 40) == "1" * 40
    for bad in (None, "", "z" * 64, SHA_A[:-1], 42, SHA_A + "0"):
        assert d.usable_hash(bad, 64) is None
    # the source's hash first (a hub: by "source"; a peer's listing keeps the head's word)
    assert d.reference(entry("a", 1, SHA_A), entry("a", 1, SHA_B, mtime=1)) == (SHA_A, None, "source")
    assert d.reference({**entry("a", 1, SHA_A), "hash_by": "head"}, None) == (SHA_A, None, "head")
    assert d.reference(entry("a", 1, oid="1" * 40), None) == (None, "1" * 40, "source")
    # no source hash: what this host recorded when it fetched the file (same size), else nothing to check against
    assert d.reference(entry("a", 1), entry("a", 1, SHA_B, mtime=1)) == (SHA_B, None, "head")
    assert d.reference(entry("a", 1), entry("a", 2, SHA_B, mtime=1)) == (None, None, "")
    assert d.reference(entry("a", 1), entry("a", 1, mtime=1)) == (None, None, "")
    assert d.reference(entry("a", 1), None) == (None, None, "")


def test_plan_host_trusts_only_a_manifest_that_recorded_a_sha256():
    expected = [entry("a", 10)]                             # the source lists no hash
    scanned = {"a": (10, 5)}
    assert d.plan_host(expected, scanned, {"a": entry("a", 10, mtime=5)}) == ([], ["a"])        # size only: hash it
    assert d.plan_host(expected, scanned, {"a": entry("a", 10, SHA_A, mtime=5)}) == ([], [])    # the head's hash


def test_manifest_keeps_who_gave_the_hash_and_counts_it():
    spec = {"model": "org/m", "revision": "main", "include": [], "exclude": []}
    files = [{**entry("a", 1, SHA_A, mtime=1), "hash_by": "source"},
             {**entry("b", 2, SHA_B, mtime=2), "hash_by": "head"}, {**entry("c", 3, SHA_B, mtime=3), "hash_by": "head"}]
    doc = d.manifest_doc(spec, "abc", files)
    assert [f["hash_by"] for f in doc["files"]] == ["source", "head", "head"]
    assert d.verified_counts(d.manifest_files(doc, spec).values()) == {"source": 1, "head": 2}
    assert d.verified_counts([entry("x", 1, SHA_A)]) == {"source": 0, "head": 1}   # unknown: not the source's word
