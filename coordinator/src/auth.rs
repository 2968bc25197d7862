//! Who may use the coordinator's HTTP API and dashboard: bearer tokens with two roles.
//!
//! A `viewer` may read (every `GET`); an `operator` may also act (submit, cancel, retry,
//! resolve: every other method). Tokens come from the environment (`WARPLINE_OPERATOR_TOKEN`,
//! `WARPLINE_VIEWER_TOKEN`) and from a token file (`--token-file`, one `ROLE NAME TOKEN` per
//! line), each naming the identity that the audit log records for the actions it authorises.
//!
//! Tokens are held only as SHA-256 digests and a presented token is compared with every digest
//! in constant time, so neither the comparison's timing nor a memory dump of the table gives
//! one away; no token is ever logged or echoed. A request carries its token in
//! `Authorization: Bearer TOKEN`, or, for the dashboard in a browser, in the `HttpOnly`,
//! `SameSite=Strict` cookie that its login form sets.
//!
//! With no token configured every request is an operator named [`LOCAL_IDENTITY`] (the body's
//! `operator` field, when given, names the person); `warpline serve` then listens on loopback
//! only. Either way an unsafe request (not `GET`/`HEAD`) whose `Origin` is another site is
//! refused, and the dashboard's forms carry a token derived from the session ([`Auth::csrf`]),
//! so a page on another site cannot act through a logged-in browser.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use sha2::{Digest, Sha256};

/// The identity of every request when no token is configured.
pub const LOCAL_IDENTITY: &str = "local";

/// The dashboard's session cookie.
pub const COOKIE: &str = "warpline_token";

/// Shortest token accepted: a guessable token is no protection.
pub const MIN_TOKEN_LEN: usize = 16;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read everything.
    Viewer,
    /// Read, submit, cancel, retry, resolve.
    Operator,
}

impl Role {
    /// `viewer` or `operator`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }
}

/// Who made a request (a request extension set by [`require`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The name the audit log records.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// False when no token is configured (anyone on loopback).
    pub authenticated: bool,
}

impl Identity {
    /// Everyone, when no token is configured: an operator named [`LOCAL_IDENTITY`].
    pub fn local() -> Identity {
        Identity {
            name: LOCAL_IDENTITY.into(),
            role: Role::Operator,
            authenticated: false,
        }
    }

    /// True if it may act (not only read).
    pub fn can_act(&self) -> bool {
        self.role == Role::Operator
    }

    /// The operator to audit: the authenticated identity, or, with no tokens configured, the
    /// name the request gave (default [`LOCAL_IDENTITY`]).
    pub fn operator(&self, claimed: Option<&str>) -> String {
        match claimed.map(str::trim).filter(|c| !c.is_empty()) {
            Some(c) if !self.authenticated => c.to_string(),
            _ => self.name.clone(),
        }
    }
}

/// A bad token configuration.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token file could not be read.
    #[error("cannot read the token file `{path}`: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line or variable is malformed.
    #[error("{origin}: {message}")]
    Invalid {
        /// `FILE line N` or the variable's name.
        origin: String,
        /// What is wrong and what to write instead.
        message: String,
    },
}

struct Entry {
    digest: [u8; 32],
    identity: Identity,
}

/// The configured tokens (digests only) and the secret that derives CSRF tokens.
pub struct Auth {
    entries: Vec<Entry>,
    csrf_key: [u8; 32],
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.entries.len())
            .finish_non_exhaustive()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Equal in time independent of where the inputs differ.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl Auth {
    /// No tokens: everyone is a [`LOCAL_IDENTITY`] operator.
    pub fn open() -> Auth {
        Auth::with_entries(Vec::new())
    }

    fn with_entries(entries: Vec<Entry>) -> Auth {
        // A per-process secret: CSRF tokens of a previous coordinator stop working, which only
        // means reloading the page.
        let mut random = [0u8; 32];
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            use std::io::Read;
            let _ = f.read_exact(&mut random);
        }
        // v7 ids carry random bits too, should /dev/urandom be missing.
        let seed = format!(
            "{}:{}:{}:{:?}",
            hex::encode(random),
            uuid::Uuid::now_v7(),
            std::process::id(),
            std::time::SystemTime::now()
        );
        Auth {
            entries,
            csrf_key: digest(&seed),
        }
    }

    /// Tokens from `env` (`WARPLINE_OPERATOR_TOKEN`, `WARPLINE_VIEWER_TOKEN`, identities
    /// `operator` and `viewer`) and from `file` (lines `ROLE NAME TOKEN`; `#` starts a comment).
    pub fn load(
        env: &dyn Fn(&str) -> Option<String>,
        file: Option<&Path>,
    ) -> Result<Auth, AuthError> {
        let mut entries: Vec<Entry> = Vec::new();
        let mut add = |origin: String, role: Role, name: &str, token: &str| {
            if token.chars().count() < MIN_TOKEN_LEN {
                return Err(AuthError::Invalid {
                    origin,
                    message: format!(
                        "the token is shorter than {MIN_TOKEN_LEN} characters: use a random one \
                         (e.g. `openssl rand -hex 24`)"
                    ),
                });
            }
            if token.chars().any(char::is_whitespace) {
                return Err(AuthError::Invalid {
                    origin,
                    message: "a token cannot contain whitespace".into(),
                });
            }
            let d = digest(token);
            if entries.iter().any(|e| ct_eq(&e.digest, &d)) {
                return Err(AuthError::Invalid {
                    origin,
                    message: "this token is already configured: give every identity its own".into(),
                });
            }
            entries.push(Entry {
                digest: d,
                identity: Identity {
                    name: name.to_string(),
                    role,
                    authenticated: true,
                },
            });
            Ok(())
        };
        for (var, role) in [
            ("WARPLINE_OPERATOR_TOKEN", Role::Operator),
            ("WARPLINE_VIEWER_TOKEN", Role::Viewer),
        ] {
            if let Some(token) = env(var).filter(|t| !t.is_empty()) {
                add(var.to_string(), role, role.as_str(), token.trim())?;
            }
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
                path: path.display().to_string(),
                source,
            })?;
            for (i, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or("").trim();
                if line.is_empty() {
                    continue;
                }
                let origin = format!("token file `{}` line {}", path.display(), i + 1);
                let fields: Vec<&str> = line.split_whitespace().collect();
                let [role, name, token] = fields[..] else {
                    return Err(AuthError::Invalid {
                        origin,
                        message: "expected `ROLE NAME TOKEN` (ROLE is viewer or operator)".into(),
                    });
                };
                let role = match role {
                    "viewer" => Role::Viewer,
                    "operator" => Role::Operator,
                    other => {
                        return Err(AuthError::Invalid {
                            origin,
                            message: format!("unknown role `{other}`: expected viewer or operator"),
                        });
                    }
                };
                add(origin, role, name, token)?;
            }
        }
        Ok(Auth::with_entries(entries))
    }

    /// True when no token is configured.
    pub fn is_open(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many tokens are configured.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no token is configured (see [`Auth::is_open`]).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The identity a token authenticates, comparing it with every configured token.
    pub fn check(&self, token: &str) -> Option<Identity> {
        let d = digest(token);
        let mut found = None;
        for e in &self.entries {
            if ct_eq(&e.digest, &d) && found.is_none() {
                found = Some(e.identity.clone());
            }
        }
        found
    }

    /// The CSRF token for a session (the presented token, or none when the API is open): an
    /// HMAC-like digest of the process secret and the session, never the session itself.
    pub fn csrf(&self, session: Option<&str>) -> String {
        let mut h = Sha256::new();
        h.update(self.csrf_key);
        h.update(b"csrf:");
        h.update(session.unwrap_or("").as_bytes());
        hex::encode(&h.finalize()[..16])
    }

    /// True when `given` is the CSRF token of `session`.
    pub fn csrf_ok(&self, session: Option<&str>, given: &str) -> bool {
        let want = digest(&self.csrf(session));
        ct_eq(&want, &digest(given))
    }
}

/// How a request presented its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// `Authorization: Bearer`.
    Bearer(String),
    /// The dashboard's cookie.
    Cookie(String),
    /// Nothing.
    None,
}

impl Credential {
    /// The token, however it came.
    pub fn token(&self) -> Option<&str> {
        match self {
            Credential::Bearer(t) | Credential::Cookie(t) => Some(t),
            Credential::None => None,
        }
    }
}

/// The credential in a request's headers (a bearer token wins over the cookie).
pub fn credential(headers: &HeaderMap) -> Credential {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if let Some(t) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
        {
            return Credential::Bearer(t.trim().to_string());
        }
        return Credential::Bearer(String::new());
    }
    for v in headers.get_all(header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for part in v.split(';') {
            if let Some((k, val)) = part.trim().split_once('=')
                && k == COOKIE
                && !val.is_empty()
            {
                return Credential::Cookie(val.to_string());
            }
        }
    }
    Credential::None
}

/// True when an unsafe request comes from a page on another site: its `Origin` (sent by
/// browsers on cross-site and same-site POSTs) names another host than the one it was sent to,
/// or the browser says so in `Sec-Fetch-Site`.
pub fn cross_site(headers: &HeaderMap) -> bool {
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "cross-site" || v == "same-site")
    {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(origin)
        .trim_end_matches('/');
    origin == "null" || !origin_host.eq_ignore_ascii_case(host)
}

/// Paths anyone may read: liveness, readiness, the login page and the dashboard's assets.
fn public(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/login" | "/logout") || path.starts_with("/assets/")
}

/// True for the dashboard's pages (a browser is redirected to the login form rather than
/// answered with a JSON 401).
fn is_page(path: &str) -> bool {
    !path.starts_with("/v1/") && path != "/v1"
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let body = axum::Json(serde_json::json!({ "error": message }));
    let mut resp = (status, body).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"warpline\""),
        );
    }
    resp
}

/// The middleware in front of every route: authenticates the request, refuses cross-site
/// unsafe requests and viewers' actions, and hands the [`Identity`] and [`Credential`] to the
/// handler as request extensions.
pub async fn require(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let unsafe_method = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let cred = credential(req.headers());
    // A bearer token cannot be sent by a cross-site form; a cookie or no credential can.
    if unsafe_method && !matches!(cred, Credential::Bearer(_)) && cross_site(req.headers()) {
        return refuse(
            StatusCode::FORBIDDEN,
            "cross-site request refused: act from the dashboard itself or the CLI",
        );
    }
    let identity = if auth.is_open() {
        Identity::local()
    } else {
        match cred.token().and_then(|t| auth.check(t)) {
            Some(id) => id,
            None if public(&path) => {
                return next.run(req).await;
            }
            None if is_page(&path) && req.method() == Method::GET => {
                let to = format!("/login?next={}", crate::ui::html::url_encode(&path));
                return Redirect::to(&to).into_response();
            }
            None => {
                let message = match cred {
                    Credential::None => {
                        "authentication required: send `Authorization: Bearer TOKEN` (the CLI: \
                         --token or WARPLINE_API_TOKEN)"
                    }
                    _ => "invalid token: check --token or WARPLINE_API_TOKEN",
                };
                return refuse(StatusCode::UNAUTHORIZED, message);
            }
        }
    };
    if unsafe_method && !identity.can_act() && !public(&path) {
        return refuse(
            StatusCode::FORBIDDEN,
            &format!(
                "`{}` is a viewer: only an operator may submit, cancel, retry or resolve",
                identity.name
            ),
        );
    }
    req.extensions_mut().insert(identity);
    req.extensions_mut().insert(cred);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn tokens_from_the_environment_and_a_file_name_their_identities() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(
            &file,
            "# role name token\noperator alice aaaaaaaaaaaaaaaaaaaa\nviewer bob bbbbbbbbbbbbbbbbbbbb # read only\n\n",
        )
        .unwrap();
        let auth = Auth::load(
            &env(&[("WARPLINE_OPERATOR_TOKEN", "oooooooooooooooooooo")]),
            Some(&file),
        )
        .unwrap();
        assert_eq!(auth.len(), 3);
        let alice = auth.check("aaaaaaaaaaaaaaaaaaaa").unwrap();
        assert_eq!((alice.name.as_str(), alice.role), ("alice", Role::Operator));
        let bob = auth.check("bbbbbbbbbbbbbbbbbbbb").unwrap();
        assert_eq!((bob.name.as_str(), bob.role), ("bob", Role::Viewer));
        assert!(!bob.can_act());
        assert_eq!(auth.check("oooooooooooooooooooo").unwrap().name, "operator");
        assert!(auth.check("aaaaaaaaaaaaaaaaaaab").is_none());
        assert!(auth.check("").is_none());
        assert!(!format!("{auth:?}").contains("aaaa"));
    }

    #[test]
    fn bad_token_configurations_are_refused_with_the_line() {
        let short = Auth::load(&env(&[("WARPLINE_VIEWER_TOKEN", "short")]), None).unwrap_err();
        assert!(
            short.to_string().contains("WARPLINE_VIEWER_TOKEN")
                && short.to_string().contains("shorter"),
            "{short}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "admin root rrrrrrrrrrrrrrrrrrrr\n").unwrap();
        let e = Auth::load(&env(&[]), Some(&file)).unwrap_err().to_string();
        assert!(
            e.contains("line 1") && e.contains("unknown role `admin`"),
            "{e}"
        );
        std::fs::write(&file, "viewer onlytwo\n").unwrap();
        let e = Auth::load(&env(&[]), Some(&file)).unwrap_err().to_string();
        assert!(e.contains("ROLE NAME TOKEN"), "{e}");
        std::fs::write(
            &file,
            "viewer a xxxxxxxxxxxxxxxxxxxx\noperator b xxxxxxxxxxxxxxxxxxxx\n",
        )
        .unwrap();
        let e = Auth::load(&env(&[]), Some(&file)).unwrap_err().to_string();
        assert!(
            e.contains("line 2") && e.contains("already configured"),
            "{e}"
        );
        let missing = Auth::load(&env(&[]), Some(&dir.path().join("nope"))).unwrap_err();
        assert!(missing.to_string().contains("cannot read"), "{missing}");
    }

    #[test]
    fn an_open_api_audits_the_claimed_operator_and_a_token_its_identity() {
        let open = Identity {
            name: LOCAL_IDENTITY.into(),
            role: Role::Operator,
            authenticated: false,
        };
        assert_eq!(open.operator(Some("carol")), "carol");
        assert_eq!(open.operator(Some("  ")), "local");
        assert_eq!(open.operator(None), "local");
        let alice = Identity {
            name: "alice".into(),
            role: Role::Operator,
            authenticated: true,
        };
        assert_eq!(alice.operator(Some("mallory")), "alice");
    }

    #[test]
    fn credentials_come_from_the_header_or_the_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(credential(&h), Credential::None);
        h.insert(
            header::COOKIE,
            "a=b; warpline_token=tok123".parse().unwrap(),
        );
        assert_eq!(credential(&h), Credential::Cookie("tok123".into()));
        h.insert(header::AUTHORIZATION, "Bearer xyz".parse().unwrap());
        assert_eq!(credential(&h), Credential::Bearer("xyz".into()));
        h.insert(header::AUTHORIZATION, "Basic xyz".parse().unwrap());
        assert_eq!(credential(&h), Credential::Bearer(String::new()));
    }

    #[test]
    fn cross_site_requests_are_recognised() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        assert!(!cross_site(&h), "no Origin: a CLI or curl");
        h.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(!cross_site(&h));
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(cross_site(&h));
        h.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(cross_site(&h));
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(cross_site(&h));
    }

    #[test]
    fn csrf_tokens_are_bound_to_the_session_and_the_process() {
        let a = Auth::open();
        let t = a.csrf(Some("session-1"));
        assert!(a.csrf_ok(Some("session-1"), &t));
        assert!(!a.csrf_ok(Some("session-2"), &t));
        assert!(!a.csrf_ok(Some("session-1"), ""));
        assert!(!Auth::open().csrf_ok(Some("session-1"), &t));
        assert!(!t.contains("session"));
    }
}
