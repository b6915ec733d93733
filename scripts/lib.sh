# shellcheck shell=bash
# Sourced, not run, by the scripts in scripts/ and by tests/packaging/guest.sh
# (scripts/package-test copies it next to guest.sh, to /pkgtest/lib.sh in the
# Debian root). It sets no shell options: each script keeps its own.

# Where scripts/setup builds PostgreSQL 17 and 18, and other slow things are
# kept between runs: shared by all users when root, else private to this one.
CACHE=${AUDIT_EXT_CACHE:-$(if [ "$(id -u)" = 0 ]; then echo /var/cache/audit_ext; else echo "$HOME/.cache/audit_ext"; fi)}

# pg_config_for MAJOR: the pg_config of the server these scripts use for that
# version: Debian's package for 15, scripts/setup's source builds (prefix
# $CACHE/pg/NN) for 17 and 18. Fails silently for other versions: each script
# words that error its own way.
pg_config_for() {
  case $1 in
    15) echo /usr/lib/postgresql/15/bin/pg_config ;;
    17|18) echo "$CACHE/pg/$1/bin/pg_config" ;;
    *) return 1 ;;
  esac
}

# as_pg COMMAND...: run as the owner of our clusters. initdb and postgres refuse
# to run as root, so as root that is user postgres. runuser, not sudo: root needs
# no password, the package-test root has no sudo, and the environment stays
# (sudo drops LD_LIBRARY_PATH, which a moved source build needs). From /:
# postgres may not be allowed into the current directory (a mode-700 $HOME).
if [ "$(id -u)" = 0 ]; then
  as_pg() { (cd / && runuser -u postgres -- "$@"); }
else
  as_pg() { (cd / && "$@"); }
fi

# ---- a throw-away cluster (one at a time per script) ----------------------------
#   cluster_new BINDIR NAME      a directory /tmp/NAME.XXXXXX that the owner can
#                                reach and a free port: sets CLUSTER_BIN, _DIR,
#                                _DATA (DIR/data), _SOCK (DIR/sock), _LOG
#                                (DIR/server.log) and _PORT; fails only when
#                                no port is free (or /tmp is unusable)
#   cluster_init [CONF_LINE...]  initdb, then the lines in postgresql.conf
#   cluster_start                pg_ctl start
#   cluster_stop [MODE]          pg_ctl stop -m MODE (fast), if started
#   cluster_cleanup              for EXIT traps: stop at once, remove the directory
# Failures return 1 after printing initdb's output or the server log to stderr;
# the caller says what failed, in its own words.
CLUSTER_BIN= CLUSTER_DIR= CLUSTER_DATA= CLUSTER_SOCK= CLUSTER_LOG= CLUSTER_PORT= CLUSTER_STARTED=0
# initdb's --locale; a script may set another after sourcing this (guest.sh
# tests as Debian's own clusters run, in C.UTF-8).
CLUSTER_LOCALE=C

cluster_new() {
  CLUSTER_BIN=$1
  # /tmp, not $TMPDIR: postgres must be able to get in.
  CLUSTER_DIR=$(mktemp -d "/tmp/$2.XXXXXX") || return 1
  CLUSTER_DATA=$CLUSTER_DIR/data CLUSTER_SOCK=$CLUSTER_DIR/sock CLUSTER_LOG=$CLUSTER_DIR/server.log
  chmod 755 "$CLUSTER_DIR" || return 1
  mkdir "$CLUSTER_SOCK" || return 1
  if [ "$(id -u)" = 0 ]; then chown postgres: "$CLUSTER_DIR" "$CLUSTER_SOCK" || return 1; fi
  # No TCP (listen_addresses = ''), yet the port should be one nobody uses: it
  # seeds the server's shared-memory key, and a client that forgets -h then
  # finds no server rather than the machine's own in /var/run/postgresql.
  local p
  CLUSTER_PORT=
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && [ ! -e "/var/run/postgresql/.s.PGSQL.$p" ]; then
      CLUSTER_PORT=$p; return 0
    fi
  done
  return 1
}

cluster_init() {
  # --no-sync: nothing here has to survive a crash of the machine.
  as_pg "$CLUSTER_BIN/initdb" -D "$CLUSTER_DATA" -U postgres -A trust -E UTF8 --locale="$CLUSTER_LOCALE" --no-sync \
    >"$CLUSTER_DIR/initdb.log" 2>&1 || { cat "$CLUSTER_DIR/initdb.log" >&2; return 1; }
  {
    echo "# added by ${0##*/} (scripts/lib.sh)"
    echo "port = $CLUSTER_PORT"
    echo "listen_addresses = ''"
    echo "unix_socket_directories = '$CLUSTER_SOCK'"
    if [ $# -gt 0 ]; then printf '%s\n' "$@"; fi
  } | as_pg tee -a "$CLUSTER_DATA/postgresql.conf" >/dev/null
}

cluster_start() {
  # Marked started first: a server that came up too slowly must still be stopped.
  CLUSTER_STARTED=1
  as_pg "$CLUSTER_BIN/pg_ctl" -D "$CLUSTER_DATA" -l "$CLUSTER_LOG" -w -t 120 start >/dev/null ||
    { cat "$CLUSTER_LOG" >&2 2>/dev/null; return 1; }
}

cluster_stop() {
  [ "$CLUSTER_STARTED" = 1 ] || return 0
  as_pg "$CLUSTER_BIN/pg_ctl" -D "$CLUSTER_DATA" -m "${1:-fast}" -w -t 120 stop >/dev/null || return 1
  CLUSTER_STARTED=0
}

cluster_cleanup() {
  cluster_stop immediate >/dev/null 2>&1 || true
  if [ -n "$CLUSTER_DIR" ]; then rm -rf "$CLUSTER_DIR"; CLUSTER_DIR=; fi
}
