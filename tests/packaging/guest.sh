#!/bin/bash
# Runs as root inside the throw-away Debian 12 root that scripts/package-test
# makes (Debian's postgresql-15 installed, no cluster, no cargo, no pgrx).
# This directory is copied to /pkgtest there, with the .deb files and
# scripts/lib.sh.
#
#   guest.sh install NEW.deb            dpkg -i, clusters without and with
#                                       shared_preload_libraries, dpkg --purge
#   guest.sh upgrade OLD.deb NEW.deb    the previous release's package, its
#                                       history, the package upgrade,
#                                       ALTER EXTENSION UPDATE, a fresh install
#                                       to compare with
set -euo pipefail

T=/pkgtest
# shellcheck source=scripts/lib.sh
. "$T/lib.sh"
CLUSTER_LOCALE=C.UTF-8   # what pg_createcluster would pick here (LANG=C.UTF-8)
BIN=$("$(pg_config_for 15)" --bindir)
EXT=audit_ext

say() { printf 'guest: %s\n' "$*"; }
fail() { printf 'guest: FAIL: %s\n' "$*" >&2; exit 1; }
psql_() { as_pg "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$CLUSTER_SOCK" -p "$CLUSTER_PORT" "$@"; }
deb_field() { dpkg-deb --field "$1" "$2"; }
# dpkg_ ARGS: dpkg, its chatter (postgresql-common's triggers) shown only on failure.
dpkg_() { dpkg "$@" > /tmp/dpkg.log 2>&1 || { cat /tmp/dpkg.log; fail "dpkg $*"; }; }

# start_cluster NAME [postgresql.conf line...]: a new cluster (scripts/lib.sh's),
# on a Unix socket only.
start_cluster() {
  local name=$1; shift
  cluster_new "$BIN" "pgtest-$name" || fail "cluster $name: no free port"
  cluster_init "$@" || fail "cluster $name: initdb failed"
  cluster_start || fail "cluster $name did not start"
}
restart_cluster() {
  { cluster_stop fast && cluster_start; } || fail "restart failed"
}
stop_cluster() {
  cluster_stop fast || fail "the cluster did not stop"
  cluster_cleanup
}

# What the package may touch: the whole file system's names, and the contents
# of PostgreSQL's own directories.
fs_state() {
  find / -xdev \( -path /proc -o -path /dev -o -path /tmp -o -path "$T" -o -path /var/log -o -path /var/cache \
                  -o -path '/var/lib/dpkg/*-old' -o -path /run \) -prune -o -print | LC_ALL=C sort
  find /usr/lib/postgresql /usr/share/postgresql /etc/postgresql-common -type f -exec md5sum {} + | LC_ALL=C sort -k2
}

check_deb_metadata() { # deb major
  local deb=$1 v=$2
  local pkg; pkg=$(deb_field "$deb" Package)
  [ "$pkg" = "postgresql-$v-audit-ext" ] || fail "package name $pkg"
  deb_field "$deb" Depends | tr ',' '\n' | sed 's/^ *//' | grep -qx "postgresql-$v" \
    || fail "Depends does not name postgresql-$v: $(deb_field "$deb" Depends)"
  # Files only in this server's lib and extension directories.
  local f
  while IFS= read -r f; do
    case $f in
      ./usr/lib/postgresql/$v/lib/*.so|./usr/share/postgresql/$v/extension/$EXT.control|./usr/share/postgresql/$v/extension/$EXT--*.sql) ;;
      ./|./usr/|./usr/lib/|./usr/lib/postgresql/|./usr/lib/postgresql/$v/|./usr/lib/postgresql/$v/lib/) ;;
      ./usr/share/|./usr/share/postgresql/|./usr/share/postgresql/$v/|./usr/share/postgresql/$v/extension/) ;;
      *) fail "file outside the lib and extension directories: $f" ;;
    esac
  done < <(dpkg-deb --fsys-tarfile "$deb" | tar -t)
  say "$pkg $(deb_field "$deb" Version): Depends: $(deb_field "$deb" Depends)"
}

cmd_install() {
  local deb=$T/$1
  local v; v=$(deb_field "$deb" Version)
  check_deb_metadata "$deb" 15
  [ -z "$(ls /etc/postgresql 2>/dev/null)" ] || fail "the root is not pristine: a cluster exists"
  fs_state > /tmp/before

  say "dpkg -i $(basename "$deb")"
  dpkg_ -i "$deb"
  dpkg-query -W -f='${Status}\n' "postgresql-15-audit-ext" | grep -qx 'install ok installed' || fail "not installed"
  dpkg -L postgresql-15-audit-ext > /tmp/files
  for f in "/usr/lib/postgresql/15/lib/$EXT.so" "/usr/share/postgresql/15/extension/$EXT.control" \
           "/usr/share/postgresql/15/extension/$EXT--$v.sql"; do
    grep -qx "$f" /tmp/files || fail "package does not install $f"
  done

  say "cluster without shared_preload_libraries"
  start_cluster plain
  psql_ -d postgres -c 'CREATE DATABASE t' >/dev/null
  psql_ -d t -v version="$v" -v preload=false -f "$T/smoke.sql" >/dev/null
  stop_cluster

  say "cluster with shared_preload_libraries = 'audit_ext'"
  start_cluster preload "shared_preload_libraries = 'audit_ext'" "audit.naptime = 0"
  psql_ -d postgres -c 'CREATE DATABASE t' >/dev/null
  psql_ -d t -v version="$v" -v preload=true -f "$T/smoke.sql" >/dev/null
  # The background worker seals on its own once it is unpaused.
  psql_ -d postgres -c 'CREATE DATABASE w' >/dev/null
  psql_ -d w -c 'SET client_min_messages = warning' -c 'CREATE EXTENSION audit_ext' \
        -c 'CREATE TABLE t (id int PRIMARY KEY)' -c "SELECT audit.track('t')" -c 'INSERT INTO t VALUES (1), (2)' >/dev/null
  psql_ -d postgres -c 'ALTER SYSTEM SET audit.naptime = 1' -c 'SELECT pg_reload_conf()' >/dev/null
  local i sealed=
  for i in $(seq 1 60); do
    sealed=$(psql_ -d w -At -c "SELECT EXISTS (SELECT FROM audit.blocks WHERE through_id >= (SELECT max(id) FROM audit.log))")
    [ "$sealed" = t ] && break
    sleep 1
  done
  [ "$sealed" = t ] || { tail -20 "$CLUSTER_LOG"; fail "the background worker did not seal within 60 s"; }
  say "the background worker sealed after about ${i} s"
  stop_cluster

  say "dpkg --purge postgresql-15-audit-ext"
  dpkg_ --purge postgresql-15-audit-ext
  if dpkg-query -W -f='${Status}\n' postgresql-15-audit-ext 2>/dev/null | grep -q .; then
    fail "still known to dpkg: $(dpkg-query -W -f='${Status}' postgresql-15-audit-ext)"
  fi
  while IFS= read -r f; do
    [ -d "$f" ] || [ ! -e "$f" ] || fail "left behind: $f"
  done < /tmp/files
  fs_state > /tmp/after
  if ! diff -u /tmp/before /tmp/after; then fail "the file system differs from before the install (diff above)"; fi
  say "install test passed: nothing left behind ($(wc -l < /tmp/after) paths and checksums compared)"
}

cmd_upgrade() {
  local old=$T/$1 new=$T/$2
  local vold vnew; vold=$(deb_field "$old" Version); vnew=$(deb_field "$new" Version)
  say "upgrade $vold -> $vnew"

  dpkg_ -i "$old"
  start_cluster upgrade "shared_preload_libraries = 'audit_ext'" "audit.naptime = 0"
  psql_ -d postgres -c 'CREATE DATABASE upg' >/dev/null
  psql_ -d upg -f "$T/fill.sql" >/dev/null
  psql_ -d upg -At -c "SELECT extversion FROM pg_extension WHERE extname = '$EXT'" | grep -qx "$vold" || fail "not at $vold"
  local digest; digest=$(psql_ -d upg -At -c 'SELECT audit.digest()')
  psql_ -d upg -At -f "$T/snapshot.sql" > /tmp/snap.old

  say "package upgrade: dpkg -i $(basename "$new"), restart"
  dpkg_ -i "$new"
  restart_cluster
  psql_ -d upg -At -f "$T/snapshot.sql" > /tmp/snap.mid
  diff -u /tmp/snap.old /tmp/snap.mid || fail "data changed by the package upgrade"
  # The old SQL objects work with the new library until ALTER EXTENSION UPDATE.
  psql_ -d upg -At -c "SELECT extversion FROM pg_extension WHERE extname = '$EXT'" | grep -qx "$vold" || fail "not at $vold"
  psql_ -d upg -c "INSERT INTO orders VALUES (600, 'us', 2, 'between package and ALTER')" \
        -c "SELECT ok FROM audit.verify('$digest')" -At | tail -1 | grep -qx t || fail "verify between package upgrade and ALTER"
  psql_ -d upg -At -f "$T/snapshot.sql" > /tmp/snap.old

  say "ALTER EXTENSION $EXT UPDATE"
  psql_ -d upg -c "ALTER EXTENSION $EXT UPDATE" >/dev/null
  psql_ -d upg -At -f "$T/snapshot.sql" > /tmp/snap.new
  diff -u /tmp/snap.old /tmp/snap.new || fail "data changed by ALTER EXTENSION UPDATE"
  psql_ -d upg -v version="$vnew" -v digest="$digest" -f "$T/api.sql" >/dev/null

  say "compare with a fresh CREATE EXTENSION $EXT (version $vnew)"
  psql_ -d postgres -c 'CREATE DATABASE fresh' >/dev/null
  psql_ -d fresh -c 'SET client_min_messages = warning' -c "CREATE EXTENSION $EXT" >/dev/null
  psql_ -d upg -At -f "$T/catalog.sql" > /tmp/catalog.upgraded
  psql_ -d fresh -At -f "$T/catalog.sql" > /tmp/catalog.fresh
  [ "$(wc -l < /tmp/catalog.fresh)" -gt 50 ] || fail "catalog description too short: $(wc -l < /tmp/catalog.fresh) lines"
  if ! diff -u --label "fresh $vnew" --label "upgraded $vold -> $vnew" /tmp/catalog.fresh /tmp/catalog.upgraded; then
    fail "the upgraded schema differs from a fresh install (diff above): sql/$EXT--$vold--$vnew.sql misses a change"
  fi
  say "upgrade test $vold -> $vnew passed: data intact, verify ok, every function works, schema = fresh install ($(wc -l < /tmp/catalog.fresh) catalog lines)"
  stop_cluster
  dpkg_ --purge postgresql-15-audit-ext
}

case ${1:-} in
  install) shift; cmd_install "$@" ;;
  upgrade) shift; cmd_upgrade "$@" ;;
  *) echo "usage: guest.sh install NEW.deb | upgrade OLD.deb NEW.deb" >&2; exit 2 ;;
esac
