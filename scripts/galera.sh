#!/usr/bin/env bash
# A three-node MariaDB Galera Cluster on this machine, for tests/galera.py and bench/galera.py.
#
#   scripts/galera.sh start        # all three nodes (idempotent), database `test` created
#   scripts/galera.sh stop         # every node, by PID
#   scripts/galera.sh status       # cluster size as each node sees it
#   scripts/galera.sh kill N       # SIGKILL node N (1-3): a crash, not a shutdown
#   scripts/galera.sh start-node N # (re)start node N; it rejoins by IST/SST
#
# Node N listens on 127.0.0.1:3306N (client; 33061-33063), 2467N (Galera), 2468N (IST),
# 2469N (SST, rsync), below Linux's ephemeral ports (32768+): a node could not bind a port
# an outgoing connection happens to use. Under $GALERA_ROOT/nodeN (default /tmp/sqlr-galera). Needs the Debian
# packages galera-4 and mariadb-server (and rsync for state transfers).
set -euo pipefail

ROOT=${GALERA_ROOT:-/tmp/sqlr-galera}
PROVIDER=${GALERA_PROVIDER:-$(dpkg -L galera-4 2>/dev/null | grep -m1 'libgalera_smm\.so$' || true)}
NODES=(1 2 3)
# As root, the nodes run as `mysql`: the rsync SST daemon drops root for `nobody` otherwise.
OWNER=""; [ "$(id -u)" = 0 ] && id mysql >/dev/null 2>&1 && OWNER=mysql
CLUSTER="gcomm://127.0.0.1:24671,127.0.0.1:24672,127.0.0.1:24673"

port() { echo "3306$1"; }
dir() { echo "$ROOT/node$1"; }
pid_of() { cat "$(dir "$1")/mysqld.pid" 2>/dev/null || true; }
# Running, not a zombie: a killed node whose parent is gone may wait unreaped for a while.
alive() {
    local pid; pid=$(pid_of "$1")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(ps -o stat= -p "$pid" | cut -c1)" != Z ]
}
sql() { mariadb --protocol=tcp -h 127.0.0.1 -P "$(port "$1")" -uroot -N -B -e "$2"; }
ready() { [ "$(sql "$1" "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME='WSREP_READY'" 2>/dev/null)" = "ON" ]; }

install_node() {
    local d; d=$(dir "$1")
    [ -d "$d/data/mysql" ] && return 0
    mkdir -p "$ROOT" "$d"
    [ -n "$OWNER" ] && chown "$OWNER" "$ROOT" "$d"
    mariadb-install-db --no-defaults --datadir="$d/data" --user="${OWNER:-$(id -un)}" \
        --auth-root-authentication-method=normal --skip-test-db >"$d/install.log" 2>&1
}

options() {  # N: the node's mariadbd options
    local n=$1 d; d=$(dir "$1")
    local user=(); [ -n "$OWNER" ] && user=(--user="$OWNER")
    echo --no-defaults --datadir="$d/data" --port="$(port "$n")" \
        --bind-address=127.0.0.1 --socket="$d/mysqld.sock" --pid-file="$d/mysqld.pid" \
        --skip-name-resolve --skip-grant-tables "${user[@]}" \
        --innodb-buffer-pool-size=64M --innodb-flush-log-at-trx-commit=0 \
        --innodb-log-file-size=48M --max-connections=300 \
        --binlog-format=ROW --innodb-autoinc-lock-mode=2 --default-storage-engine=InnoDB \
        --wsrep-on=ON --wsrep-provider="$PROVIDER" --wsrep-cluster-name=sqlr-galera \
        --wsrep-cluster-address="$CLUSTER" --wsrep-node-name="node$n" \
        --wsrep-node-address="127.0.0.1:2467$n" --wsrep-sst-method=rsync \
        --wsrep-sst-receive-address="127.0.0.1:2469$n" \
        "--wsrep-provider-options=gmcast.listen_addr=tcp://127.0.0.1:2467$n;ist.recv_addr=127.0.0.1:2468$n;gcache.size=128M;gcache.recover=yes"
}

launch() {  # N [extra options]: start mariadbd, wait until the node is synced
    local n=$1; shift
    local d; d=$(dir "$n")
    # shellcheck disable=SC2046  # options has no spaces inside a word
    setsid mariadbd $(options "$n") "$@" >>"$d/server.log" 2>&1 </dev/null &
    local launched=$!
    for _ in $(seq 1 240); do
        ready "$n" && return 0
        kill -0 "$launched" 2>/dev/null || break
        sleep 0.5
    done
    return 1
}

start_node() {  # N [--wsrep-new-cluster]
    local n=$1; shift
    local d; d=$(dir "$n")
    alive "$n" && return 0
    [ -n "$PROVIDER" ] || { echo "galera: no libgalera_smm.so: apt-get install -y galera-4" >&2; exit 1; }
    install_node "$n"
    # A node that crashed leaves safe_to_bootstrap: 0; only a bootstrap needs it set.
    if [ "${1:-}" = "--wsrep-new-cluster" ] && [ -f "$d/data/grastate.dat" ]; then
        sed -i 's/^safe_to_bootstrap: 0/safe_to_bootstrap: 1/' "$d/data/grastate.dat"
    fi
    # A killed node leaves its SST daemon's files behind; the next SST's daemon would fail.
    rm -f "$d/data/rsync_sst.pid" "$d/data/rsync_sst.conf" "$d/data/stunnel.pid"
    # A crashed node does not know its position (seqno: -1): recover it from InnoDB, as
    # galera_recovery does, so it rejoins by IST from the donors' gcache instead of a full SST.
    local start=()
    if grep -q '^seqno: *-1' "$d/data/grastate.dat" 2>/dev/null; then
        # shellcheck disable=SC2046
        mariadbd $(options "$n") --wsrep-recover --log-error="$d/recover.log" >/dev/null 2>&1 || true
        local pos; pos=$(grep -o 'Recovered position: [^ ]*' "$d/recover.log" | tail -n1 | cut -d' ' -f3)
        [ -n "$pos" ] && start=(--wsrep-start-position="$pos")
    fi
    launch "$n" "${start[@]}" "$@" && return 0
    echo "galera: node $n did not become ready, trying once more; see $d/server.log" >&2
    rm -f "$d/data/rsync_sst.pid" "$d/data/rsync_sst.conf" "$d/data/stunnel.pid"
    sleep 2
    launch "$n" "$@" && return 0
    echo "galera: node $n did not become ready; see $d/server.log" >&2
    tail -n 30 "$d/server.log" >&2
    return 1
}

stop_node() {
    local pid; pid=$(pid_of "$1")
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
}

case "${1:-}" in
start)
    if alive 1 || alive 2 || alive 3; then
        for n in "${NODES[@]}"; do start_node "$n"; done
    else
        start_node 1 --wsrep-new-cluster
        start_node 2
        start_node 3
    fi
    sql 1 "CREATE DATABASE IF NOT EXISTS test"
    echo "galera: cluster up, size $(sql 1 "SHOW STATUS LIKE 'wsrep_cluster_size'" | cut -f2)"
    ;;
stop)
    for n in 3 2 1; do stop_node "$n"; done
    ;;
status)
    for n in "${NODES[@]}"; do
        echo "node$n: $(sql "$n" "SHOW STATUS LIKE 'wsrep_cluster_size'" 2>/dev/null | cut -f2 || echo down)"
    done
    ;;
kill)
    pid=$(pid_of "$2"); [ -n "$pid" ] && kill -9 "$pid"
    ;;
start-node)
    start_node "$2"
    ;;
*)
    echo "usage: $0 start|stop|status|kill N|start-node N" >&2
    exit 2
    ;;
esac
