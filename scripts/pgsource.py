#!/usr/bin/env python3
"""Fetch one PostgreSQL upstream tarball from a Debian mirror's pool, checked.

    scripts/pgsource.py MAJOR VERSION SHA256 SUITE DEST_DIR

Used by scripts/setup. Prints the path of the verified tarball on stdout and
one line per decision on stderr. Exit status 0 on success, 1 on a refusal
(checksum mismatch, nothing fetchable), 2 on bad arguments.

Why not `apt-get source`: it asks for whatever the source index names today,
and the index can run ahead of the pool (17.12 named, only 17.11 served), so
the pinned version was never what got fetched. Here the pinned file is fetched
by its pool path and checked against the pinned SHA-256. Only when the pool no
longer has it do we take the version that SUITE's source index offers, checked
against the index's own SHA-256, and say that the pin should move.

The mirror is the one the machine's apt already uses (/etc/apt/sources.list.d/
debian.sources, else /etc/apt/sources.list); AUDIT_EXT_DEBIAN_MIRROR overrides
it (the set-up test points it at a local server).
"""
import hashlib
import lzma
import gzip
import os
import re
import sys
import urllib.error
import urllib.request

TIMEOUT = 60


class Refused(Exception):
    pass


def say(msg):
    print(f"setup: {msg}", file=sys.stderr)


def machine_mirror():
    env = os.environ.get("AUDIT_EXT_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    try:
        with open("/etc/apt/sources.list.d/debian.sources") as f:
            for line in f:
                if line.startswith("URIs:"):
                    return line.split()[1].rstrip("/")
    except OSError:
        pass
    try:
        with open("/etc/apt/sources.list") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "deb":
                    uri = parts[1]
                    if uri.startswith("["):  # deb [options] uri
                        uri = next(p for p in parts[1:] if not p.startswith("[") and not p.endswith("]"))
                    return uri.rstrip("/")
    except (OSError, StopIteration):
        pass
    raise Refused("no Debian mirror in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list "
                  "(set AUDIT_EXT_DEBIAN_MIRROR)")


def get(url):
    """The body at url, or None when the server says it is not there (404/410)."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            return None
        raise Refused(f"{url}: HTTP {e.code}")
    except (urllib.error.URLError, OSError) as e:
        raise Refused(f"{url}: {getattr(e, 'reason', e)}")


def pool_url(mirror, major, filename):
    return f"{mirror}/pool/main/p/postgresql-{major}/{filename}"


def index_offer(mirror, major, suite):
    """(version, orig filename, sha256) that SUITE's source index offers, or a Refused."""
    text = None
    tried = []
    for ext, unpack in ((".xz", lzma.decompress), (".gz", gzip.decompress)):
        url = f"{mirror}/dists/{suite}/main/source/Sources{ext}"
        body = get(url)
        if body is None:
            tried.append(f"{url} (404)")
            continue
        text = unpack(body).decode("utf-8", "replace")
        break
    if text is None:
        raise Refused("no source index: tried " + ", ".join(tried))
    for para in text.split("\n\n"):
        if not re.search(rf"^Package: postgresql-{major}$", para, re.M):
            continue
        m = re.search(rf"^ ([0-9a-f]{{64}}) \d+ (postgresql-{major}_([^_\s]+)\.orig\.tar\.bz2)$", para, re.M)
        if m:
            return m.group(3), m.group(2), m.group(1)
    raise Refused(f"the {suite} source index names no postgresql-{major} .orig.tar.bz2")


def store(dest, filename, body, want_sha, what):
    got = hashlib.sha256(body).hexdigest()
    if got != want_sha:
        raise Refused(f"{filename} ({what}) has the wrong SHA-256: expected {want_sha}, got {got}")
    os.makedirs(dest, exist_ok=True)
    path = os.path.join(dest, filename)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(body)
    os.replace(tmp, path)
    return path


def fetch(major, version, sha, suite, dest):
    filename = f"postgresql-{major}_{version}.orig.tar.bz2"
    cached = os.path.join(dest, filename)
    if os.path.exists(cached):
        with open(cached, "rb") as f:
            body = f.read()
        if hashlib.sha256(body).hexdigest() == sha:
            return cached
        os.unlink(cached)  # a partial or foreign file: fetch it again
    mirror = machine_mirror()
    url = pool_url(mirror, major, filename)
    try:
        body = get(url)
    except Refused as e:
        raise Refused(f"cannot fetch PostgreSQL {version}: tried {e}")
    if body is not None:
        return store(dest, filename, body, sha, url)
    # The pinned file is gone from the pool: take what the index offers.
    try:
        iversion, ifile, isha = index_offer(mirror, major, suite)
        iurl = pool_url(mirror, major, ifile)
        ibody = get(iurl)
        if ibody is None:
            raise Refused(f"{iurl} (404)")
    except Refused as e:
        raise Refused(f"cannot fetch PostgreSQL {major}: tried the pinned {url} (404), "
                      f"then the version in the {suite} source index: {e}")
    say(f"PostgreSQL {version} is gone from the pool; took {iversion} from the {suite} source index "
        f"(move the pin in scripts/setup: PG{major}_PIN=\"{iversion} {isha}\")")
    return store(dest, ifile, ibody, isha, f"{iurl}, SHA-256 from the {suite} source index")


def main(argv):
    if len(argv) != 6:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    _, major, version, sha, suite, dest = argv
    try:
        print(fetch(major, version, sha.lower(), suite, dest))
    except Refused as e:
        print(f"setup: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
