"""A throwaway PostgreSQL database shaped like a Supabase project: its API roles, their default
grants, and our migrations."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = sorted((ROOT / "supabase" / "migrations").glob("*.sql"))
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

# What Supabase sets up before any migration: its API roles and their default grants. Roles and
# role memberships belong to the whole server, not to one database: test processes side by side
# (pytest-xdist) create them under one advisory lock, or both see none and both create it. A role
# of the same name that another project made is made what Supabase has: only service_role
# bypasses row level security.
SUPABASE_ROLES = """
do $$ begin
  perform pg_advisory_xact_lock(7243011);
  if not exists (select from pg_roles where rolname = 'anon') then
    create role anon nologin;
  end if;
  if not exists (select from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin;
  end if;
  if not exists (select from pg_roles where rolname = 'service_role') then
    create role service_role nologin bypassrls;
  end if;
  if not (select rolbypassrls from pg_roles where rolname = 'service_role') then
    alter role service_role bypassrls;
  end if;
  if exists (select from pg_roles where rolname in ('anon', 'authenticated') and rolbypassrls) then
    alter role anon nobypassrls;
    alter role authenticated nobypassrls;
  end if;
  if not pg_has_role(current_user, 'service_role', 'member')
     or not pg_has_role(current_user, 'anon', 'member')
     or not pg_has_role(current_user, 'authenticated', 'member') then
    grant anon, authenticated, service_role to current_user;
  end if;
end $$;
"""
SUPABASE_GRANTS = """
grant usage on schema public to anon, authenticated, service_role;
alter default privileges in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences to anon, authenticated, service_role;
"""
SUPABASE_BOOTSTRAP = SUPABASE_ROLES + SUPABASE_GRANTS


def server_url() -> str:
    return os.environ.get("TEST_DATABASE_URL", DEFAULT_DATABASE_URL)


def create_database(admin: psycopg.Connection, url: str, name: str) -> str:
    """A fresh database `name` with the roles and the migrations; returns its conninfo."""
    admin.execute(f"drop database if exists {name} with (force)")
    admin.execute(f"create database {name}")
    admin.execute(SUPABASE_ROLES)  # on the one database every test process shares: one lock
    conninfo = make_conninfo(url, dbname=name)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(SUPABASE_GRANTS)
        for migration in MIGRATIONS:
            conn.execute(migration.read_text())
    return conninfo


def drop_database(admin: psycopg.Connection, name: str) -> None:
    admin.execute(f"drop database if exists {name} with (force)")
