"""Google's OAuth token endpoint and the Search Console API, as ../shared/reference/google.md
records them: refresh-token grants, sites.list, searchAnalytics.query, and their error bodies."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import threading
import time
from base64 import b64decode, urlsafe_b64decode, urlsafe_b64encode
from collections import deque
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import unquote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.hashes import SHA256

from .base import FakeServer, Request, Response

PREFIX = "/webmasters/v3/sites"


@dataclass
class Account:
    refresh_token: str
    properties: dict[str, str] = field(default_factory=dict)  # siteUrl -> permissionLevel
    revoked: bool = False
    recent_queries: deque = field(default_factory=deque)  # arrival times, for the QPM quota
    # Search Console publishes a day as final two to three days late; fresher days are served
    # only to a query with dataState "all", flagged by metadata.firstIncompleteDate.
    final_through: dt.date = field(default_factory=lambda: dt.date.today() - dt.timedelta(days=3))
    client_id: str | None = None  # the OAuth client the refresh token was issued to (None: ours)
    # A quota that is used up: from the account's next query on, every query for `seconds`
    # answers `answer` (all those in flight at once alike, as Google does); None: forever.
    exhausted: tuple[float | None, Response] | None = None
    exhausted_until: float | None = None
    project: str = "oauth-client"  # the Cloud project whose quota its queries count against


@dataclass
class ServiceAccount:
    """A Google Cloud service account: Google holds the public half of each of its keys."""

    email: str
    public_key: RSAPublicKey
    account: Account  # what the service account was added to in Search Console
    secrets: list[str] = field(default_factory=list)  # the private key, for the suite's secret scan
    disabled: bool = False  # disabled in the Cloud console (IAM > Service accounts)
    deleted: bool = False  # the service account itself was deleted


JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_ENDPOINT = "https://oauth2.googleapis.com/token"
# What a consent that allowed everything authorize asks for grants, as Google lists it.
ALL_SCOPES = "openid https://www.googleapis.com/auth/userinfo.email https://www.googleapis.com/auth/webmasters.readonly"


class FakeGoogle(FakeServer):
    """Plays both https://oauth2.googleapis.com/token (at /token) and the Search Console API."""

    def __init__(self, client_id: str, client_secret: str):
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.accounts: dict[str, Account] = {}  # refresh token -> account
        self.service_accounts: dict[str, ServiceAccount] = {}  # client_email -> its key and properties
        self.access_tokens: dict[str, Account] = {}
        self.search: dict[tuple[str, str], tuple[float, float, float, float]] = {}
        # Instead of `search`, a benchmark may generate (clicks, impressions, ctr, position) or None.
        self.search_fn: Callable[[str, str], tuple | None] | None = None
        self.qpm: int | None = None  # answer 429 above this many queries per account per minute
        # Search Console's per-project quota (40,000 a minute): every account authorised through
        # one OAuth client (one Cloud project) counts against it together.
        self.project_qpm: int | None = None
        self.project_queries: dict[str, deque] = {}
        self.api_disabled: set[str] = set()  # Cloud projects without the Search Console API enabled
        # Some token endpoints (proxies, older OAuth servers) echo the request in their error.
        self.echo_input = False
        # Answers without metadata.firstIncompleteDate even where days are not final: Google
        # documents that it sends it whenever the range holds incomplete days, but an answer that
        # disagrees with itself must still never lower a stored final count.
        self.omit_metadata = False
        self.clock_offset = 0.0  # seconds Google's clock is ahead of this machine's (NTP broken here)
        # authorization code -> the refresh token it grants (and the Google account's email, and
        # the scopes the consent granted: an operator may untick some)
        self.codes: dict[str, str | tuple[str, ...]] = {}
        # An access token says it lasts an hour; Google may still end it sooner (a run of two
        # hours outlives it anyway): after this many seconds the API answers 401.
        self.token_lifetime: float | None = None
        self.issued: dict[str, float] = {}  # access token -> when it was issued
        self.odd_entries: list[dict] = []  # added to every sites.list answer, e.g. without siteUrl
        self._numbers = itertools.count(1)
        self._quota_lock = threading.Lock()

    def kind(self, request: Request) -> str:
        if request.path == "/token":
            return "token"
        return "query" if request.path.endswith("/searchAnalytics/query") else "sites.list"

    @property
    def token_uri(self) -> str:
        return self.url + "/token"

    @property
    def api_endpoint(self) -> str:
        return self.url + "/"

    def exhaust(self, account: Account, seconds: float | None, answer: Response | None = None) -> None:
        """The account's quota is used up for `seconds` from its next query (None: all day)."""
        account.exhausted = (seconds, answer or Response(403, QUOTA_EXCEEDED_BODY))
        account.exhausted_until = None

    def add_service_account(self, email: str, public_key: RSAPublicKey, secrets: list[str]) -> Account:
        account = Account(email, project=email.split("@")[1].split(".")[0])
        self.service_accounts[email] = ServiceAccount(email, public_key, account, secrets)
        return account

    def add_account(self, refresh_token: str, properties: dict[str, str]) -> Account:
        account = Account(refresh_token, dict(properties))
        self.accounts[refresh_token] = account
        return account

    def handle_request_of(self, request: Request) -> Response:
        if request.path == "/token" and request.method == "POST":
            return self.token(request.form, request.headers.get("authorization", ""))
        if not request.path.startswith(PREFIX):
            return Response(404, "<html><body>Not Found</body></html>", "text/html")
        access_token = request.headers.get("authorization", "").removeprefix("Bearer ")
        account = self.access_tokens.get(access_token)
        if (
            account
            and self.token_lifetime
            and time.monotonic() - self.issued[access_token] > self.token_lifetime
        ):
            account = None
        if account is None:
            return error(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                "login cookie or other valid authentication credential.",
                "UNAUTHENTICATED",
                "authError",
            )
        rest = request.path[len(PREFIX) :]
        if account.project in self.api_disabled:
            return Response(403, api_disabled_body(account.project))
        if rest == "" and request.method == "GET":
            entries = [{"siteUrl": u, "permissionLevel": p} for u, p in account.properties.items()]
            entries += self.odd_entries
            return Response(200, {"siteEntry": entries} if entries else {})
        if rest.startswith("/") and rest.endswith("/searchAnalytics/query") and request.method == "POST":
            site_url = unquote(rest[1 : -len("/searchAnalytics/query")])
            refused = self.over_quota(account)
            if refused:
                return refused
            return self.query(account, site_url, request.json())
        return Response(404, "<html><body>Not Found</body></html>", "text/html")

    def over_quota(self, account: Account) -> Response | None:
        """The quota error for this query, if any: an exhausted quota, Search Console's per-user
        quota (at most qpm queries in any 60 seconds) or its per-project one (project_qpm)."""
        with self._quota_lock:
            now = time.monotonic()
            if account.exhausted:
                seconds, answer = account.exhausted
                if account.exhausted_until is None:
                    account.exhausted_until = now + seconds if seconds is not None else float("inf")
                if now < account.exhausted_until:
                    self.counts["quota"] += 1
                    return answer
                account.exhausted = None
            project = self.project_queries.setdefault(account.project, deque())
            for recent, limit in ((account.recent_queries, self.qpm), (project, self.project_qpm)):
                while recent and now - recent[0] >= 60:
                    recent.popleft()
                if limit is not None and len(recent) >= limit:
                    self.counts["429"] += 1
                    return Response(429, RATE_LIMIT_BODY if recent is not project else PROJECT_QUOTA_BODY)
            account.recent_queries.append(now)
            project.append(now)
            return None

    def metrics(self, site_url: str, day: str) -> tuple | None:
        if self.search_fn:
            return self.search_fn(site_url, day)
        return self.search.get((site_url, day))

    def token(self, form: dict[str, str], basic: str = "") -> Response:
        if form.get("grant_type") == JWT_BEARER:
            return self.jwt_grant(form.get("assertion", ""))
        # The client id and secret come in the body, or (requests-oauthlib) as HTTP Basic auth.
        if basic.startswith("Basic "):
            form = {
                **form,
                **dict(zip(("client_id", "client_secret"), b64decode(basic[6:]).decode().split(":", 1))),
            }
        if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
            return Response(401, {"error": "invalid_client", "error_description": "Unauthorized"})
        if form.get("grant_type") == "authorization_code":
            return self.exchange(form)
        account = self.accounts.get(form.get("refresh_token", ""))
        if form.get("grant_type") != "refresh_token" or account is None or account.revoked:
            echoed = f" (refresh_token {form.get('refresh_token')})" if self.echo_input else ""
            return Response(
                400,
                {
                    "error": "invalid_grant",
                    "error_description": f"Token has been expired or revoked.{echoed}",
                },
            )
        if account.client_id not in (None, self.client_id):
            return Response(401, {"error": "unauthorized_client", "error_description": "Unauthorized"})
        access_token = f"ya29.fake-{next(self._numbers)}"
        self.access_tokens[access_token] = account
        self.issued[access_token] = time.monotonic()
        return Response(
            200,
            {
                "access_token": access_token,
                "expires_in": 3599,
                "token_type": "Bearer",
                "scope": "https://www.googleapis.com/auth/webmasters.readonly",
            },
        )

    def jwt_grant(self, assertion: str) -> Response:
        """A service account's grant (RFC 7523): a JWT signed with its private key, no client secret.
        Google checks the signature against the public half of the account's keys."""
        try:
            header, payload, signature = assertion.split(".")
            claims = json.loads(unpadded_b64decode(payload))
        except ValueError:
            return Response(400, {"error": "invalid_grant", "error_description": "Invalid JWT: malformed."})
        found = self.service_accounts.get(claims.get("iss", ""))
        if found is None:
            return Response(
                400, {"error": "invalid_grant", "error_description": "Invalid grant: account not found"}
            )
        if found.deleted:
            return Response(
                401, {"error": "deleted_client", "error_description": "The OAuth client was deleted."}
            )
        try:
            found.public_key.verify(
                unpadded_b64decode(signature), f"{header}.{payload}".encode(), PKCS1v15(), SHA256()
            )
        except (InvalidSignature, ValueError):
            return Response(400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
        if found.disabled:
            return Response(400, {"error": "invalid_grant", "error_description": "Robot is disabled."})
        now = time.time() + self.clock_offset
        # The audience is Google's token endpoint, wherever the request was sent.
        if claims.get("aud") != GOOGLE_TOKEN_ENDPOINT or not claims.get("iat", 0) - 300 <= now <= claims.get(
            "exp", 0
        ):
            return Response(
                400,
                {
                    "error": "invalid_grant",
                    "error_description": "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                    "reasonable timeframe. Check your iat and exp values in the JWT claim.",
                },
            )
        access_token = f"ya29.c.fake-{next(self._numbers)}"
        self.access_tokens[access_token] = found.account
        self.issued[access_token] = time.monotonic()
        return Response(200, {"access_token": access_token, "expires_in": 3599, "token_type": "Bearer"})

    def exchange(self, form: dict[str, str]) -> Response:
        """The authorization-code grant of the installed-app flow: a code is good once. The
        consent granted the scopes asked (openid, email, Search Console), so the answer carries
        an OpenID id_token with the account's email."""
        granted = self.codes.pop(form.get("code", ""), None)
        if granted is None or not form.get("code_verifier"):
            return Response(400, {"error": "invalid_grant", "error_description": "Malformed auth code."})
        refresh_token, email, scope = (
            (*granted, ALL_SCOPES)[:3]
            if isinstance(granted, tuple)
            else (granted, "owner@example.com", ALL_SCOPES)
        )
        if refresh_token not in self.accounts:  # the same login again keeps its properties
            self.add_account(refresh_token, {})
        access_token = f"ya29.fake-{next(self._numbers)}"
        self.access_tokens[access_token] = self.accounts[refresh_token]
        return Response(
            200,
            {
                "access_token": access_token,
                "expires_in": 3599,
                "token_type": "Bearer",
                "refresh_token": refresh_token,
                "scope": scope,
                "id_token": id_token(self.client_id, email),
            },
        )

    def query(self, account: Account, site_url: str, body: dict) -> Response:
        if account.properties.get(site_url) in (None, "siteUnverifiedUser"):
            return error(
                403,
                f"User does not have sufficient permission for site '{site_url}'. See also: "
                "https://support.google.com/webmasters/answer/2451999.",
                "PERMISSION_DENIED",
                "forbidden",
            )
        start = dt.date.fromisoformat(body["startDate"])
        end = dt.date.fromisoformat(body["endDate"])
        days = [start + dt.timedelta(n) for n in range((end - start).days + 1)]
        fresh = body.get("dataState", "final").lower() == "all"
        if not fresh:  # a day that is not final yet is omitted, exactly like a day without traffic
            days = [d for d in days if d <= account.final_through]
        found = [(d, m) for d in map(dt.date.isoformat, days) if (m := self.metrics(site_url, d))]
        answer: dict = {"responseAggregationType": "byProperty"}
        if (
            fresh
            and "date" in body.get("dimensions", [])
            and end > account.final_through
            and not self.omit_metadata
        ):
            first_incomplete = account.final_through + dt.timedelta(days=1)
            answer["metadata"] = {"firstIncompleteDate": first_incomplete.isoformat()}
        if body.get("dimensions") == ["date"]:
            rows = [
                {"keys": [d], "clicks": float(c), "impressions": float(i), "ctr": ctr, "position": pos}
                for d, (c, i, ctr, pos) in found
            ]
        elif found:
            clicks = sum(m[0] for _, m in found)
            impressions = sum(m[1] for _, m in found)
            rows = [
                {
                    "clicks": float(clicks),
                    "impressions": float(impressions),
                    "ctr": clicks / impressions if impressions else 0.0,
                    "position": found[0][1][3],
                }
            ]
        else:
            rows = []
        start_row = body.get("startRow", 0)
        rows = rows[start_row : start_row + body.get("rowLimit", 1000)]
        if rows:
            answer["rows"] = rows  # no data: `rows` is absent, not []
        return Response(200, answer)


def unpadded_b64decode(text: str) -> bytes:
    return urlsafe_b64decode(text + "=" * (-len(text) % 4))


def id_token(client_id: str, email: str) -> str:
    """An OpenID id_token as Google's token endpoint sends it: a signed JWT (the signature here is
    not a real one; a client that takes the token straight from the endpoint does not check it)."""

    def part(value: object) -> str:
        return urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {
        "iss": "https://accounts.google.com",
        "aud": client_id,
        "sub": "10769150350006150715113",
        "email": email,
        "email_verified": True,
        "iat": now,
        "exp": now + 3600,
    }
    return f"{part({'alg': 'RS256', 'kid': 'test', 'typ': 'JWT'})}.{part(claims)}.{part('signature')}"


def error(status: int, message: str, state: str, reason: str) -> Response:
    return Response(
        status,
        {
            "error": {
                "code": status,
                "message": message,
                "errors": [{"message": message, "domain": "global", "reason": reason}],
                "status": state,
            }
        },
    )


# The short-term load quota: 403, and googleapiclient does not retry it.
QUOTA_EXCEEDED_BODY = {
    "error": {
        "code": 403,
        "message": "Search Analytics load quota exceeded. Try again later.",
        "errors": [
            {
                "message": "Search Analytics load quota exceeded.",
                "domain": "usageLimits",
                "reason": "quotaExceeded",
            }
        ],
        "status": "PERMISSION_DENIED",
    }
}

RATE_LIMIT_BODY = {
    "error": {
        "errors": [
            {"domain": "usageLimits", "reason": "rateLimitExceeded", "message": "Rate Limit Exceeded"}
        ],
        "code": 429,
        "message": "Rate Limit Exceeded",
    }
}


# The newer form Google's front ends send: the reason only in error.details[], status
# RESOURCE_EXHAUSTED (here: the Cloud project's per-minute quota, shared by its accounts).
PROJECT_QUOTA_BODY = {
    "error": {
        "code": 429,
        "message": "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute' of service "
        "'searchconsole.googleapis.com' for consumer 'project_number:123456789012'.",
        "status": "RESOURCE_EXHAUSTED",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "RATE_LIMIT_EXCEEDED",
                "domain": "googleapis.com",
                "metadata": {"service": "searchconsole.googleapis.com", "quota_limit": "QueriesPerMinute"},
            }
        ],
    }
}


def resource_exhausted(status: int) -> Response:
    """A quota error in the newer form, with the given status (403 or 429)."""
    return Response(status, {"error": {**PROJECT_QUOTA_BODY["error"], "code": status}})


def api_disabled_body(project: str) -> dict:
    """What Google answers every call of a Cloud project that has not enabled the API."""
    message = (
        f"Google Search Console API has not been used in project {project} before or it is disabled. "
        f"Enable it by visiting https://console.developers.google.com/apis/api/searchconsole.googleapis.com/"
        f"overview?project={project} then retry."
    )
    return {
        "error": {
            "code": 403,
            "message": message,
            "errors": [{"message": message, "domain": "usageLimits", "reason": "accessNotConfigured"}],
            "status": "PERMISSION_DENIED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "SERVICE_DISABLED",
                    "domain": "googleapis.com",
                    "metadata": {
                        "service": "searchconsole.googleapis.com",
                        "consumer": f"projects/{project}",
                    },
                }
            ],
        }
    }
