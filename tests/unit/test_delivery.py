"""Pure parts of model delivery: filtering, scans, manifests, per-host diffs."""

from __future__ import annotations

from cluster import delivery as d

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


def test_scan_parsing_skips_our_files_and_keeps_exact_mtime():
    text = ("config.json\t10\t1700000000.1234567890\n"
            ".gpucluster-manifest.json\t99\t1700000000.0000000000\n"
            ".gpucluster-partial/model.safetensors\t5\t1700000000.5\n"
            ".cache/huggingface/download/config.json.metadata\t3\t1700000000.1\n"
            "sub/dir/x.bin\t0\t1700000001\n"
            "garbage line\n")
    assert d.parse_scan(text) == {"config.json": (10, 1700000000123456789), "sub/dir/x.bin": (0, 1700000001000000000)}


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


def test_mismatched_reports_bad_and_unhashable():
    expected = [entry("a", 1, SHA_A), entry("b", 1, SHA_B), entry("c", 1, SHA_A)]
    assert d.mismatched(expected, {"a": SHA_A, "b": SHA_A}) == ["b", "c"]
    assert d.mismatched(expected, {"a": SHA_A, "b": SHA_B, "c": SHA_A}) == []


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


def test_same_content_compares_paths_sizes_and_sha():
    a = {"x": entry("x", 1, SHA_A, mtime=1)}
    assert d.same_content(a, {"x": entry("x", 1, SHA_A, mtime=2)})     # mtimes are per host
    assert not d.same_content(a, {"x": entry("x", 1, SHA_B)})
    assert not d.same_content(a, {"x": entry("x", 1, SHA_A), "y": entry("y", 1, SHA_A)})
    assert not d.same_content(a, None)


def test_identity_prefers_sha256_then_git_oid():
    assert d.identity_matches(entry("x", 1, SHA_A), entry("x", 1, SHA_A))
    assert not d.identity_matches(entry("x", 1, SHA_A), entry("x", 2, SHA_A))
    assert d.identity_matches(entry("x", 1, None, oid="1" * 40), entry("x", 1, None, oid="1" * 40))
    assert not d.identity_matches(entry("x", 1, SHA_A, oid="2" * 40), entry("x", 1, None, oid="1" * 40))


def test_safe_relpath_and_mtime():
    assert d.safe_relpath("a/b.json")
    for bad in ("", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\b"):
        assert not d.safe_relpath(bad)
    assert d.mtime_ns("12.5") == 12_500_000_000
    assert d.human(1234567) == "1.2 MB"
