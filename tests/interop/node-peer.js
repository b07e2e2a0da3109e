'use strict';
// Interop peer: @node-oauth/oauth2-server behind a bare node:http server.
//
//   POST /oauth/token            password, refresh_token and client_credentials grants (client auth:
//                                HTTP Basic or body); client_credentials issues no refresh token
//   GET|POST|... /api/*          bearer-protected; echoes the request as JSON
//   POST /_admin/forget-refresh  forget every refresh token (also: SIGHUP)
//   POST /_admin/revoke-access   at the next API request, revoke every access token issued until
//                                then (so that request meets a 401 invalid_token, whatever the timing)
//   GET  /_admin/stats           {"password": n, "refresh_token": m, ...}
//   GET  /_admin/health          200 once listening
//
// Env: PORT (required), HOST (127.0.0.1), CLIENT_ID, CLIENT_SECRET, USERNAME, PASSWORD,
//      ACCESS_TTL (seconds, 3), REFRESH_TTL (seconds, 60), QUIET (no per-request log),
//      EXTRA_CLIENTS (optional, "id:secret,id2:secret2": more clients; the first ':' splits).
// Refresh-token rotation is on (the library default, alwaysIssueNewRefreshToken): the
// refresh token presented is revoked and a new one issued.

const http = require('node:http');
const crypto = require('node:crypto');
const OAuth2Server = require('@node-oauth/oauth2-server');
const { Request, Response } = OAuth2Server;

const env = process.env;
const HOST = env.HOST || '127.0.0.1';
const PORT = Number(env.PORT);
if (!PORT) {
  console.error('node-peer: PORT is required');
  process.exit(2);
}
const ACCESS_TTL = Number(env.ACCESS_TTL || 3);
const REFRESH_TTL = Number(env.REFRESH_TTL || 60);
const CLIENTS = new Map([[env.CLIENT_ID || 'interop-client', env.CLIENT_SECRET || 'interop-client-secret']]);
for (const pair of (env.EXTRA_CLIENTS || '').split(',').filter(Boolean)) {
  const i = pair.indexOf(':');
  CLIENTS.set(pair.slice(0, i), pair.slice(i + 1));
}
const GRANTS = ['password', 'refresh_token', 'client_credentials'];
const USER = {
  id: 'u1',
  username: env.USERNAME || 'backoffice',
  password: env.PASSWORD || 'backoffice-password',
};

const accessTokens = new Map(); // token -> record
const refreshTokens = new Map(); // token -> record (only live, unrevoked ones)
const revokedRefresh = new Set(); // rotated-away refresh tokens (to tell reuse from unknown)
const stats = {
  password: 0, // successful grants by type
  refresh_token: 0,
  client_credentials: 0,
  rejected: {}, // "<grant>:<error>" -> n
  refresh_chain_max: 0, // longest password->refresh->refresh... chain seen
  refresh_reused_revoked: 0, // refresh grants presenting an already-rotated token
  forgets: 0,
  access_revocations: 0,
  api: {}, // status -> n
};

function log(...args) {
  if (!env.QUIET) console.log(new Date().toISOString(), ...args);
}

function prune() {
  const now = Date.now();
  for (const [k, t] of accessTokens) if (t.accessTokenExpiresAt.getTime() < now - 60000) accessTokens.delete(k);
  for (const [k, t] of refreshTokens) if (t.refreshTokenExpiresAt.getTime() < now - 60000) refreshTokens.delete(k);
}

const model = {
  async getClient(clientId, clientSecret) {
    // The library takes the HTTP Basic credentials as they are (no percent-decoding).
    if (!CLIENTS.has(clientId)) return null;
    if (clientSecret != null && clientSecret !== CLIENTS.get(clientId)) return null;
    return { id: clientId, grants: GRANTS };
  },
  async getUserFromClient(client) {
    // The client_credentials grant: the client acts for itself.
    return { id: 'client:' + client.id, username: client.id };
  },
  async getUser(username, password) {
    if (username === USER.username && password === USER.password) return { id: USER.id, username };
    return null;
  },
  async generateAccessToken() {
    return 'at_' + crypto.randomBytes(20).toString('hex');
  },
  async generateRefreshToken() {
    return 'rt_' + crypto.randomBytes(20).toString('hex');
  },
  async saveToken(token, client, user) {
    prune();
    // The refresh grant passes the user of the presented refresh token back to saveToken:
    // getRefreshToken tags it with that token's chain depth.
    const chain = user.chain == null ? 0 : user.chain + 1;
    const rec = { ...token, client, user: { id: user.id, username: user.username }, chain };
    accessTokens.set(token.accessToken, rec);
    if (token.refreshToken) refreshTokens.set(token.refreshToken, rec);
    return rec;
  },
  async getAccessToken(accessToken) {
    return accessTokens.get(accessToken) || null;
  },
  async getRefreshToken(refreshToken) {
    const rec = refreshTokens.get(refreshToken);
    if (!rec) {
      if (revokedRefresh.has(refreshToken)) stats.refresh_reused_revoked++;
      return null;
    }
    return { ...rec, user: { ...rec.user, chain: rec.chain } };
  },
  async revokeToken(token) {
    const had = refreshTokens.delete(token.refreshToken);
    if (had) revokedRefresh.add(token.refreshToken);
    return had;
  },
};

const oauth = new OAuth2Server({
  model,
  accessTokenLifetime: ACCESS_TTL,
  refreshTokenLifetime: REFRESH_TTL,
  alwaysIssueNewRefreshToken: true,
});

function send(res, status, body, headers = {}) {
  const data = typeof body === 'string' ? body : JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': typeof body === 'string' ? 'text/plain' : 'application/json',
    'Content-Length': Buffer.byteLength(data),
    ...headers,
  });
  res.end(data);
}

function forgetRefresh() {
  const n = refreshTokens.size;
  refreshTokens.clear();
  stats.forgets++;
  log('forgot', n, 'refresh token(s)');
  return n;
}
process.on('SIGHUP', forgetRefresh);

async function handleToken(req, res, url, raw) {
  const body = Object.fromEntries(new URLSearchParams(raw.toString('utf8')));
  const request = new Request({
    headers: req.headers,
    method: req.method,
    query: Object.fromEntries(url.searchParams),
    body,
  });
  const response = new Response({});
  const grant = String(body.grant_type || '');
  try {
    const tok = await oauth.token(request, response);
    if (GRANTS.includes(grant)) stats[grant]++;
    if (grant === 'refresh_token') stats.refresh_chain_max = Math.max(stats.refresh_chain_max, tok.chain);
    log('token', grant, 'ok chain', tok.chain);
  } catch (e) {
    const key = grant + ':' + (response.body && response.body.error);
    stats.rejected[key] = (stats.rejected[key] || 0) + 1;
    log('token', grant, 'rejected', response.status, JSON.stringify(response.body));
  }
  send(res, response.status, response.body, response.headers);
}

let revokeAtNextRequest = false;
async function handleApi(req, res, url, raw) {
  if (revokeAtNextRequest) {
    revokeAtNextRequest = false;
    stats.access_revocations++;
    log('revoked', accessTokens.size, 'access token(s)');
    accessTokens.clear();
  }
  // The body is echoed, not parsed: only the Authorization header can carry the token.
  const request = new Request({ headers: req.headers, method: req.method, query: {}, body: {} });
  const response = new Response({});
  let status = 200;
  let out;
  try {
    const tok = await oauth.authenticate(request, response);
    out = {
      method: req.method,
      path: url.pathname,
      query: url.search,
      headers: req.headers,
      body: raw.toString('utf8'),
      token: { user: tok.user.username, client: tok.client.id, expires_at: tok.accessTokenExpiresAt },
    };
  } catch (e) {
    status = e.code || 500;
    out = { error: e.name, error_description: e.message };
  }
  stats.api[status] = (stats.api[status] || 0) + 1;
  if (status !== 200) log('api', req.method, url.pathname, status, out.error_description);
  send(res, status, out, response.headers);
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', async () => {
    const raw = Buffer.concat(chunks);
    const url = new URL(req.url, 'http://peer');
    try {
      if (url.pathname === '/oauth/token') return await handleToken(req, res, url, raw);
      if (url.pathname === '/api' || url.pathname.startsWith('/api/')) return await handleApi(req, res, url, raw);
      if (url.pathname === '/_admin/stats' && req.method === 'GET') return send(res, 200, stats);
      if (url.pathname === '/_admin/health') return send(res, 200, { ok: true });
      if (url.pathname === '/_admin/forget-refresh' && req.method === 'POST') {
        return send(res, 200, { forgotten: forgetRefresh() });
      }
      if (url.pathname === '/_admin/revoke-access' && req.method === 'POST') {
        revokeAtNextRequest = true;
        return send(res, 200, { armed: true });
      }
      send(res, 404, { error: 'not_found' });
    } catch (e) {
      console.error(e);
      send(res, 500, { error: 'server_error' });
    }
  });
});
server.keepAliveTimeout = 30000;
server.listen(PORT, HOST, () => {
  console.log(`node-peer listening on http://${HOST}:${PORT} (oauth2-server ${require('@node-oauth/oauth2-server/package.json').version}, access ${ACCESS_TTL}s, refresh ${REFRESH_TTL}s)`);
});
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 500).unref();
  });
}
