"""The aggregator's settings that point it at a set of running stand-ins."""

from __future__ import annotations

from pathlib import Path

from .google import FakeGoogle
from .matomo import FakeMatomo
from .postgrest import FakePostgrest


def stand_in_settings(gateway: FakePostgrest, matomo: FakeMatomo, google: FakeGoogle) -> dict[str, str]:
    service_key = next(key for key, role in gateway.roles.items() if role == "service_role")
    return {
        "SUPABASE_URL": gateway.url,
        "SUPABASE_SERVICE_ROLE_KEY": service_key,
        "MATOMO_URL": matomo.url,
        "MATOMO_TOKEN_AUTH": matomo.token,
        "GOOGLE_CLIENT_ID": google.client_id,
        "GOOGLE_CLIENT_SECRET": google.client_secret,
        "GOOGLE_TOKEN_URI": google.token_uri,
        "GSC_API_ENDPOINT": google.api_endpoint,
    }


def write_env_file(path: Path, settings: dict[str, str]) -> Path:
    """A .env as an operator keeps it: one NAME=value a line, readable by its owner only."""
    path.write_text("".join(f"{name}={value}\n" for name, value in settings.items()))
    path.chmod(0o600)
    return path
