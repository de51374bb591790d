"""A PostgREST-compatible gateway in front of a real PostgreSQL: the subset supabase-py uses.

Reads (select, eq/neq/gt/gte/lt/lte/is/in filters, order, offset/limit with a max-rows cap) and
bulk inserts (columns, on_conflict, Prefer: resolution / return) become real SQL, so constraints,
types, row level security and ON CONFLICT are Postgres's own. Errors come back as PostgREST's
JSON with its status codes. The key decides the database role, as on Supabase.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from typing import Callable

import psycopg
from psycopg import sql

from .base import FakeServer, Request, Response

RESERVED = {"select", "order", "offset", "limit", "columns", "on_conflict"}
OPERATORS = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
# PostgREST's mapping of SQLSTATE to HTTP status (the part that can happen here).
STATUS_BY_SQLSTATE = {
    "23503": 409,
    "23505": 409,
    "42P01": 404,
    "42501": 403,
    "57014": 500,
    "25006": 405,
    "P0001": 400,
}


class GatewayError(Exception):
    def __init__(self, status: int, code: str, message: str, details=None, hint=None):
        super().__init__(message)
        self.response = Response(status, {"code": code, "details": details, "hint": hint, "message": message})


def selected(item: str) -> sql.Composable:
    """One item of `select`: a column, or `alias:column->>key` (a JSON field as text), as PostgREST
    reads it; a JSON field without an alias is named after its key."""
    found = re.fullmatch(r"(?:(\w+):)?(\w+)(?:->>(\w+))?", item.strip())
    if not found:
        raise GatewayError(400, "PGRST100", f'"failed to parse select parameter ({item})"')
    alias, column, key = found.groups()
    if key is None:
        return sql.Identifier(column)
    return sql.SQL("{} ->> {} as {}").format(
        sql.Identifier(column), sql.Literal(key), sql.Identifier(alias or key)
    )


class FakePostgrest(FakeServer):
    def __init__(self, conninfo: str, service_key: str, anon_key: str, max_rows: int = 1000):
        super().__init__()
        self.conninfo = conninfo
        self.roles = {service_key: "service_role", anon_key: "anon"}
        self.max_rows = max_rows
        self._local = threading.local()
        self._idle: queue.LifoQueue[psycopg.Connection] = queue.LifoQueue()
        # Called with each request before it is served: a test's way to change the data between two
        # requests of a run (a site deleted between two pages of a read).
        self.before: Callable[[Request], None] | None = None
        # Supabase's read-only mode (the disk at 95% of the plan's quota): every write fails with
        # PostgreSQL's own 25006, until someone acts.
        self.read_only = False
        # The API roles' statement_timeout (8 s on Supabase): an upsert of more rows than this takes
        # longer and is cancelled (57014), every time it is sent at that size.
        self.rows_within_timeout: int | None = None
        self.row_cost = 0.0  # seconds per upserted row, on top of the database's own time

    def connection(self) -> psycopg.Connection:
        if getattr(self._local, "conn", None) is None or self._local.conn.closed:
            self._local.conn = psycopg.connect(self.conninfo, autocommit=True)
        return self._local.conn

    def handle_request_of(self, request: Request) -> Response:
        """Each request on a database connection from a pool, as PostgREST keeps one: a server
        thread per HTTP connection (a new one per request under HTTP/1.0) must not cost a new
        PostgreSQL backend each."""
        try:
            self._local.conn = self._idle.get_nowait()
        except queue.Empty:
            self._local.conn = None
        try:
            return self.serve(request)
        finally:
            conn, self._local.conn = self._local.conn, None
            if conn is not None and not conn.closed:
                self._idle.put(conn)

    def kind(self, request: Request) -> str:
        if request.path == "/rest/v1/rpc/store_analytics":
            return "upsert"  # the run's writes of daily_analytics, as the bench counts them
        if request.path.startswith("/rest/v1/rpc/"):
            return "rpc"
        return "upsert" if request.method == "POST" else "select"

    def stop(self) -> None:
        super().stop()
        while not self._idle.empty():
            self._idle.get_nowait().close()

    def serve(self, request: Request) -> Response:
        if self.before:
            self.before(request)
        role = None
        try:
            role = self.role_for(request)
            if request.path.startswith("/rest/v1/rpc/") and request.method == "POST":
                return self.call(role, request.path[len("/rest/v1/rpc/") :], request)
            table = self.table_of(request.path)
            if request.method == "GET":
                return self.select(role, table, request)
            if request.method == "POST":
                return self.insert(role, table, request)
            if request.method == "PATCH":
                return self.update(role, table, request)
            raise GatewayError(405, "PGRST117", f"Unsupported HTTP method: {request.method}")
        except GatewayError as error:
            return error.response
        except psycopg.Error as error:
            diag = error.diag
            state = error.sqlstate or ""
            status = STATUS_BY_SQLSTATE.get(state, 400 if state[:2] in ("22", "23", "42") else 500)
            if state == "42501" and role == "anon":
                status = 401
            return Response(
                status,
                {
                    "code": state,
                    "details": diag.message_detail,
                    "hint": diag.message_hint,
                    "message": diag.message_primary,
                },
            )

    def role_for(self, request: Request) -> str:
        key = request.headers.get("apikey", "")
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if key not in self.roles or bearer not in self.roles:
            raise GatewayError(401, "PGRST301", "JWSError JWSInvalidSignature")
        return self.roles[bearer]

    def table_of(self, path: str) -> str:
        if not path.startswith("/rest/v1/") or "/" in path[len("/rest/v1/") :]:
            raise GatewayError(404, "PGRST125", f"Invalid path specified in request URL: {path}")
        table = path[len("/rest/v1/") :]
        found = self.connection().execute("select to_regclass(%s)", [f"public.{table}"]).fetchone()[0]
        if found is None:
            raise GatewayError(
                404, "PGRST205", f"Could not find the table 'public.{table}' in the schema cache"
            )
        return table

    def columns_of(self, table: str) -> list[str]:
        rows = (
            self.connection()
            .execute(
                "select column_name from information_schema.columns "
                "where table_schema = 'public' and table_name = %s order by ordinal_position",
                [table],
            )
            .fetchall()
        )
        return [r[0] for r in rows]

    def primary_key_of(self, table: str) -> list[str]:
        rows = (
            self.connection()
            .execute(
                "select a.attname from pg_index i join pg_attribute a "
                "on a.attrelid = i.indrelid and a.attnum = any(i.indkey) "
                "where i.indrelid = %s::regclass and i.indisprimary",
                [f"public.{table}"],
            )
            .fetchall()
        )
        return [r[0] for r in rows]

    # -- reads --------------------------------------------------------------

    def select(self, role: str, table: str, request: Request) -> Response:
        params = dict(request.query)
        select = params.pop("select", "*")
        order = params.pop("order", None)
        offset = int(params.pop("offset", 0))
        limit = min(int(params.pop("limit", self.max_rows)), self.max_rows)
        # A column may be filtered twice (date=gte.X&date=lte.Y): every pair is a condition.
        params = [(k, v) for k, v in request.query_pairs if k not in RESERVED]
        columns = sql.SQL("*") if select == "*" else sql.SQL(", ").join(map(selected, select.split(",")))
        where, values = self.filters(params)
        query = sql.SQL("select {} from {}{}{} limit {} offset {}").format(
            columns,
            sql.Identifier("public", table),
            where,
            self.order_by(order),
            sql.Literal(limit),
            sql.Literal(offset),
        )
        wrapped = sql.SQL("select coalesce(json_agg(t), '[]'::json) from ({}) t").format(query)
        # Prefer: count=exact adds the total after the slash (a count(*) with the same filters);
        # a range short of it is 206 Partial Content, an offset past it 416.
        counted = "count=exact" in request.headers.get("prefer", "")
        total_query = sql.SQL("select count(*) from {}{}").format(sql.Identifier("public", table), where)
        conn = self.connection()
        with conn.transaction():
            conn.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
            rows = conn.execute(wrapped, values).fetchone()[0]
            total = conn.execute(total_query, values).fetchone()[0] if counted else "*"
        if counted and offset > total and offset:
            raise GatewayError(
                416,
                "PGRST103",
                "Requested range not satisfiable",
                f"An offset of {offset} was requested, but there are only {total} rows.",
            )
        end = offset + len(rows) - 1
        content_range = f"{offset}-{end}/{total}" if rows else f"*/{total}"
        status = 206 if counted and end + 1 < total else 200
        return Response(status, rows, headers={"Content-Range": content_range})

    def filters(self, params: dict[str, str] | list[tuple[str, str]]) -> tuple[sql.Composable, list]:
        clauses, values = [], []
        for column, expression in params.items() if isinstance(params, dict) else params:
            clause, more = self.condition(sql.Identifier(column), expression)
            clauses.append(clause)
            values.extend(more)
        if not clauses:
            return sql.SQL(""), values
        return sql.SQL(" where ") + sql.SQL(" and ").join(clauses), values

    def condition(self, target: sql.Identifier, expression: str) -> tuple[sql.Composable, list]:
        """One filter as PostgREST reads it: `op.value`, or `not.op.value` for its negation."""
        op, _, value = expression.partition(".")
        if op == "not":
            clause, values = self.condition(target, value)
            return sql.SQL("not ({})").format(clause), values
        if op in OPERATORS:
            return sql.SQL("{} {} %s").format(target, sql.SQL(OPERATORS[op])), [value]
        if op == "is" and value in ("null", "true", "false"):
            return sql.SQL("{} is {}").format(target, sql.SQL(value)), []
        if op == "in" and value.startswith("(") and value.endswith(")"):
            items = [v.strip('"') for v in value[1:-1].split(",")]
            placeholders = sql.SQL(", ").join(sql.Placeholder() for _ in items)
            return sql.SQL("{} in ({})").format(target, placeholders), items
        raise GatewayError(400, "PGRST100", f'"failed to parse filter ({expression})"')

    def order_by(self, order: str | None) -> sql.Composable:
        if not order:
            return sql.SQL("")
        terms = []
        for term in order.split(","):
            column, *modifiers = term.split(".")
            words = [
                {"asc": "asc", "desc": "desc", "nullsfirst": "nulls first", "nullslast": "nulls last"}[m]
                for m in modifiers
            ]
            terms.append(sql.SQL(" ").join([sql.Identifier(column), *map(sql.SQL, words)]))
        return sql.SQL(" order by ") + sql.SQL(", ").join(terms)

    # -- functions ----------------------------------------------------------

    def call(self, role: str, name: str, request: Request) -> Response:
        """POST /rpc/NAME with the arguments as a JSON object: a function returning a set answers
        its rows (capped at max-rows like any read), one returning a value answers that value.
        As PostgREST does, the body goes to PostgreSQL as it came (json_to_record, each argument
        typed as the function declares it): its values are never decoded and encoded again here."""
        body = request.body.decode() or "{}"
        conn = self.connection()
        keys, rows = conn.execute(  # the body's keys and the rows it carries, the body parsed once
            "select coalesce(array_agg(key), '{}'), coalesce(sum(json_array_length(value)) filter "
            "(where key = 'p_rows' and json_typeof(value) = 'array'), 0)::int from json_each(%s::json)",
            [body],
        ).fetchone()
        found = conn.execute(
            "select p.proretset, p.proargnames, p.proargtypes::oid[]::regtype[]::text[] from pg_proc p "
            "join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'public' and p.proname = %s",
            [name],
        ).fetchone()
        types = dict(zip(found[1] or [], found[2])) if found else {}
        if found is None or any(key not in types for key in keys):
            raise GatewayError(
                404,
                "PGRST202",
                f"Could not find the function public.{name}({', '.join(sorted(keys))}) in the schema cache",
            )
        if self.row_cost:  # the rows store_analytics writes
            time.sleep(self.row_cost * rows)
        if self.rows_within_timeout is not None and rows > self.rows_within_timeout:
            raise GatewayError(500, "57014", "canceling statement due to statement timeout")
        named = sql.SQL(", ").join(sql.SQL("{0} => a.{0}").format(sql.Identifier(key)) for key in keys)
        record = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(key), sql.SQL(types[key])) for key in keys
        )
        function = sql.SQL("{}({})").format(sql.Identifier("public", name), named)
        source = (
            sql.SQL("json_to_record(%s::json) as a({})").format(record) if keys else sql.SQL("(select) a")
        )
        if found[0]:
            query = sql.SQL(
                "select coalesce(json_agg(t), '[]'::json) from (select r.* from {}, lateral {} r limit {}) t"
            ).format(source, function, sql.Literal(self.max_rows))
        else:
            query = sql.SQL("select to_json({}) from {}").format(function, source)
        with conn.transaction():
            conn.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
            if self.read_only:
                conn.execute("set local transaction_read_only = on")
            value = conn.execute(query, [body] if keys else []).fetchone()[0]
        return Response(200, value if isinstance(value, (dict, list)) else json.dumps(value))

    # -- writes -------------------------------------------------------------

    def update(self, role: str, table: str, request: Request) -> Response:
        body = request.json()
        params = {k: v for k, v in request.query.items() if k not in ("select", "columns")}
        where, values = self.filters(params)
        names = sql.SQL(", ").join(map(sql.Identifier, body))
        target = sql.Identifier("public", table)
        statement = sql.SQL(
            "update {} set ({}) = (select {} from json_populate_record(null::{}, %s::json)){} returning *"
        ).format(target, names, names, target, where)
        statement = sql.SQL("with upd as ({}) select coalesce(json_agg(upd), '[]'::json) from upd").format(
            statement
        )
        conn = self.connection()
        with conn.transaction():
            conn.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
            rows = conn.execute(statement, [json.dumps(body), *values]).fetchone()[0]
        if "return=representation" in request.headers.get("prefer", ""):
            return Response(200, rows)
        return Response(204, b"", content_type="text/plain")

    def insert(self, role: str, table: str, request: Request) -> Response:
        prefer = {
            k.strip(): v.strip()
            for k, _, v in (p.partition("=") for p in request.headers.get("prefer", "").split(","))
            if k.strip()
        }
        known = self.columns_of(table)
        if "columns" in request.query:
            # Named columns: PostgREST hands the body to PostgreSQL unparsed (a bulk body can be
            # megabytes), and PostgreSQL rejects what is not JSON.
            columns = [c.strip().strip('"') for c in request.query["columns"].split(",")]
            payload = request.body.decode()
        else:
            body = request.json()
            rows = body if isinstance(body, list) else [body]
            columns = list(rows[0]) if rows else []
            if any(set(r) != set(columns) for r in rows):
                raise GatewayError(400, "PGRST102", "All object keys must match")
            payload = json.dumps(rows)
        for column in columns:
            if column not in known:
                raise GatewayError(
                    400, "PGRST204", f"Could not find the '{column}' column of '{table}' in the schema cache"
                )
        target = sql.Identifier("public", table)
        names = sql.SQL(", ").join(map(sql.Identifier, columns))
        statement = sql.SQL(
            # PostgREST's own wrapping: a lone object is a one-row array.
            "insert into {} ({}) select {} from json_populate_recordset(null::{}, (select case "
            "when json_typeof(j) = 'array' then j else json_build_array(j) end from (select %s::json as j) p))"
        ).format(target, names, names, target)
        resolution = prefer.get("resolution")
        if resolution:
            conflict = request.query.get("on_conflict")
            keys = [c.strip() for c in conflict.split(",")] if conflict else self.primary_key_of(table)
            updates = [c for c in columns if c not in keys]
            if resolution == "merge-duplicates" and updates:
                action = sql.SQL("do update set ") + sql.SQL(", ").join(
                    sql.SQL("{} = excluded.{}").format(sql.Identifier(c), sql.Identifier(c)) for c in updates
                )
            else:
                action = sql.SQL("do nothing")
            statement += (
                sql.SQL(" on conflict ({}) ").format(sql.SQL(", ").join(map(sql.Identifier, keys))) + action
            )
        representation = prefer.get("return") == "representation"
        if representation:
            statement += sql.SQL(" returning *")
            statement = sql.SQL(
                "with ins as ({}) select coalesce(json_agg(ins), '[]'::json) from ins"
            ).format(statement)
        if self.row_cost:  # PostgreSQL's own work per row (a benchmark's cost model)
            time.sleep(self.row_cost * len(json.loads(payload)))
        if self.rows_within_timeout is not None and len(json.loads(payload)) > self.rows_within_timeout:
            raise GatewayError(500, "57014", "canceling statement due to statement timeout")
        conn = self.connection()
        with conn.transaction():
            conn.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
            if self.read_only:
                conn.execute("set local transaction_read_only = on")
            cursor = conn.execute(statement, [payload])
            result = cursor.fetchone()[0] if representation else None
        if representation:
            return Response(201, result)
        return Response(201, b"", content_type="text/plain")
