#!/usr/bin/env python3
"""Checks META.json against the PGXN Meta Spec 1.0.0 (https://pgxn.org/spec/),
offline, and against this repository (version equal to Cargo.toml's, files that
exist). The rules below are the spec's, key by key; unknown keys are errors
unless they start with x_ or X_, as the spec says.

    python3 tests/packaging/check_meta.py META.json Cargo.toml
"""
import json
import os
import re
import sys
import tomllib
import unicodedata

SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
RANGE_OP = re.compile(r"^(?:(==|!=|<=|>=|<|>)\s*)?(.+)$")
LICENSES = {
    "agpl_3", "apache_1_1", "apache_2_0", "artistic_1", "artistic_2", "bsd", "freebsd", "gfdl_1_2",
    "gfdl_1_3", "gpl_1", "gpl_2", "gpl_3", "lgpl_2_1", "lgpl_3_0", "mit", "mozilla_1_0", "mozilla_1_1",
    "openssl", "perl_5", "postgresql", "qpl_1_0", "ssleay", "sun", "zlib", "open_source", "restricted",
    "unrestricted", "unknown",
}
SPEC_URLS = {"https://pgxn.org/meta/spec.txt", "http://pgxn.org/meta/spec.txt"}
URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:\S+$")

errors = []


def err(path, msg):
    errors.append(f"{path}: {msg}")


def custom(key):
    return isinstance(key, str) and len(key) > 2 and key[:2] in ("x_", "X_")


def nonempty_string(path, v):
    if not isinstance(v, str) or not v:
        err(path, "must be a non-empty string")
        return False
    return True


def term(path, v):
    """A Term: at least two characters, no slash, backslash, space or control character."""
    if not nonempty_string(path, v):
        return
    if len(v) < 2:
        err(path, f"{v!r}: a term has at least two characters")
    if any(ch in "/\\" or ch.isspace() or unicodedata.category(ch) == "Cc" for ch in v):
        err(path, f"{v!r}: a term contains no slash, backslash, space or control character")


def tag(path, v):
    if not nonempty_string(path, v):
        return
    if not 2 <= len(v) <= 255:
        err(path, f"{v!r}: a tag has 2 to 255 characters")
    if any(ch in "/\\" or unicodedata.category(ch) == "Cc" for ch in v):
        err(path, f"{v!r}: a tag contains no slash, backslash or control character")


def version(path, v):
    if not isinstance(v, str) or not SEMVER.match(v):
        err(path, f"{v!r} is not a semantic version (x.y.z)")


def version_range(path, v):
    if v == 0:
        return
    if not isinstance(v, str):
        err(path, f"{v!r}: a version range is 0 or a string")
        return
    for part in v.split(","):
        m = RANGE_OP.match(part.strip())
        if not m or not (SEMVER.match(m.group(2)) or (m.group(2) == "0" and not m.group(1))):
            err(path, f"{v!r}: not a version range")
            return


def rel_path(path, v, root):
    if not nonempty_string(path, v):
        return
    if len(v) < 2 or v.startswith("/") or "\\" in v or ".." in v.split("/"):
        err(path, f"{v!r}: must be a relative path in Unix form")
    elif root is not None and not os.path.exists(os.path.join(root, v)):
        err(path, f"{v!r} does not exist in the repository")


def uri(path, v):
    if not isinstance(v, str) or not URI.match(v):
        err(path, f"{v!r} is not a URI")


def obj(path, v, known, required=(), any_of=()):
    if not isinstance(v, dict):
        err(path, "must be an object")
        return False
    for k in v:
        if k not in known and not custom(k):
            err(f"{path}.{k}", "unknown key (custom keys start with x_)")
    for k in required:
        if k not in v:
            err(path, f"required key {k!r} is missing")
    if any_of and not any(k in v for k in any_of):
        err(path, f"needs one of {', '.join(any_of)}")
    return True


def string_or_list(path, v, check):
    if isinstance(v, list):
        if not v:
            err(path, "must not be empty")
        if len(set(map(json.dumps, v))) != len(v):
            err(path, "items must be unique")
        for i, x in enumerate(v):
            check(f"{path}[{i}]", x)
    else:
        check(path, v)


def check(meta, root):
    top = ["name", "version", "abstract", "maintainer", "license", "provides", "meta-spec", "description",
           "generated_by", "tags", "no_index", "prereqs", "release_status", "resources"]
    if not obj("META", meta, top, required=top[:7]):
        return
    if "name" in meta:
        term("name", meta["name"])
    if "version" in meta:
        version("version", meta["version"])
    for k in ("abstract", "description", "generated_by"):
        if k in meta:
            nonempty_string(k, meta[k])
    if "maintainer" in meta:
        string_or_list("maintainer", meta["maintainer"], nonempty_string)
    if "license" in meta:
        lic = meta["license"]
        if isinstance(lic, dict):
            if not lic:
                err("license", "must not be empty")
            for k, u in lic.items():
                uri(f"license.{k}", u)
        else:
            string_or_list("license", lic, lambda p, x: x in LICENSES or err(p, f"{x!r} is not a known license"))
    if "provides" in meta:
        prov = meta["provides"]
        if not isinstance(prov, dict) or not prov:
            err("provides", "must be a non-empty object")
        else:
            for name, ext in prov.items():
                p = f"provides.{name}"
                term(p, name)
                if obj(p, ext, ["file", "version", "abstract", "docfile", "docpath"], required=["file", "version"]):
                    if "file" in ext:
                        rel_path(f"{p}.file", ext["file"], root)
                    if "docfile" in ext:
                        rel_path(f"{p}.docfile", ext["docfile"], root)
                    if "version" in ext:
                        version(f"{p}.version", ext["version"])
                    for k in ("abstract", "docpath"):
                        if k in ext:
                            nonempty_string(f"{p}.{k}", ext[k])
    if "meta-spec" in meta:
        ms = meta["meta-spec"]
        if obj("meta-spec", ms, ["version", "url"], required=["version"]):
            if not re.match(r"^1\.0\.\d+$", str(ms.get("version", ""))):
                err("meta-spec.version", "must be 1.0.x (a string)")
            if "url" in ms and ms["url"] not in SPEC_URLS:
                err("meta-spec.url", f"must be one of {sorted(SPEC_URLS)}")
    if "tags" in meta:
        if not isinstance(meta["tags"], list):
            err("tags", "must be a list")
        else:
            string_or_list("tags", meta["tags"], tag)
    if "release_status" in meta and meta["release_status"] not in ("stable", "testing", "unstable"):
        err("release_status", "must be stable, testing or unstable")
    if "no_index" in meta:
        ni = meta["no_index"]
        if obj("no_index", ni, ["file", "directory"], any_of=["file", "directory"]):
            for k in ("file", "directory"):
                if k in ni:
                    string_or_list(f"no_index.{k}", ni[k], lambda p, x: rel_path(p, x, root))
    if "prereqs" in meta:
        phases = ["configure", "build", "test", "runtime", "develop"]
        if obj("prereqs", meta["prereqs"], phases):
            for ph in phases:
                if ph not in meta["prereqs"]:
                    continue
                rels = ["requires", "recommends", "suggests", "conflicts"]
                v = meta["prereqs"][ph]
                if obj(f"prereqs.{ph}", v, rels, any_of=rels):
                    for r in rels:
                        if r not in v:
                            continue
                        if not isinstance(v[r], dict) or not v[r]:
                            err(f"prereqs.{ph}.{r}", "must be a non-empty object")
                            continue
                        for name, rng in v[r].items():
                            term(f"prereqs.{ph}.{r}", name)
                            version_range(f"prereqs.{ph}.{r}.{name}", rng)
    if "resources" in meta:
        res = meta["resources"]
        if obj("resources", res, ["homepage", "bugtracker", "repository"],
               any_of=["homepage", "bugtracker", "repository"]):
            if "homepage" in res:
                uri("resources.homepage", res["homepage"])
            if "bugtracker" in res and obj("resources.bugtracker", res["bugtracker"], ["web", "mailto"],
                                           any_of=["web", "mailto"]):
                if "web" in res["bugtracker"]:
                    uri("resources.bugtracker.web", res["bugtracker"]["web"])
                if "mailto" in res["bugtracker"] and "@" not in str(res["bugtracker"]["mailto"]):
                    err("resources.bugtracker.mailto", "is not an email address")
            if "repository" in res:
                rp = res["repository"]
                if obj("resources.repository", rp, ["url", "web", "type"]):
                    if not ("web" in rp or ("url" in rp and "type" in rp)):
                        err("resources.repository", "needs web, or url and type")
                    for k in ("url", "web"):
                        if k in rp:
                            uri(f"resources.repository.{k}", rp[k])
                    if "type" in rp and not re.match(r"^[a-z]+$", str(rp["type"])):
                        err("resources.repository.type", "must be a lowercase word")


def check_project(meta, cargo_toml, root):
    """This repository's own rules on top of the spec."""
    with open(cargo_toml, "rb") as f:
        pkg = tomllib.load(f)["package"]
    v = pkg["version"]
    if meta.get("version") != v:
        err("version", f"{meta.get('version')!r} differs from Cargo.toml's {v!r}")
    ext = meta.get("provides", {}).get("audit_ext")
    if not isinstance(ext, dict):
        err("provides", "must provide audit_ext")
    elif ext.get("version") != v:
        err("provides.audit_ext.version", f"{ext.get('version')!r} differs from Cargo.toml's {v!r}")
    if meta.get("name") != "audit_ext":
        err("name", "must be audit_ext")
    if meta.get("license") != "postgresql" or pkg.get("license") != "PostgreSQL":
        err("license", "must be postgresql (Cargo.toml: PostgreSQL)")
    control = os.path.join(root, "audit_ext.control")
    with open(control) as f:
        m = re.search(r"^comment\s*=\s*'(.*)'", f.read(), re.M)
    if m and meta.get("abstract") != m.group(1):
        err("abstract", f"differs from the control file's comment {m.group(1)!r}")
    req = meta.get("prereqs", {}).get("runtime", {}).get("requires", {})
    if "PostgreSQL" not in req:
        err("prereqs.runtime.requires", "must name the PostgreSQL version")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    meta_path, cargo_toml = sys.argv[1:]
    root = os.path.dirname(os.path.abspath(meta_path))
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"META.json: {e}")
    check(meta, root)
    check_project(meta, cargo_toml, root)
    if errors:
        for e in errors:
            print(f"META.json: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"META.json: valid (PGXN Meta Spec {meta['meta-spec']['version']}), version {meta['version']} = Cargo.toml's")


if __name__ == "__main__":
    main()
