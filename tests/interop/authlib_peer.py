"""Interop peer: Authlib's Flask AuthorizationServer + ResourceProtector, in memory.

  POST /oauth/token             password, refresh_token and client_credentials grants, client auth
                                client_secret_basic; client_credentials issues no refresh token
  GET|POST|... /api/<path>      RFC 9068 JWT bearer protected (ResourceProtector); echoes the request
  POST /_admin/forget-refresh   forget every refresh token (also: SIGHUP)
  POST /_admin/revoke-access    at the next API request, a new signing key: every access token
                                issued until then fails (so that request meets a 401 invalid_token)
  GET  /_admin/stats            {"password": n, "refresh_token": m, ...}
  GET  /_admin/health           200 once serving

Env: PORT (required), HOST (127.0.0.1), CLIENT_ID, CLIENT_SECRET, USERNAME, PASSWORD,
     ACCESS_TTL (seconds, 3), REFRESH_TTL (seconds, 60),
     ROTATE (0: Authlib's default, the refresh grant answers without a refresh_token and the
             old one stays valid; 1: a new refresh token is issued and the old one revoked),
     EXTRA_CLIENTS (optional, "id:secret,id2:secret2": more clients; the first ':' splits).
Access tokens are JWTs (RS256, typ at+jwt, exp = int(now) + ACCESS_TTL) signed with a key
generated at start-up; nothing is written to disk.
"""

import json
import os
import signal
import sys
import threading
import time
import uuid

from authlib.common.security import generate_token
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.integrations.flask_oauth2 import ResourceProtector
from authlib.integrations.flask_oauth2 import current_token
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator
from authlib.oauth2.rfc9068 import JWTBearerTokenValidator
from flask import Flask
from flask import jsonify
from flask import request
from joserfc.jwk import RSAKey

HOST = os.environ.get("HOST", "127.0.0.1")
PORT = int(os.environ["PORT"])
ACCESS_TTL = int(os.environ.get("ACCESS_TTL", "3"))
REFRESH_TTL = int(os.environ.get("REFRESH_TTL", "60"))
ROTATE = os.environ.get("ROTATE", "0") == "1"
ISSUER = f"http://{HOST}:{PORT}/"
RESOURCE = "token-sidecar-interop-api"
QUIET = bool(os.environ.get("QUIET"))

CLIENTS = {os.environ.get("CLIENT_ID", "interop-client"): os.environ.get("CLIENT_SECRET", "interop-client-secret")}
for pair in filter(None, os.environ.get("EXTRA_CLIENTS", "").split(",")):
    cid, _, secret = pair.partition(":")
    CLIENTS[cid] = secret
USERS = {os.environ.get("USERNAME", "backoffice"): os.environ.get("PASSWORD", "backoffice-password")}

KEY = RSAKey.generate_key(2048)
lock = threading.Lock()
refresh_tokens = {}  # refresh token -> RefreshRecord (live ones only)
stats = {
    "password": 0,  # successful grants by type
    "refresh_token": 0,
    "client_credentials": 0,
    "rejected": {},  # "<grant>:<error>" -> n
    "refresh_reuses": 0,  # successful refresh grants presenting a refresh token used before
    "refresh_chain_max": 0,  # rotation only: longest password->refresh->refresh chain
    "forgets": 0,
    "access_revocations": 0,
    "api": {},  # status -> n
    "rotate": ROTATE,
}


def log(*args):
    if not QUIET:
        print(time.strftime("%H:%M:%S"), *args, flush=True)


class User:
    def __init__(self, username):
        self.username = username

    def get_user_id(self):
        return self.username


class Client:
    def __init__(self, client_id, secret):
        self.client_id = client_id
        self.secret = secret

    def get_client_id(self):
        return self.client_id

    def check_client_secret(self, client_secret):
        return client_secret == self.secret

    def check_endpoint_auth_method(self, method, endpoint):
        # client_secret_basic only (what the grants' TOKEN_ENDPOINT_AUTH_METHODS allow anyway)
        return endpoint == "token" and method == "client_secret_basic"

    def check_grant_type(self, grant_type):
        return grant_type in ("password", "refresh_token", "client_credentials")

    def get_allowed_scope(self, scope):
        # Default scope when none is requested: Authlib's RFC 9068 generator writes
        # "scope": "" for an empty scope, and its own validator then rejects the token.
        return scope or "api"


class RefreshRecord:
    def __init__(self, client_id, username, scope, chain):
        self.client_id = client_id
        self.username = username
        self.scope = scope
        self.chain = chain
        self.expires_at = time.time() + REFRESH_TTL
        self.uses = 0

    def check_client(self, client):
        return client.get_client_id() == self.client_id

    def get_scope(self):
        return self.scope

    def is_expired(self):
        return time.time() >= self.expires_at

    def is_revoked(self):
        return False


def query_client(client_id):
    secret = CLIENTS.get(client_id)
    return Client(client_id, secret) if secret is not None else None


def save_token(token, req):
    rt = token.get("refresh_token")
    if rt:
        parent = getattr(req, "refresh_token", None)
        chain = parent.chain + 1 if parent is not None else 0
        with lock:
            now = time.time()
            for k in [k for k, r in refresh_tokens.items() if r.expires_at < now]:
                del refresh_tokens[k]
            refresh_tokens[rt] = RefreshRecord(req.client.get_client_id(), req.user.username, token.get("scope", ""), chain)


class PasswordGrant(grants.ResourceOwnerPasswordCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic"]

    def authenticate_user(self, username, password):
        if username in USERS and USERS[username] == password:
            return User(username)
        return None


class ClientCredentialsGrant(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic"]


class RefreshTokenGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic"]
    INCLUDE_NEW_REFRESH_TOKEN = ROTATE

    def authenticate_refresh_token(self, refresh_token):
        with lock:
            rec = refresh_tokens.get(refresh_token)
        if rec is not None and not rec.is_expired():
            return rec
        return None

    def authenticate_user(self, refresh_token):
        return User(refresh_token.username)

    def revoke_old_credential(self, refresh_token):
        with lock:
            refresh_token.uses += 1
            if refresh_token.uses > 1:
                stats["refresh_reuses"] += 1
            stats["refresh_chain_max"] = max(stats["refresh_chain_max"], refresh_token.chain + 1)
            if ROTATE:
                for k, r in list(refresh_tokens.items()):
                    if r is refresh_token:
                        del refresh_tokens[k]


class TokenGenerator(JWTBearerTokenGenerator):
    def get_jwks(self):
        return KEY  # read at each call: /_admin/revoke-access swaps it

    def get_audiences(self, client, user, scope):
        return RESOURCE


class TokenValidator(JWTBearerTokenValidator):
    def get_jwks(self):
        return KEY


app = Flask(__name__)
server = AuthorizationServer(app, query_client=query_client, save_token=save_token)
server.register_token_generator(
    "default",
    TokenGenerator(
        issuer=ISSUER,
        refresh_token_generator=lambda **kw: generate_token(48),
        expires_generator=lambda client, grant_type: ACCESS_TTL,
    ),
)
server.register_grant(PasswordGrant)
server.register_grant(RefreshTokenGrant)
server.register_grant(ClientCredentialsGrant)
require_oauth = ResourceProtector()
require_oauth.register_token_validator(TokenValidator(issuer=ISSUER, resource_server=RESOURCE, realm="interop"))


@app.post("/oauth/token")
def issue_token():
    grant = request.form.get("grant_type", "")
    resp = server.create_token_response()
    with lock:
        if resp.status_code == 200:
            if grant in ("password", "refresh_token", "client_credentials"):
                stats[grant] += 1
        else:
            try:
                err = json.loads(resp.get_data()).get("error")
            except ValueError:
                err = "?"
            key = f"{grant}:{err}"
            stats["rejected"][key] = stats["rejected"].get(key, 0) + 1
    log("token", grant, resp.status_code, "" if resp.status_code == 200 else resp.get_data(as_text=True))
    return resp


METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


@app.route("/api", methods=METHODS, defaults={"path": ""})
@app.route("/api/<path:path>", methods=METHODS)
@require_oauth()
def api(path):
    return jsonify(
        method=request.method,
        path=request.path,
        query=request.query_string.decode(),
        headers=dict(request.headers),
        body=request.get_data(as_text=True),
        token={"sub": current_token["sub"], "client_id": current_token["client_id"], "exp": current_token["exp"]},
    )


@app.after_request
def count_api(resp):
    if request.path == "/api" or request.path.startswith("/api/"):
        with lock:
            k = str(resp.status_code)
            stats["api"][k] = stats["api"].get(k, 0) + 1
        if resp.status_code != 200:
            log("api", request.method, request.path, resp.status_code, resp.headers.get("WWW-Authenticate"))
    return resp


def forget_refresh(*_):
    with lock:
        n = len(refresh_tokens)
        refresh_tokens.clear()
        stats["forgets"] += 1
    log("forgot", n, "refresh token(s)")
    return n


signal.signal(signal.SIGHUP, forget_refresh)


@app.post("/_admin/forget-refresh")
def admin_forget():
    return jsonify(forgotten=forget_refresh())


revoke_at_next_request = False


@app.post("/_admin/revoke-access")
def admin_revoke_access():
    global revoke_at_next_request
    revoke_at_next_request = True
    return jsonify(armed=True)


@app.before_request
def revoke_access():
    global KEY, revoke_at_next_request
    if not (request.path == "/api" or request.path.startswith("/api/")):
        return
    with lock:
        if not revoke_at_next_request:
            return
        revoke_at_next_request = False
        KEY = RSAKey.generate_key(2048)
        stats["access_revocations"] += 1
    log("new signing key: access tokens issued so far are invalid")


@app.get("/_admin/stats")
def admin_stats():
    with lock:
        return jsonify(stats)


@app.get("/_admin/health")
def admin_health():
    return jsonify(ok=True)


if __name__ == "__main__":
    import authlib
    import waitress

    print(
        f"authlib-peer listening on http://{HOST}:{PORT} (Authlib {authlib.__version__}, "
        f"access {ACCESS_TTL}s, refresh {REFRESH_TTL}s, rotate {ROTATE}, run {uuid.uuid4().hex[:8]})",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    waitress.serve(app, host=HOST, port=PORT, threads=8, ident="authlib-peer", _quiet=True)
