# Sourced by tests/run-tests and tests/demo: start_throwaway_postgres starts a PostgreSQL of its own
# on 127.0.0.1:54329 (installing Debian's package if none is there, when root), exports
# TEST_DATABASE_URL, and stops and removes it when the calling script exits.

start_throwaway_postgres() {
    local initdb
    initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$initdb" ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "No PostgreSQL found. Install one (apt-get install postgresql) or set TEST_DATABASE_URL." >&2
            exit 1
        fi
        echo "No PostgreSQL found: installing Debian's postgresql package" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        initdb=$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)
    fi
    # Globals, not locals: the EXIT trap runs after this function has returned.
    pg_bin=$(dirname "$initdb")
    pg_dir=$(mktemp -d /tmp/aggregator-pg.XXXXXX)
    pg_as=()
    local port=54329
    if [ "$(id -u)" = 0 ]; then  # PostgreSQL refuses to run as root
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
        chown postgres "$pg_dir"
        pg_as=(runuser -u postgres --)
    fi
    "${pg_as[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -A trust -U postgres >/dev/null
    "${pg_as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w \
        -o "-p $port -k $pg_dir -c listen_addresses=127.0.0.1" start >/dev/null
    trap '"${pg_as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null; rm -rf "$pg_dir"' EXIT
    export TEST_DATABASE_URL="postgresql://postgres@127.0.0.1:$port/postgres"
}
