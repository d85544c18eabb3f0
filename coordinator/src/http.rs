//! The coordinator's HTTP side: the labelling page (jobs, their scenarios as image
//! grids, a form to label them, the report when done), the JSON job API beside it
//! (submit, status, label, cancel, delete, results; described by `openapi.json`,
//! served at `/api/openapi.json`), health checks and Prometheus metrics.
//!
//! With a token, everything but `/healthz`, `/readyz` and `/api/openapi.json` needs it: an
//! `Authorization: Bearer <token>` header, or the cookie that `/login` sets. Pages are
//! plain server-rendered HTML with no script and no outside link, so they work
//! offline and from the keyboard; every name from the data is escaped.
use std::fmt::Write as _;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use defuse_proto::auth::{bearer_token, token_matches};
use serde::Deserialize;

use crate::store::JobState;
use crate::{Coordinator, CoordinatorError};

const COOKIE: &str = "defuse_token";

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
}

pub fn router(coord: Coordinator, opts: HttpOptions) -> Router {
    let app = App { coord, opts };
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
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/login", get(login_page).post(login))
        .route("/api/openapi.json", get(openapi))
        .merge(guarded)
        .with_state(app)
}

// ---- access ----

fn presented_token(h: &HeaderMap) -> Option<String> {
    if let Some(t) = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
    {
        return Some(t.to_string());
    }
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

async fn require_token(State(app): State<App>, req: Request, next: Next) -> Response {
    let Some(expected) = app.coord.inner.cfg.token.as_ref().map(|t| t.expose()) else {
        return next.run(req).await;
    };
    match presented_token(req.headers()) {
        Some(t) if token_matches(expected, &t) => next.run(req).await,
        given => {
            let why = if given.is_some() {
                "wrong token"
            } else {
                "this coordinator needs a token"
            };
            let wants_html = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("text/html"));
            let mut resp = if wants_html {
                Html(page("Sign in", &login_form(why, req.uri().path()))).into_response()
            } else {
                format!("{why}: send Authorization: Bearer <token>\n").into_response()
            };
            *resp.status_mut() = StatusCode::UNAUTHORIZED;
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("header"));
            resp
        }
    }
}

fn login_form(message: &str, next: &str) -> String {
    format!(
        r#"<p class="error">{}</p>
<form method="post" action="/login">
<input type="hidden" name="next" value="{}">
<label>Token <input type="password" name="token" autofocus required></label>
<button type="submit">Sign in</button>
</form>"#,
        esc(message),
        esc(next)
    )
}

async fn login_page() -> Html<String> {
    Html(page("Sign in", &login_form("", "/")))
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    #[serde(default)]
    next: String,
}

async fn login(State(app): State<App>, Form(f): Form<LoginForm>) -> Response {
    let ok = match app.coord.inner.cfg.token.as_ref().map(|t| t.expose()) {
        None => return Redirect::to("/").into_response(),
        Some(t) => token_matches(t, f.token.trim()),
    };
    if !ok {
        let mut r = Html(page("Sign in", &login_form("wrong token", &f.next))).into_response();
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        return r;
    }
    // only paths of this site
    let next = if f.next.starts_with('/') && !f.next.starts_with("//") {
        f.next
    } else {
        "/".into()
    };
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        f.token.trim()
    );
    let Ok(cookie) = header::HeaderValue::from_str(&cookie) else {
        return (StatusCode::BAD_REQUEST, "the token cannot go in a cookie\n").into_response();
    };
    let mut r = Redirect::to(&next).into_response();
    r.headers_mut().insert(header::SET_COOKIE, cookie);
    r
}

// ---- health and metrics ----

async fn ready(State(app): State<App>) -> Response {
    match app.coord.inner.store.get_job("-readiness-probe-").await {
        Ok(_) => "ready\n".into_response(),
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
    let body = format!(
        r#"<p class="error" role="alert">{}</p><p><a href="{}">Back</a></p>"#,
        esc(&e.to_string()),
        esc(back)
    );
    (http_status(&e), Html(page("Error", &body))).into_response()
}

fn error_json(e: CoordinatorError) -> Response {
    (
        http_status(&e),
        Json(serde_json::json!({"error": e.to_string()})),
    )
        .into_response()
}

// ---- pages ----

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{t} · Defuse</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #1b1b1b; max-width: 70rem; }}
header a {{ color: inherit; text-decoration: none; font-weight: 600; }}
table {{ border-collapse: collapse; margin: .5rem 0 1rem; }}
th, td {{ border-bottom: 1px solid #ddd; padding: .3rem .6rem; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.scenarios {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(16rem, 1fr)); gap: 1rem; }}
.scenario {{ border: 1px solid #ccc; border-radius: 6px; padding: .6rem; }}
.scenario img {{ width: 100%; image-rendering: pixelated; background: #000; }}
.scenario h3 {{ margin: 0 0 .4rem; font-size: 1rem; }}
.preds {{ font-family: ui-monospace, monospace; font-size: .8rem; word-break: break-word; }}
.error {{ color: #a00; font-weight: 600; }}
.state {{ font-weight: 600; }}
button {{ font-size: 1rem; padding: .4rem 1rem; }}
select:focus, button:focus, a:focus {{ outline: 3px solid #36c; }}
</style></head>
<body><header><a href="/">Defuse</a></header>
<main><h1>{t}</h1>
{body}
</main></body></html>"#,
        t = esc(title)
    )
}

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

/// `?after=<job id>&limit=<n>`: a page of the job list.
#[derive(Deserialize, Default)]
struct PageQuery {
    #[serde(default)]
    after: String,
    #[serde(default)]
    limit: Option<usize>,
}

async fn jobs_page(State(app): State<App>, Query(q): Query<PageQuery>) -> Response {
    let limit = q.limit.unwrap_or(crate::api::DEFAULT_PAGE);
    let (jobs, next) = match app.coord.jobs_page(&q.after, limit).await {
        Ok(j) => j,
        Err(e) => return error_page(CoordinatorError::from(e), "/"),
    };
    let mut b = String::from(
        "<table><thead><tr><th>Job</th><th>Name</th><th>State</th><th>Step</th><th>Shards done</th></tr></thead><tbody>",
    );
    for rec in &jobs {
        let st = app.coord.status_of(rec, false).await;
        let shards = st
            .steps
            .iter()
            .find(|s| s.step == "identify")
            .filter(|s| s.shards_total > 0)
            .map(|s| format!("{} / {}", s.shards_done, s.shards_total))
            .unwrap_or_default();
        let _ = write!(
            b,
            r#"<tr><td><a href="/jobs/{id}">{id}</a></td><td>{name}</td><td class="state">{state}</td><td>{step}</td><td class="num">{shards}</td></tr>"#,
            id = esc(&rec.id),
            name = esc(&rec.name),
            state = esc(rec.state.as_str()),
            step = esc(&rec.step.to_string()),
        );
    }
    b.push_str("</tbody></table>");
    if jobs.is_empty() && q.after.is_empty() {
        b.push_str("<p>No jobs yet: submit one with <code>defuse submit job.toml</code>.</p>");
    }
    if !next.is_empty() {
        let _ = write!(
            b,
            r#"<p><a href="/?after={}&amp;limit={limit}" id="next-page">More jobs</a></p>"#,
            esc(&next)
        );
    }
    Html(page("Jobs", &b)).into_response()
}

async fn job_page(State(app): State<App>, Path(id): Path<String>) -> Response {
    let rec = match app.coord.inner.store.get_job(&id).await {
        Ok(Some(r)) => r,
        Ok(None) => return error_page(CoordinatorError::not_found(format!("no job {id}")), "/"),
        Err(e) => return error_page(CoordinatorError::from(e), "/"),
    };
    let st = app.coord.status_of(&rec, true).await;
    let mut b = String::new();
    let _ = write!(
        b,
        r#"<p>Name <b>{}</b> · state <span class="state" id="job-state">{}</span> · step {}</p>"#,
        esc(&rec.name),
        esc(rec.state.as_str()),
        esc(&rec.step.to_string())
    );
    if !rec.error.is_empty() {
        let _ = write!(b, r#"<p class="error">{}</p>"#, esc(&rec.error));
    }
    b.push_str("<table><thead><tr><th>Step</th><th>State</th><th>Shards (done / leased / pending / failed of total)</th></tr></thead><tbody>");
    for s in &st.steps {
        let shards = if s.shards_total > 0 {
            format!(
                "{} / {} / {} / {} of {}",
                s.shards_done, s.shards_leased, s.shards_pending, s.shards_failed, s.shards_total
            )
        } else {
            String::new()
        };
        let shards = if s.detail.is_empty() {
            shards
        } else {
            format!("{shards} ({})", esc(&s.detail))
        };
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.step),
            esc(&s.state),
            shards
        );
    }
    b.push_str("</tbody></table>");
    match rec.state {
        JobState::AwaitingLabels => match app.coord.scenarios(&rec).await {
            Ok((scen, classes)) => b.push_str(&label_form(&rec.id, &scen, &classes)),
            Err(e) => {
                let _ = write!(b, r#"<p class="error">{}</p>"#, esc(&e.to_string()));
            }
        },
        JobState::Done => {
            let summary = app
                .coord
                .job_file(&rec, crate::keys::files::SUMMARY)
                .await
                .map_err(|e| e.to_string());
            b.push_str(&report_section(&rec.id, summary))
        }
        _ => {}
    }
    Html(page(&format!("Job {id}"), &b)).into_response()
}

fn class_name(classes: &[String], c: i64) -> String {
    usize::try_from(c)
        .ok()
        .and_then(|i| classes.get(i))
        .cloned()
        .unwrap_or_else(|| c.to_string())
}

fn label_form(
    job: &str,
    scenarios: &[defuse_core::scenarios::Scenario],
    classes: &[String],
) -> String {
    let mut b = format!(
        r#"<h2>Label the failure scenarios</h2>
<p>Each scenario is a cluster of inputs the classifier gets wrong; the grid shows samples
from it, with the classifier's prediction on each below it (row by row). Give each
scenario the class a person would see, or discard it (not a failure, or unclear).
Tab moves between scenarios; type to pick a class.</p>
<form method="post" action="/jobs/{}/labels" id="labels">
<div class="scenarios">"#,
        esc(job)
    );
    for (i, s) in scenarios.iter().enumerate() {
        let preds: Vec<String> = s
            .sample_predictions
            .iter()
            .map(|&p| class_name(classes, p))
            .collect();
        let mut by_count: Vec<(&i64, &usize)> = s.source_labels.iter().collect();
        by_count.sort_by_key(|(l, n)| (std::cmp::Reverse(**n), **l));
        let sources: Vec<String> = by_count
            .iter()
            .map(|(l, n)| format!("{} ×{n}", class_name(classes, **l)))
            .collect();
        let mut options = String::from(
            r#"<option value="" selected>choose…</option><option value="discard">discard</option>"#,
        );
        for (c, name) in classes.iter().enumerate() {
            let _ = write!(
                options,
                r#"<option value="{c}">{c}: {}</option>"#,
                esc(name)
            );
        }
        let _ = write!(
            b,
            r#"<section class="scenario" id="scenario-{id}">
<h3>Scenario {id}</h3>
<img src="/jobs/{job}/scenarios/{id}/grid.png" alt="samples of scenario {id}">
<p class="preds">predicted (row by row): {preds}</p>
<p>Nearest real training images:</p>
<img class="nearest" src="/jobs/{job}/scenarios/{id}/nearest.png" alt="training images nearest scenario {id}">
<p>{size} failures · weight {weight:.3} · mostly predicted <b>{pred}</b><br>
source images labelled: {sources}</p>
<label>Label <select name="scenario-{id}" id="label-{id}" required{autofocus}>{options}</select></label>
</section>"#,
            id = s.id,
            job = esc(job),
            preds = esc(&preds.join(" ")),
            size = s.size,
            weight = s.weight,
            pred = esc(&class_name(classes, s.predicted)),
            sources = esc(&sources.join(", ")),
            autofocus = if i == 0 { " autofocus" } else { "" },
        );
    }
    b.push_str(
        r#"</div>
<p><button type="submit" id="submit-labels">Submit labels and correct the classifier</button></p>
</form>"#,
    );
    b
}

fn report_section(job: &str, summary: Result<bytes::Bytes, String>) -> String {
    let s: defuse_core::report::Summary =
        match summary.and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string())) {
            Ok(s) => s,
            Err(e) => return format!(r#"<p class="error">report: {}</p>"#, esc(&e)),
        };
    let mut b = format!(
        r#"<h2>Report</h2>
<table id="report"><thead><tr><th></th><th>before</th><th>after</th></tr></thead><tbody>
<tr><td>test accuracy</td><td class="num" id="test-before">{}</td><td class="num" id="test-after">{}</td></tr>
<tr><td>failure-scenario accuracy ({} held-out samples)</td><td class="num" id="scenario-before">{}</td><td class="num" id="scenario-after">{}</td></tr>
</tbody></table>
<p>{} images searched, {} perturbations, {} failures from {} images; {} scenarios, {} labelled, {} discarded.</p>
<div class="scenarios">"#,
        pct(s.test_accuracy_before),
        pct(s.test_accuracy_after),
        s.scenario_test_samples,
        pct(s.scenario_accuracy_before),
        pct(s.scenario_accuracy_after),
        s.n_images_searched,
        s.n_perturbations,
        s.n_failures,
        s.n_images_with_failure,
        s.n_scenarios,
        s.n_labelled,
        s.n_discarded,
    );
    for sc in &s.scenarios {
        let label = sc.label_name.as_deref().unwrap_or("discarded");
        let acc = match (sc.accuracy_before, sc.accuracy_after) {
            (Some(a), Some(z)) => format!("accuracy {} → {}", pct(a), pct(z)),
            _ => String::new(),
        };
        let _ = write!(
            b,
            r#"<section class="scenario"><h3>Scenario {id}: {label}</h3>
<img src="/jobs/{job}/scenarios/{id}/grid.png" alt="samples of scenario {id}">
<p>{size} failures · was read as {pred} · {acc}</p></section>"#,
            id = sc.id,
            label = esc(label),
            job = esc(job),
            size = sc.size,
            pred = esc(&sc.predicted_name),
        );
    }
    b.push_str("</div>");
    b
}

/// `grid.png` (samples of the scenario) or `nearest.png` (the nearest training images).
async fn scenario_png(
    State(app): State<App>,
    Path((id, sid, picture)): Path<(String, usize, String)>,
) -> Response {
    let file = match picture.as_str() {
        "grid.png" => crate::keys::files::scenario_grid(sid),
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

/// Form fields `scenario-<id>` = class id | "discard".
async fn labels_form(
    State(app): State<App>,
    Path(id): Path<String>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let back = format!("/jobs/{id}");
    let mut pairs = Vec::new();
    for (k, v) in fields {
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
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// A JSON body, or the 415/400 that says why not.
fn json_body<T: serde::de::DeserializeOwned>(
    h: &HeaderMap,
    body: &[u8],
) -> Result<T, Box<Response>> {
    let ct = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/json") {
        return Err(Box::new((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Json(serde_json::json!({"error": format!("Content-Type must be application/json, not '{ct}'")})),
        )
            .into_response()));
    }
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
    match app.coord.submit(&b.config, b.job_id).await {
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
            ([(header::CONTENT_TYPE, ct)], bytes).into_response()
        }
        Err(e) => error_json(e),
    }
}

/// Body: `{"<scenario id>": <class id> | "<class name>" | "discard"}`.
async fn api_labels(State(app): State<App>, Path(id): Path<String>, body: Bytes) -> Response {
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

/// The rustls acceptor for HTTPS, from the coordinator's certificate (the same as
/// gRPC's). HTTP/2 and HTTP/1.1 are offered.
pub fn tls_acceptor(
    pem: &defuse_proto::tls::ServerPem,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(&pem.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS certificate: {e}"))?;
    if certs.is_empty() {
        return Err("TLS certificate: no PEM certificate in the file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| format!("TLS key: {e}"))?;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate and key: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Serves `app` over TLS until `stop`: one task per connection; a failed handshake
/// (a plain-HTTP client, a client that does not trust the certificate) ends only that
/// connection.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    acceptor: tokio_rustls::TlsAcceptor,
    stop: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let mut stop = std::pin::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut stop => return Ok(()),
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // e.g. out of file descriptors: wait instead of spinning
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            // a peer that connects and says nothing must not hold a task forever
            let hs = tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp));
            let tls = match hs.await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "tls handshake timed out");
                    return;
                }
            };
            let svc = hyper_util::service::TowerToHyperService::new(app);
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "https connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
    }

    #[test]
    fn token_from_header_or_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_token(&h), None);
        h.insert(header::COOKIE, "a=b; defuse_token=s3cret".parse().unwrap());
        assert_eq!(presented_token(&h).as_deref(), Some("s3cret"));
        h.insert(header::AUTHORIZATION, "Bearer other".parse().unwrap());
        assert_eq!(presented_token(&h).as_deref(), Some("other"));
    }
}
