#!/usr/bin/env python3
"""The set-up's source fetch (scripts/pgsource.py) against a local HTTP server
standing in for the Debian mirror: never the network. Run by scripts/test.

    python3 scripts/tests/test_pgsource.py
"""
import hashlib
import http.server
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PGSOURCE = os.path.join(HERE, "..", "pgsource.py")


def sha(b):
    return hashlib.sha256(b).hexdigest()


class Mirror:
    """A directory served over HTTP on a free loopback port."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="audit_ext_mirror.")
        root = self.root

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=root, **k)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/debian"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def put(self, rel, body):
        path = os.path.join(self.root, "debian", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(body)

    def pool(self, major, version, body):
        self.put(f"pool/main/p/postgresql-{major}/postgresql-{major}_{version}.orig.tar.bz2", body)

    def index(self, suite, major, version, body_sha, size=123):
        text = (f"Package: postgresql-{major}\nBinary: postgresql-{major}\nVersion: {version}-1\n"
                f"Checksums-Sha256:\n {body_sha} {size} postgresql-{major}_{version}.orig.tar.bz2\n"
                f" {'0' * 64} 99 postgresql-{major}_{version}-1.debian.tar.xz\n\n"
                "Package: other\nVersion: 1\n")
        self.put(f"dists/{suite}/main/source/Sources.xz", lzma.compress(text.encode()))

    def close(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def remove(self):
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)


class FetchTest(unittest.TestCase):
    def setUp(self):
        self.mirror = Mirror()
        self.dest = tempfile.mkdtemp(prefix="audit_ext_src.")

    def tearDown(self):
        self.mirror.remove()
        shutil.rmtree(self.dest, ignore_errors=True)

    def run_fetch(self, major, version, pin_sha, suite="trixie"):
        env = dict(os.environ, AUDIT_EXT_DEBIAN_MIRROR=self.mirror.url)
        return subprocess.run([sys.executable, PGSOURCE, major, version, pin_sha, suite, self.dest],
                              capture_output=True, text=True, env=env, timeout=60)

    def test_pinned_file_present_and_correct(self):
        body = b"pinned tarball 17.11"
        self.mirror.pool("17", "17.11", body)
        self.mirror.index("trixie", "17", "17.12", sha(b"other"))  # the index runs ahead: ignored
        r = self.run_fetch("17", "17.11", sha(body))
        self.assertEqual(r.returncode, 0, r.stderr)
        path = r.stdout.strip()
        self.assertEqual(os.path.basename(path), "postgresql-17_17.11.orig.tar.bz2")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), body)
        self.assertEqual(r.stderr, "")
        # A second run takes the verified copy without asking the mirror.
        self.mirror.close()
        r = self.run_fetch("17", "17.11", sha(body))
        self.assertEqual((r.returncode, r.stdout.strip()), (0, path), r.stderr)

    def test_pinned_file_with_wrong_checksum_is_refused(self):
        self.mirror.pool("17", "17.11", b"tampered")
        want = sha(b"the real one")
        r = self.run_fetch("17", "17.11", want)
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stdout, "")
        self.assertIn("postgresql-17_17.11.orig.tar.bz2", r.stderr)
        self.assertIn(f"expected {want}", r.stderr)
        self.assertIn(f"got {sha(b'tampered')}", r.stderr)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        self.assertEqual(os.listdir(self.dest), [])

    def test_pinned_file_missing_takes_the_index_version(self):
        body = b"index tarball 18.7"
        self.mirror.pool("18", "18.7", body)
        self.mirror.index("sid", "18", "18.7", sha(body))
        r = self.run_fetch("18", "18.6", sha(b"gone"), suite="sid")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(r.stdout.strip().endswith("postgresql-18_18.7.orig.tar.bz2"))
        lines = r.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, r.stderr)
        self.assertIn("took 18.7", lines[0])
        self.assertIn("move the pin", lines[0])
        self.assertIn(f'PG18_PIN="18.7 {sha(body)}"', lines[0])

    def test_index_version_with_wrong_checksum_is_refused(self):
        self.mirror.pool("18", "18.7", b"index tarball, altered")
        self.mirror.index("sid", "18", "18.7", sha(b"index tarball"))
        r = self.run_fetch("18", "18.6", sha(b"gone"), suite="sid")
        self.assertEqual(r.returncode, 1)
        self.assertIn("wrong SHA-256", r.stderr)

    def test_nothing_fetchable_is_one_clear_error(self):
        r = self.run_fetch("17", "17.11", sha(b"x"))
        self.assertEqual(r.returncode, 1)
        lines = r.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, r.stderr)
        self.assertIn("cannot fetch PostgreSQL 17", lines[0])
        self.assertIn("postgresql-17_17.11.orig.tar.bz2 (404)", lines[0])
        self.assertIn("Sources.xz (404)", lines[0])

    def test_index_names_a_file_the_pool_lacks(self):
        self.mirror.index("trixie", "17", "17.12", sha(b"never served"))
        r = self.run_fetch("17", "17.11", sha(b"x"))
        self.assertEqual(r.returncode, 1)
        lines = r.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, r.stderr)
        self.assertIn("postgresql-17_17.12.orig.tar.bz2 (404)", lines[0])

    def test_unreachable_mirror_is_one_clear_error(self):
        self.mirror.close()
        r = self.run_fetch("17", "17.11", sha(b"x"))
        self.assertEqual(r.returncode, 1)
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        self.assertIn("cannot fetch PostgreSQL 17.11", r.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
