//! Integration-test harness: a private, throw-away PostgreSQL cluster per test.
//!
//! ```ignore
//! mod common;
//! use common::{Cluster, ClusterOpts};
//!
//! let cluster = Cluster::start(ClusterOpts::default());          // preloads audit_ext
//! let cluster = Cluster::start(ClusterOpts::new().preload(false).conf("work_mem = '8MB'"));
//! let mut db = cluster.connect("postgres");
//! ```
//!
//! * The server comes from `AUDIT_EXT_PG_CONFIG` (default: PostgreSQL 15's
//!   `pg_config`); the extension must already be installed there
//!   (`cargo pgrx install --pg-config ...`, which `scripts/test` does).
//! * When running as root, `initdb` and `pg_ctl` run as user `postgres` through
//!   `sudo -u postgres`; otherwise they run as the current user. Either way the
//!   superuser is called `postgres` and authentication is `trust`.
//! * The cluster lives in a fresh directory under /tmp with its own unix-socket
//!   directory; it listens on no TCP address (`listen_addresses = ''`, add a
//!   conf line to change that: the port is free). Dropping the `Cluster` stops
//!   the server (`-m immediate`) and removes the directory, unless
//!   `AUDIT_EXT_KEEP_CLUSTER=1`.
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub use postgres::{Client, NoTls};

/// `pg_config` used when `AUDIT_EXT_PG_CONFIG` is not set.
pub const DEFAULT_PG_CONFIG: &str = "/usr/lib/postgresql/15/bin/pg_config";

/// How to set up a [`Cluster`].
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    /// Put `audit_ext` in `shared_preload_libraries` (default: true).
    pub preload: bool,
    /// Extra `postgresql.conf` lines, appended after the harness's own
    /// settings (so they win).
    pub conf: Vec<String>,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts { preload: true, conf: Vec::new() }
    }
}

impl ClusterOpts {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn preload(mut self, preload: bool) -> Self {
        self.preload = preload;
        self
    }
    /// Add one `postgresql.conf` line, e.g. `"audit.foo = on"`.
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.conf.push(line.into());
        self
    }
}

/// A running (or stopped) private PostgreSQL cluster.
pub struct Cluster {
    base: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    bindir: PathBuf,
    port: u16,
    as_root: bool,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn running_as_root() -> bool {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            // Uid: real effective saved fs
            return line.split_whitespace().nth(2) == Some("0");
        }
    }
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("could not find a free TCP port")
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn pg_config_value(pg_config: &str, arg: &str) -> String {
    let out = Command::new(pg_config)
        .arg(arg)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {pg_config} {arg}: {e} (set AUDIT_EXT_PG_CONFIG)"));
    assert!(out.status.success(), "{pg_config} {arg} failed: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Cluster {
    /// initdb + start a fresh cluster. Panics (with the server log) on failure.
    pub fn start(opts: ClusterOpts) -> Cluster {
        let cluster = Cluster::fresh();
        let out = cluster
            .pg_command(cluster.bindir.join("initdb"))
            .arg("-D")
            .arg(&cluster.data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", describe(&out));

        cluster.append_conf(&opts);
        cluster.start_again();
        cluster
    }

    /// A streaming-replication standby of `primary` (pg_basebackup -R), started.
    pub fn standby_of(primary: &Cluster, opts: ClusterOpts) -> Cluster {
        let cluster = Cluster::fresh();
        let out = cluster
            .pg_command(cluster.bindir.join("pg_basebackup"))
            .arg("-h")
            .arg(&primary.sock)
            .args([
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
                "--no-sync",
                "-D",
            ])
            .arg(&cluster.data)
            .output()
            .expect("run pg_basebackup");
        assert!(out.status.success(), "pg_basebackup failed: {}", describe(&out));
        cluster.append_conf(&opts);
        cluster.start_again();
        cluster
    }

    /// A new directory for a cluster, owned by the cluster owner; nothing in it yet.
    fn fresh() -> Cluster {
        let pg_config =
            std::env::var("AUDIT_EXT_PG_CONFIG").unwrap_or_else(|_| DEFAULT_PG_CONFIG.to_string());
        let bindir = PathBuf::from(pg_config_value(&pg_config, "--bindir"));
        let as_root = running_as_root();

        // A fresh directory: <base>/{data,sock,server.log}
        let base = loop {
            let n = COUNTER.fetch_add(1, Ordering::SeqCst);
            let p = PathBuf::from(format!("/tmp/audit_ext_it.{}.{}", std::process::id(), n));
            match fs::create_dir(&p) {
                Ok(()) => break p,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create {}: {e}", p.display()),
            }
        };
        let sock = base.join("sock");
        fs::create_dir(&sock).expect("create socket dir");
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).expect("chmod base dir");

        let cluster = Cluster {
            data: base.join("data"),
            log: base.join("server.log"),
            sock,
            base,
            bindir,
            port: free_port(),
            as_root,
        };

        if as_root {
            let out = Command::new("chown")
                .arg("postgres:")
                .arg(&cluster.base)
                .arg(&cluster.sock)
                .output()
                .expect("run chown");
            assert!(out.status.success(), "chown postgres failed: {}", describe(&out));
            let ok = cluster
                .pg_command("test")
                .arg("-x")
                .arg(cluster.bindir.join("initdb"))
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(
                ok,
                "user postgres cannot execute {}/initdb (is a parent directory mode 700?)",
                cluster.bindir.display()
            );
        }
        cluster
    }

    /// The harness's settings and `opts`, after whatever postgresql.conf holds.
    fn append_conf(&self, opts: &ClusterOpts) {
        let mut conf = format!(
            "\n# added by tests/common\nport = {}\nlisten_addresses = ''\nunix_socket_directories = '{}'\nfsync = off\n",
            self.port,
            self.sock.display()
        );
        if opts.preload {
            conf.push_str("shared_preload_libraries = 'audit_ext'\n");
        }
        for line in &opts.conf {
            conf.push_str(line);
            conf.push('\n');
        }
        fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .expect("append to postgresql.conf");
    }

    /// A command run as the cluster owner (`sudo -u postgres` when root).
    fn pg_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = if self.as_root {
            let mut c = Command::new("sudo");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.current_dir("/");
        cmd
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        self.pg_command(self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(args)
            .output()
            .expect("run pg_ctl")
    }

    /// Start the (stopped) server again, waiting until it accepts connections.
    pub fn start_again(&self) {
        let log = self.log.to_string_lossy().into_owned();
        let out = self.pg_ctl(&["-l", &log, "-w", "-t", "120", "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n--- server log ---\n{}",
            describe(&out),
            self.log_contents()
        );
    }

    /// Stop the server: `mode` is "smart", "fast" or "immediate".
    pub fn stop(&self, mode: &str) {
        let out = self.pg_ctl(&["-m", mode, "-w", "-t", "120", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop -m {mode} failed: {}\n--- server log ---\n{}",
            describe(&out),
            self.log_contents()
        );
    }

    /// `pg_ctl restart -m fast` (e.g. after changing postgresql.conf).
    pub fn restart(&self) {
        let log = self.log.to_string_lossy().into_owned();
        let out = self.pg_ctl(&["-l", &log, "-m", "fast", "-w", "-t", "120", "restart"]);
        assert!(
            out.status.success(),
            "pg_ctl restart failed: {}\n--- server log ---\n{}",
            describe(&out),
            self.log_contents()
        );
    }

    /// Connect as `postgres` through the private socket directory.
    pub fn try_connect(&self, db: &str) -> Result<Client, postgres::Error> {
        postgres::Config::new()
            .host_path(&self.sock)
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .connect_timeout(Duration::from_secs(30))
            .connect(NoTls)
    }

    /// Connect as `postgres` to database `db`; panics (with the log) on failure.
    pub fn connect(&self, db: &str) -> Client {
        self.try_connect(db).unwrap_or_else(|e| {
            panic!("cannot connect to {db}: {e}\n--- server log ---\n{}", self.log_contents())
        })
    }

    /// Connect as role `user` to database `db`; panics on failure.
    pub fn connect_as(&self, db: &str, user: &str) -> Client {
        postgres::Config::new()
            .host_path(&self.sock)
            .port(self.port)
            .user(user)
            .dbname(db)
            .connect_timeout(Duration::from_secs(30))
            .connect(NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to {db} as {user}: {e}"))
    }

    /// `pg_dump -Fc` of database `from` into a new database `to` (pg_restore,
    /// stopping at the first error); panics with the tools' output on failure.
    pub fn dump_and_restore(&self, from: &str, to: &str) {
        use std::io::Write;
        let dump = self.client("pg_dump").args(["-Fc", "-d", from]).output().unwrap();
        assert!(dump.status.success(), "pg_dump: {}", String::from_utf8_lossy(&dump.stderr));
        self.create_db(to);
        let mut restore = self
            .client("pg_restore")
            .args(["--exit-on-error", "-d", to])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        restore.stdin.take().unwrap().write_all(&dump.stdout).unwrap();
        let out = restore.wait_with_output().unwrap();
        assert!(out.status.success(), "pg_restore: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `CREATE DATABASE name`.
    pub fn create_db(&self, name: &str) {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        self.connect("postgres").batch_execute(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// A client program of this server's version (pg_dump, pg_restore, psql, ...),
    /// already pointed at the cluster as `postgres`; add the rest of the arguments.
    pub fn client(&self, program: &str) -> Command {
        let mut cmd = self.pg_command(self.bindir.join(program));
        cmd.arg("-h")
            .arg(&self.sock)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-U")
            .arg("postgres");
        cmd
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The unix-socket directory: use it as the host (`-h`) for psql & co.
    pub fn host(&self) -> &Path {
        &self.sock
    }
    pub fn datadir(&self) -> &Path {
        &self.data
    }

    /// The whole server log so far (across restarts).
    pub fn log_contents(&self) -> String {
        fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Panics if a backend crashed or the server PANICked.
    pub fn assert_no_crash(&self) {
        let log = self.log_contents();
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("terminated by signal") || l.contains("PANIC"))
            .collect();
        assert!(
            bad.is_empty(),
            "server crash in the log:\n{}\n--- server log ---\n{log}",
            bad.join("\n")
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = self.pg_ctl(&["-m", "immediate", "-w", "-t", "60", "stop"]);
        }
        let keep = std::env::var("AUDIT_EXT_KEEP_CLUSTER").map(|v| v == "1").unwrap_or(false);
        if std::thread::panicking() {
            let log = self.log_contents();
            let tail: Vec<&str> = log.lines().rev().take(50).collect();
            eprintln!(
                "--- last lines of the server log ({}) ---\n{}",
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if keep {
            eprintln!("AUDIT_EXT_KEEP_CLUSTER=1: kept {}", self.base.display());
        } else {
            let _ = fs::remove_dir_all(&self.base);
        }
    }
}

/// A tiny deterministic PRNG (xorshift), so a failing random test can be replayed by seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Drops every partition of audit.log but the default one, so that new audit rows
/// land in audit.log_default (as after a restore, or a long pause of the worker).
/// The parent is locked first, in the order maintain() and the sealer take them:
/// dropping a partition first and then waiting for the parent deadlocks with a
/// running worker.
pub fn drop_premade_partitions(db: &mut Client) {
    db.batch_execute(
        "SET audit.allow_drop = on;
         BEGIN;
         LOCK TABLE audit.log IN ACCESS EXCLUSIVE MODE;
         DO $$ DECLARE p text; BEGIN
           FOR p IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                     WHERE i.inhparent = 'audit.log'::regclass AND c.relname <> 'log_default' LOOP
             EXECUTE format('DROP TABLE audit.%I', p);
           END LOOP; END $$;
         COMMIT;
         RESET audit.allow_drop;",
    )
    .unwrap();
}
