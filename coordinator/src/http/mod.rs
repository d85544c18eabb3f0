//! The coordinator's HTTP side: the labelling page (jobs, their scenarios as image
//! grids, a form to label them, the report when done), the JSON job API beside it
//! (submit, status, label, cancel, delete, results; described by `openapi.json`,
//! served at `/api/openapi.json`), health checks and Prometheus metrics.
//!
//! With a token, everything but `/healthz`, `/readyz`, `/login` and `/api/openapi.json`
//! needs it: an `Authorization: Bearer <token>` header, or the session cookie that
//! `/login` sets (see `access.rs`: signed, expiring, CSRF tokens on forms). Pages are
//! plain server-rendered HTML with no script and no outside link, so they work
//! offline and from the keyboard; every name from the data is escaped. The listener
//! and its limits are in `serve.rs`.
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Json, Router};
use serde::Deserialize;

use crate::store::JobState;
use crate::{Coordinator, CoordinatorError};

mod access;
mod pages;
mod serve;

pub use access::{Caller, CSRF_FIELD, SESSION_COOKIE};
pub use serve::{serve, tls_acceptor, Peer};

/// What the HTTP side serves besides the coordinator's own state.
#[derive(Clone, Default)]
pub struct HttpOptions {
    /// Renders the Prometheus text of `/metrics` (none: `/metrics` is 404).
    pub metrics: Option<Arc<dyn Fn() -> String + Send + Sync>>,
}

#[derive(Clone)]
struct App {
    coord: Coordinator,
    opts: HttpOptions,
    sessions: Arc<access::Sessions>,
    logins: Arc<access::LoginLimiter>,
    /// Served over TLS: the session cookie is `Secure`.
    secure: bool,
}

pub fn router(coord: Coordinator, opts: HttpOptions) -> Router {
    let cfg = &coord.inner.cfg;
    let app = App {
        sessions: Arc::new(access::Sessions::new(
            cfg.token.as_ref().map(|t| t.expose()),
            cfg.http_limits.session_ttl,
        )),
        logins: Arc::new(access::LoginLimiter::new(cfg.http_limits.logins_per_minute)),
        secure: cfg.tls.is_some(),
        coord,
        opts,
    };
    let guarded = Router::new()
        .route("/", get(jobs_page))
        .route("/jobs/{id}", get(job_page))
        .route("/jobs/{id}/labels", post(labels_form))
        .route("/jobs/{id}/scenarios/{sid}/{picture}", get(scenario_png))
        .route("/api/jobs", get(api_jobs).post(api_submit))
        .route("/api/jobs/{id}", get(api_job).delete(api_delete))
        .route("/api/jobs/{id}/labels", post(api_labels))
        .route("/api/jobs/{id}/cancel", post(api_cancel))
        .route("/api/jobs/{id}/results", get(api_results))
        .route("/api/jobs/{id}/results/{*name}", get(api_result))
        .route("/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/login", get(login_page).post(login))
        .route("/api/openapi.json", get(openapi))
        .route(
            "/metrics",
            get(metrics).route_layer(middleware::from_fn_with_state(app.clone(), metrics_access)),
        )
        .merge(guarded)
        .layer(middleware::from_fn(refuse_cross_site))
        .layer(middleware::from_fn(http_span))
        .layer(middleware::map_response(security_headers))
        .with_state(app)
}

// ---- access ----

/// Each request in a span (`http`, method and route), in the caller's trace when it
/// sent a `traceparent` header. Health checks and metrics scrapes are debug spans.
async fn http_span(req: Request, next: Next) -> Response {
    use tracing::Instrument as _;
    let path = req.uri().path();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or(path, |m| m.as_str())
        .to_string();
    let method = req.method().to_string();
    let span = if matches!(path, "/healthz" | "/readyz" | "/metrics") {
        tracing::debug_span!("http", %method, %route, status = tracing::field::Empty, trace_id = tracing::field::Empty)
    } else {
        tracing::info_span!("http", %method, %route, status = tracing::field::Empty, trace_id = tracing::field::Empty)
    };
    if let Some(tp) = traceparent(req.headers()) {
        defuse_proto::trace::adopt(&span, &tp);
    }
    let r = next.run(req).instrument(span.clone()).await;
    span.record("status", r.status().as_u16());
    r
}

/// The caller's trace context, from its `traceparent` header (gRPC's too: tonic hands
/// the span maker the request's HTTP headers).
pub(crate) fn traceparent(h: &HeaderMap) -> Option<defuse_proto::trace::TraceParent> {
    h.get(defuse_proto::trace::HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(defuse_proto::trace::TraceParent::parse)
}

/// What every answer says to the browser: no script runs on these pages (they have
/// none), nothing is sniffed into another type, no other site frames them. A
/// response that set its own policy (a job's result files) keeps it.
async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        // not no-referrer: with it a browser sends `Origin: null` on the page's own
        // form posts, which the cross-site check refuses
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        if !h.contains_key(&name) {
            h.insert(name, header::HeaderValue::from_static(value));
        }
    }
    r
}

/// A state-changing request from another site's page is refused before anything
/// else looks at it (with or without a token).
async fn refuse_cross_site(req: Request, next: Next) -> Response {
    if access::cross_site(req.method(), req.uri(), req.headers()) {
        return (
            StatusCode::FORBIDDEN,
            "refused: a cross-site request (its Origin is another site)\n",
        )
            .into_response();
    }
    next.run(req).await
}

async fn require_token(State(app): State<App>, mut req: Request, next: Next) -> Response {
    let caller = match app.sessions.caller(req.headers()) {
        Ok(c) => c,
        Err(sent) => {
            let why = if sent {
                "wrong token or expired session"
            } else {
                "this coordinator needs a token"
            };
            let wants_html = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("text/html"));
            let mut resp = if wants_html {
                Html(pages::page(
                    "Sign in",
                    pages::login_form(why, req.uri().path()),
                ))
                .into_response()
            } else {
                format!("{why}: send Authorization: Bearer <token>\n").into_response()
            };
            *resp.status_mut() = StatusCode::UNAUTHORIZED;
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("header"));
            return resp;
        }
    };
    // the JSON API from a signed-in page: a state change carries the session's CSRF
    // token in a header (forms carry it in a field, checked by their handler)
    let changes = !matches!(*req.method(), Method::GET | Method::HEAD);
    if changes && req.uri().path().starts_with("/api/") {
        let given = req
            .headers()
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok());
        if !app.sessions.csrf_ok(&caller, given) {
            return (
                StatusCode::FORBIDDEN,
                Json(serde_json::json!({"error": "a signed-in page must send its CSRF token (X-CSRF-Token)"})),
            )
                .into_response();
        }
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// `/metrics` opens with the metrics token (a scrape job's, which opens nothing else)
/// or with whatever opens the rest.
async fn metrics_access(State(app): State<App>, req: Request, next: Next) -> Response {
    let scrape = app.coord.inner.cfg.metrics_token.as_ref().is_some_and(|m| {
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(defuse_proto::auth::bearer_token)
            .is_some_and(|t| defuse_proto::auth::token_matches(m.expose(), t))
    });
    if scrape {
        next.run(req).await
    } else {
        require_token(State(app), req, next).await
    }
}

async fn login_page() -> Html<String> {
    Html(pages::page("Sign in", pages::login_form("", "/")))
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    #[serde(default)]
    next: String,
}

async fn login(
    State(app): State<App>,
    peer: Option<Extension<Peer>>,
    Form(f): Form<LoginForm>,
) -> Response {
    if !app.sessions.enabled() {
        return Redirect::to("/").into_response();
    }
    if let Some(Extension(Peer(addr))) = peer {
        if let Err(wait) = app.logins.attempt(addr.ip()) {
            let mut r = (
                StatusCode::TOO_MANY_REQUESTS,
                Html(pages::page(
                    "Sign in",
                    pages::login_form(
                        &format!("too many sign-in attempts: try again in {wait} s"),
                        &f.next,
                    ),
                )),
            )
                .into_response();
            r.headers_mut().insert(header::RETRY_AFTER, wait.into());
            return r;
        }
    }
    if !app.sessions.token_ok(&f.token) {
        let mut r = Html(pages::page(
            "Sign in",
            pages::login_form("wrong token", &f.next),
        ))
        .into_response();
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        return r;
    }
    // only paths of this site
    let plain = |c: char| !c.is_control() && !c.is_whitespace() && c != '\\';
    let next = if f.next.starts_with('/') && !f.next.starts_with("//") && f.next.chars().all(plain)
    {
        f.next
    } else {
        "/".into()
    };
    let Some(value) = app.sessions.issue() else {
        return Redirect::to("/").into_response();
    };
    let cookie = app.sessions.cookie(value, app.secure);
    let mut r = Redirect::to(&next).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        header::HeaderValue::from_str(&cookie).expect("a cookie of hex digits is a header value"),
    );
    r
}

/// Ends the page's session in this browser (a form with the session's CSRF token).
async fn logout(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let csrf = fields
        .iter()
        .find(|(k, _)| k == CSRF_FIELD)
        .map(|(_, v)| v.as_str());
    if !app.sessions.csrf_ok(&caller, csrf) {
        return (StatusCode::FORBIDDEN, "no or a wrong CSRF token\n").into_response();
    }
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        header::HeaderValue::from_str(&access::Sessions::clear_cookie(app.secure))
            .expect("a constant cookie is a header value"),
    );
    r
}

// ---- health and metrics ----

async fn ready(State(app): State<App>) -> Response {
    match app.coord.ready().await {
        Ok(()) => "ready\n".into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("state store unreachable: {e}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(app): State<App>) -> Response {
    match &app.opts.metrics {
        Some(render) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are off\n").into_response(),
    }
}

// ---- errors ----

/// The HTTP status of a job API error (the same typed errors as gRPC).
fn http_status(e: &CoordinatorError) -> StatusCode {
    StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn error_page(e: CoordinatorError, back: &str) -> Response {
    let body = pages::alert(&e.to_string(), back);
    (http_status(&e), Html(pages::page("Error", body))).into_response()
}

fn error_json(e: CoordinatorError) -> Response {
    (
        http_status(&e),
        Json(serde_json::json!({"error": e.to_string()})),
    )
        .into_response()
}

// ---- pages (rendered by `pages.rs`) ----

/// `?after=<job id>&limit=<n>`: a page of the job list.
#[derive(Deserialize, Default)]
struct PageQuery {
    #[serde(default)]
    after: String,
    #[serde(default)]
    limit: Option<usize>,
}

async fn jobs_page(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<PageQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(crate::api::DEFAULT_PAGE);
    let (jobs, next) = match app.coord.jobs_page(&q.after, limit).await {
        Ok(j) => j,
        Err(e) => return error_page(CoordinatorError::from(e), "/"),
    };
    let mut rows = Vec::with_capacity(jobs.len());
    for rec in &jobs {
        let st = app.coord.status_of(rec, false).await;
        let shards = st
            .steps
            .iter()
            .find(|s| s.step == "identify")
            .filter(|s| s.shards_total > 0)
            .map(|s| format!("{} / {}", s.shards_done, s.shards_total))
            .unwrap_or_default();
        rows.push(pages::JobRow {
            id: rec.id.clone(),
            name: rec.name.clone(),
            state: rec.state.as_str(),
            step: rec.step.to_string(),
            shards,
        });
    }
    let csrf = match &caller {
        Caller::Session { nonce } => Some(app.sessions.csrf(nonce)),
        Caller::Open | Caller::Bearer => None,
    };
    let body = pages::jobs(
        &rows,
        q.after.is_empty(),
        (!next.is_empty()).then_some((next.as_str(), limit)),
        csrf.as_deref(),
    );
    Html(pages::page("Jobs", body)).into_response()
}

async fn job_page(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let rec = match app.coord.inner.store.get_job(&id).await {
        Ok(Some(r)) => r,
        Ok(None) => return error_page(CoordinatorError::not_found(format!("no job {id}")), "/"),
        Err(e) => return error_page(CoordinatorError::from(e), "/"),
    };
    let st = app.coord.status_of(&rec, true).await;
    let below = match rec.state {
        JobState::AwaitingLabels => match app.coord.scenarios(&rec).await {
            Ok((scen, classes)) => {
                let csrf = match &caller {
                    Caller::Session { nonce } => app.sessions.csrf(nonce),
                    Caller::Open | Caller::Bearer => String::new(),
                };
                pages::label_form(&rec.id, &csrf, &scen, &classes)
            }
            Err(e) => pages::alert(&e.to_string(), "/"),
        },
        JobState::Done => {
            let summary = app
                .coord
                .job_file(&rec, crate::keys::files::SUMMARY)
                .await
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
            pages::report(&rec.id, summary)
        }
        _ => maud::html! {},
    };
    Html(pages::page(&format!("Job {id}"), pages::job(&st, below))).into_response()
}

/// `grid.png` (samples of the scenario), `failures.png` (some of its own failures) or
/// `nearest.png` (the nearest training images).
async fn scenario_png(
    State(app): State<App>,
    Path((id, sid, picture)): Path<(String, usize, String)>,
) -> Response {
    let file = match picture.as_str() {
        "grid.png" => crate::keys::files::scenario_grid(sid),
        "failures.png" => crate::keys::files::scenario_failures(sid),
        "nearest.png" => crate::keys::files::nearest(sid),
        _ => return (StatusCode::NOT_FOUND, "no such picture").into_response(),
    };
    let rec = match app.coord.inner.store.get_job(&id).await {
        Ok(Some(r)) => r,
        Ok(None) => return (StatusCode::NOT_FOUND, "no such job").into_response(),
        Err(e) => return error_json(CoordinatorError::from(e)),
    };
    match app.coord.job_file(&rec, &file).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "image/png")], bytes).into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "no such scenario picture").into_response(),
    }
}

/// Form fields `scenario-<id>` = class id | "discard", and the session's CSRF token.
async fn labels_form(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let back = format!("/jobs/{id}");
    let csrf = fields
        .iter()
        .find(|(k, _)| k == CSRF_FIELD)
        .map(|(_, v)| v.as_str());
    if !app.sessions.csrf_ok(&caller, csrf) {
        let e = "this form is not from this coordinator's page (no or a wrong CSRF token): reload the page and submit again";
        return (
            StatusCode::FORBIDDEN,
            Html(pages::page("Refused", pages::alert(e, &back))),
        )
            .into_response();
    }
    let mut pairs = Vec::new();
    for (k, v) in fields {
        if k == CSRF_FIELD {
            continue;
        }
        match k.strip_prefix("scenario-") {
            Some(sid) if v.is_empty() => {
                return error_page(
                    CoordinatorError::invalid(format!(
                        "scenario {sid} has no label: choose a class or discard"
                    )),
                    &back,
                )
            }
            Some(sid) => pairs.push((sid.to_string(), v)),
            None => {
                return error_page(
                    CoordinatorError::invalid(format!("unknown form field '{k}'")),
                    &back,
                )
            }
        }
    }
    match app.coord.set_labels(&id, &pairs).await {
        Ok(_) => Redirect::to(&back).into_response(),
        Err(s) => error_page(s, &back),
    }
}

// ---- JSON API ----

/// A page of jobs (`?after=&limit=`, default 100, at most 1000); the id to go on
/// from is in the `X-Next-After` header, absent on the last page.
async fn api_jobs(State(app): State<App>, Query(q): Query<PageQuery>) -> Response {
    let limit = q.limit.unwrap_or(crate::api::DEFAULT_PAGE);
    match app.coord.jobs_page(&q.after, limit).await {
        Ok((jobs, next)) => {
            let mut out = Vec::new();
            for rec in &jobs {
                out.push(crate::api::job_json(&app.coord.status_of(rec, false).await));
            }
            let mut r = Json(out).into_response();
            if let Ok(v) = next.parse() {
                if !next.is_empty() {
                    r.headers_mut().insert("x-next-after", v);
                }
            }
            r
        }
        Err(e) => error_json(CoordinatorError::from(e)),
    }
}

/// Deletes a finished job (409 while it runs).
async fn api_delete(State(app): State<App>, Path(id): Path<String>) -> Response {
    match app.coord.delete(&id).await {
        Ok(n) => Json(serde_json::json!({"deleted": id, "objects": n})).into_response(),
        Err(s) => error_json(s),
    }
}

async fn api_job(State(app): State<App>, Path(id): Path<String>) -> Response {
    match app.coord.inner.store.get_job(&id).await {
        Ok(Some(rec)) => {
            Json(crate::api::job_json(&app.coord.status_of(&rec, true).await)).into_response()
        }
        Ok(None) => error_json(CoordinatorError::not_found(format!("no job {id}"))),
        Err(e) => error_json(CoordinatorError::from(e)),
    }
}

/// The HTTP API's description (OpenAPI 3.1), served as is.
pub const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// `Content-Type: application/json`, or the 415 that says so (a cross-site form
/// cannot send that type without the browser asking first).
fn json_content_type(h: &HeaderMap) -> Result<(), Box<Response>> {
    let ct = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(Box::new((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Json(serde_json::json!({"error": format!("Content-Type must be application/json, not '{ct}'")})),
        )
            .into_response()));
    }
    Ok(())
}

/// A JSON body, or the 415/400 that says why not.
fn json_body<T: serde::de::DeserializeOwned>(
    h: &HeaderMap,
    body: &[u8],
) -> Result<T, Box<Response>> {
    json_content_type(h)?;
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error_json(CoordinatorError::invalid(format!(
            "request body: {e}"
        ))))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    /// The job file's text (TOML).
    config: String,
    #[serde(default)]
    job_id: Option<String>,
}

/// Body: `{"config": "<job TOML>", "job_id": "<optional>"}`; 201 with the job's id.
async fn api_submit(State(app): State<App>, h: HeaderMap, body: Bytes) -> Response {
    let b: SubmitBody = match json_body(&h, &body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    match app
        .coord
        .submit_traced(&b.config, b.job_id, traceparent(&h))
        .await
    {
        Ok(id) => (StatusCode::CREATED, Json(serde_json::json!({"id": id}))).into_response(),
        Err(e) => error_json(e),
    }
}

async fn api_cancel(State(app): State<App>, Path(id): Path<String>) -> Response {
    match app.coord.cancel(&id).await {
        Ok(state) => Json(serde_json::json!({"id": id, "state": state.as_str()})).into_response(),
        Err(e) => error_json(e),
    }
}

/// The names of the results a job has now (`GET .../results/<name>` serves each).
async fn api_results(State(app): State<App>, Path(id): Path<String>) -> Response {
    match app.coord.results(&id).await {
        Ok(names) => Json(serde_json::json!({"id": id, "results": names})).into_response(),
        Err(e) => error_json(e),
    }
}

async fn api_result(State(app): State<App>, Path((id, name)): Path<(String, String)>) -> Response {
    match app.coord.result(&id, &name).await {
        Ok(bytes) => {
            let ct = match name.rsplit('.').next() {
                Some("json") => "application/json",
                Some("html") => "text/html; charset=utf-8",
                _ => "application/octet-stream",
            };
            // a job's files come from the artifact store, which more hands can write
            // than this server's: shown in a sandbox (no script, an origin of its
            // own), never as this site's page
            (
                [
                    (header::CONTENT_TYPE, ct),
                    (header::CONTENT_SECURITY_POLICY, "sandbox"),
                ],
                bytes,
            )
                .into_response()
        }
        Err(e) => error_json(e),
    }
}

/// Body (`application/json`): `{"<scenario id>": <class id> | "<class name>" | "discard"}`.
async fn api_labels(
    State(app): State<App>,
    Path(id): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = json_content_type(&h) {
        return *r;
    }
    let pairs = match defuse_core::scenarios::label_pairs_from_json(&String::from_utf8_lossy(&body))
    {
        Ok(p) => p,
        Err(m) => return error_json(CoordinatorError::invalid(m)),
    };
    match app.coord.set_labels(&id, &pairs).await {
        Ok((labelled, discarded)) => {
            Json(serde_json::json!({"labelled": labelled, "discarded": discarded})).into_response()
        }
        Err(s) => error_json(s),
    }
}
