//! The HTTP API through `router().oneshot()`: authentication, CSRF, tenancy, validation and
//! the error shape. No sockets; a real sled store in a temp directory.

#![allow(clippy::unwrap_used)]

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use gantry_hub::config::Config;
use gantry_hub::Hub;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

const PASSWORD: &str = "a long enough password";

struct Fixture {
    hub: Arc<Hub>,
    operator_key: String,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fixture() -> Fixture {
    let dir = std::env::temp_dir().join(format!("gantry-api-{}-{:x}", std::process::id(), rand::random::<u64>()));
    gantry_hub::init(&dir, "127.0.0.1:7443", "ops@example.com", Some(PASSWORD)).unwrap();
    let operator_key = std::fs::read_to_string(dir.join("operator.key")).unwrap().trim().to_string();
    let hub = Hub::open(Config { data_dir: dir.clone(), ..Config::default() }).unwrap();
    Fixture { hub, operator_key, _dir: TempDir(dir) }
}

async fn call(hub: &Arc<Hub>, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let response = gantry_hub::api::router(hub.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, headers, body)
}

fn json_request(method: &str, uri: &str, auth: Option<&str>, body: Value) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = auth {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    builder.body(Body::from(body.to_string())).unwrap()
}

fn get(uri: &str, auth: Option<&str>) -> Request<Body> {
    let mut builder = Request::builder().uri(uri);
    if let Some(key) = auth {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    builder.body(Body::empty()).unwrap()
}

fn assert_error(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

#[tokio::test]
async fn requests_without_credentials_are_refused() {
    let f = fixture();
    let (status, _, body) = call(&f.hub, get("/api/v1/orgs", None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_error(&body, "unauthorized");
    let (status, _, body) = call(&f.hub, get("/api/v1/orgs", Some("gk_nope.nope"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_error(&body, "unauthorized");
    let (status, _, _) = call(&f.hub, get("/healthz", None)).await;
    assert_eq!(status, StatusCode::OK);
    // Not serving QUIC yet: not ready.
    let (status, _, _) = call(&f.hub, get("/readyz", None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _, body) = call(&f.hub, get("/api/v1/nowhere", None)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found");
    let (status, _, body) = call(&f.hub, json_request("DELETE", "/api/v1/orgs", None, json!({}))).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_error(&body, "method_not_allowed");
}

#[tokio::test]
async fn login_sets_a_session_cookie_and_cookie_requests_are_csrf_protected() {
    let f = fixture();
    let (status, _, body) =
        call(&f.hub, json_request("POST", "/api/v1/auth/login", None, json!({ "email": "ops@example.com", "password": "wrong password!!" }))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_error(&body, "invalid_credentials");
    let (status, headers, body) =
        call(&f.hub, json_request("POST", "/api/v1/auth/login", None, json!({ "email": "OPS@example.com", "password": PASSWORD }))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let cookie = headers.get(header::SET_COOKIE).unwrap().to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"), "{cookie}");
    let value = cookie.split(';').next().unwrap().to_string();
    assert!(value.len() > "gantry_session=".len() + 32, "session id has at least 128 bits");

    let with_cookie = |method: &str, uri: &str, content_type: &str, body: &str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header(header::COOKIE, value.clone())
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let (status, _, body) = call(&f.hub, with_cookie("GET", "/api/v1/auth/me", "text/plain", "")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["name"], "ops@example.com");
    // A cross-site form post carrying the cookie is refused and creates nothing.
    let (status, _, body) = call(&f.hub, with_cookie("POST", "/api/v1/orgs", "application/x-www-form-urlencoded", "id=evil")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_error(&body, "forbidden");
    assert!(f.hub.store.org("evil").unwrap().is_none());
    let (status, _, _) = call(&f.hub, with_cookie("POST", "/api/v1/orgs", "application/json", r#"{"id":"good"}"#)).await;
    assert_eq!(status, StatusCode::CREATED);
    // Logout ends the session server-side.
    let (status, _, _) = call(&f.hub, with_cookie("POST", "/api/v1/auth/logout", "application/json", "")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) = call(&f.hub, with_cookie("GET", "/api/v1/auth/me", "text/plain", "")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let f = fixture();
    let key = Some(f.operator_key.as_str());
    let (status, _, body) = call(&f.hub, json_request("POST", "/api/v1/orgs", key, json!({ "id": "Not A Slug" }))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, "bad_request");
    let (status, _, body) = call(&f.hub, json_request("POST", "/api/v1/orgs", key, json!({ "id": "acme", "colour": "red" }))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, "invalid_body");
    let broken = Request::builder()
        .method("POST")
        .uri("/api/v1/orgs")
        .header(header::AUTHORIZATION, format!("Bearer {}", f.operator_key))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"id\":"))
        .unwrap();
    let (status, _, body) = call(&f.hub, broken).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, "bad_request");
    let huge = json!({ "id": "x".repeat(300 * 1024) });
    let (status, _, body) = call(&f.hub, json_request("POST", "/api/v1/orgs", key, huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&body, "payload_too_large");
    assert!(f.hub.store.orgs().unwrap().is_empty(), "nothing was created");

    let (status, _, _) = call(&f.hub, json_request("POST", "/api/v1/orgs", key, json!({ "id": "acme", "agent_limit": 3 }))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _, body) = call(&f.hub, json_request("POST", "/api/v1/orgs", key, json!({ "id": "acme" }))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_error(&body, "conflict");

    for (bad, why) in [
        (json!({ "ttl": "forever" }), "ttl text"),
        (json!({ "ttl": 0 }), "zero ttl"),
        (json!({ "uses": 0 }), "zero uses"),
        (json!({ "labels": { "bad key!": "v" } }), "label key"),
        (json!({ "ttl": "1h", "extra": true }), "unknown field"),
    ] {
        let (status, _, body) = call(&f.hub, json_request("POST", "/api/v1/orgs/acme/enrollment-tokens", key, bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}: {body}");
        assert!(body["error"]["code"].is_string(), "{why}: {body}");
    }
    let (status, _, body) = call(&f.hub, json_request("POST", "/api/v1/orgs/nope/enrollment-tokens", key, json!({}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, "not_found");

    let (status, _, body) =
        call(&f.hub, json_request("POST", "/api/v1/orgs/acme/enrollment-tokens", key, json!({ "ttl": "2h", "uses": 3, "labels": { "env": "prod" } }))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(body["token"].as_str().unwrap().starts_with("gt1_"));
    assert!(body["enroll_command"].as_str().unwrap().contains("gantry-agent enroll --token gt1_"));
    assert_eq!(body["labels"]["env"], "prod");
}

#[tokio::test]
async fn org_scoped_keys_see_only_their_org() {
    let f = fixture();
    let key = Some(f.operator_key.as_str());
    for org in ["red", "blue"] {
        let (status, _, _) = call(&f.hub, json_request("POST", "/api/v1/orgs", key, json!({ "id": org }))).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (_, red_key) = gantry_hub::auth::create_api_key(&f.hub, "red key", Some("red".into()), "test").unwrap();
    let red = Some(red_key.as_str());
    let (status, _, body) = call(&f.hub, get("/api/v1/orgs", red)).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<_> = body["orgs"].as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["red"]);
    let (status, _, _) = call(&f.hub, get("/api/v1/orgs/red/agents", red)).await;
    assert_eq!(status, StatusCode::OK);
    for uri in ["/api/v1/orgs/blue", "/api/v1/orgs/blue/agents"] {
        let (status, _, body) = call(&f.hub, get(uri, red)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        assert_error(&body, "not_found");
    }
    let (status, _, _) = call(&f.hub, json_request("POST", "/api/v1/orgs/blue/enrollment-tokens", red, json!({}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, body) = call(&f.hub, json_request("POST", "/api/v1/orgs", red, json!({ "id": "green" }))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_error(&body, "forbidden");
    let (status, _, _) = call(&f.hub, get("/api/v1/agents/agt_missing", red)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = call(&f.hub, json_request("POST", "/api/v1/agents/agt_missing/revoke", red, json!({}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let f = fixture();
    let (status, headers, body) = call(&f.hub, get("/metrics", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/plain"));
    let text = body.as_str().unwrap();
    assert!(text.contains("# TYPE gantry_agents_connected gauge"));
    assert!(text.contains("gantry_enrollments_total{result=\"ok\"} 0"));
}

#[tokio::test]
async fn dashboard_requires_login() {
    let f = fixture();
    let (status, headers, _) = call(&f.hub, get("/", None)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers[header::LOCATION], "/login");
    let (status, _, body) = call(&f.hub, get("/login", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.as_str().unwrap().contains("Sign in to Gantry"));
    let form = Request::builder()
        .method("POST")
        .uri("/login")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("email=ops%40example.com&password={}", PASSWORD.replace(' ', "+"))))
        .unwrap();
    let (status, headers, _) = call(&f.hub, form).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = headers[header::SET_COOKIE].to_str().unwrap().split(';').next().unwrap().to_string();
    let page = Request::builder().uri("/").header(header::COOKIE, cookie).body(Body::empty()).unwrap();
    let (status, _, body) = call(&f.hub, page).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.as_str().unwrap().contains("No orgs yet"), "an operator with no orgs is told to create one");
}

#[tokio::test]
async fn retention_prunes_telemetry_older_than_the_orgs_retention() {
    use gantry_shared::message::StreamClass;
    use gantry_shared::telemetry::{LogLine, LogStream, Record, RecordBody};
    let f = fixture();
    let key = Some(f.operator_key.as_str());
    let (status, _, body) = call(&f.hub, json_request("POST", "/api/v1/orgs", key, json!({ "id": "short", "retention_days": 1 }))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["retention_days"], 1);
    let (status, _, _) = call(&f.hub, json_request("POST", "/api/v1/orgs", key, json!({ "id": "bad", "retention_days": 99999 }))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let token = gantry_hub::store::Token {
        id: "tok_1".into(),
        org: "short".into(),
        secret_sha256: "x".into(),
        labels: vec![],
        expires_at_ms: i64::MAX,
        uses_total: 1,
        uses_left: 1,
        revoked: false,
        created_by: "test".into(),
        created_at_ms: 0,
    };
    f.hub.store.create_token(&token).unwrap();
    let agent = gantry_hub::store::Agent { id: "agt_old".into(), org: "short".into(), ..Default::default() };
    f.hub.store.enroll("tok_1", 0, &agent).unwrap().unwrap();
    let now = gantry_hub::wall_ms();
    let log = |seq: u64, ts: i64| Record {
        seq,
        ts_unix_ms: ts,
        body: RecordBody::Log(LogLine { source: "/a".into(), stream: LogStream::File, container: None, line: format!("{seq}") }),
    };
    let day = 86_400_000;
    f.hub.store.ingest("agt_old", StreamClass::Logs, &[log(1, now - 3 * day), log(2, now - 2 * day), log(3, now - 1000)]).await.unwrap();
    let removed = gantry_hub::retention::run_once(&f.hub, now).unwrap();
    assert_eq!(removed, 2);
    let left = f.hub.store.records("agt_old", StreamClass::Logs, &Default::default(), None, 10).unwrap();
    assert_eq!(left.iter().map(|r| r.seq).collect::<Vec<_>>(), [3]);
    // A late resend of pruned records is still a duplicate.
    let again = f.hub.store.ingest("agt_old", StreamClass::Logs, &[log(1, now - 3 * day)]).await.unwrap();
    assert_eq!(again.duplicates, 1);
    let (_, _, metrics) = call(&f.hub, get("/metrics", None)).await;
    let text = metrics.as_str().unwrap();
    assert!(text.contains("gantry_retention_runs_total 1") && text.contains("gantry_retention_pruned_total 2"), "{text}");
}

#[tokio::test]
async fn org_views_merge_agents_and_never_cross_tenants() {
    use gantry_shared::message::StreamClass;
    use gantry_shared::telemetry::{Event, LogLine, LogStream, Record, RecordBody, Severity};
    let f = fixture();
    let key = Some(f.operator_key.as_str());
    for org in ["red", "blue"] {
        call(&f.hub, json_request("POST", "/api/v1/orgs", key, json!({ "id": org }))).await;
        let token = gantry_hub::store::Token {
            id: format!("tok_{org}"),
            org: org.into(),
            secret_sha256: "x".into(),
            labels: vec![],
            expires_at_ms: i64::MAX,
            uses_total: 2,
            uses_left: 2,
            revoked: false,
            created_by: "test".into(),
            created_at_ms: 0,
        };
        f.hub.store.create_token(&token).unwrap();
        for n in 1..=2 {
            let agent = gantry_hub::store::Agent { id: format!("agt_{org}{n}"), org: org.into(), ..Default::default() };
            f.hub.store.enroll(&token.id, 0, &agent).unwrap().unwrap();
            let records: Vec<Record> = (1..=3u64)
                .map(|seq| Record {
                    seq,
                    ts_unix_ms: 1000 + (seq as i64) * 10 + n,
                    body: RecordBody::Log(LogLine { source: "/app.log".into(), stream: LogStream::File, container: None, line: format!("{org}{n}-{seq}") }),
                })
                .collect();
            f.hub.store.ingest(&agent.id, StreamClass::Logs, &records).await.unwrap();
            let event = Record {
                seq: 1,
                ts_unix_ms: 2000 + n,
                body: RecordBody::Event(Event {
                    kind: "docker.container.die".into(),
                    severity: Severity::Warning,
                    message: "exit 1".into(),
                    attributes: vec![],
                }),
            };
            f.hub.store.ingest(&agent.id, StreamClass::Events, &[event]).await.unwrap();
        }
    }
    // Org view: both agents merged in time order, paginated across agents.
    let (status, _, page) = call(&f.hub, get("/api/v1/orgs/red/logs?limit=4", key)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let lines: Vec<&str> = page["records"].as_array().unwrap().iter().map(|r| r["line"].as_str().unwrap()).collect();
    assert_eq!(lines, ["red1-1", "red2-1", "red1-2", "red2-2"]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, _, rest) = call(&f.hub, get(&format!("/api/v1/orgs/red/logs?limit=4&cursor={cursor}"), key)).await;
    let lines: Vec<&str> = rest["records"].as_array().unwrap().iter().map(|r| r["line"].as_str().unwrap()).collect();
    assert_eq!(lines, ["red1-3", "red2-3"]);
    let (_, _, events) = call(&f.hub, get("/api/v1/orgs/red/events?kind=docker.", key)).await;
    assert_eq!(events["records"].as_array().unwrap().len(), 2);
    assert_eq!(events["records"][0]["agent"], "agt_red1");

    // An org-scoped key sees its own org's telemetry and nothing of the other's.
    let (_, red_key) = gantry_hub::auth::create_api_key(&f.hub, "red", Some("red".into()), "test").unwrap();
    let red = Some(red_key.as_str());
    let (status, _, _) = call(&f.hub, get("/api/v1/agents/agt_red1/logs", red)).await;
    assert_eq!(status, StatusCode::OK);
    for uri in [
        "/api/v1/agents/agt_blue1/logs",
        "/api/v1/agents/agt_blue1/events",
        "/api/v1/agents/agt_blue1/metrics",
        "/api/v1/agents/agt_blue1/logs/stream",
        "/api/v1/orgs/blue/logs",
        "/api/v1/orgs/blue/events",
    ] {
        let (status, _, body) = call(&f.hub, get(uri, red)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}: {body}");
    }
    let (status, _, body) = call(&f.hub, get("/api/v1/agents/agt_red1/logs?cursor=garbage", red)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _, _) = call(&f.hub, get("/api/v1/agents/agt_red1/logs?order=sideways", red)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = call(&f.hub, get("/api/v1/agents/agt_red1/logs?bogus=1", red)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

fn add_agent(f: &Fixture, org: &str, id: &str, labels: &[(&str, &str)]) {
    let token = gantry_hub::store::Token {
        id: format!("tok_{id}"),
        org: org.into(),
        secret_sha256: "x".into(),
        labels: vec![],
        expires_at_ms: i64::MAX,
        uses_total: 1,
        uses_left: 1,
        revoked: false,
        created_by: "test".into(),
        created_at_ms: 0,
    };
    f.hub.store.create_token(&token).unwrap();
    let agent = gantry_hub::store::Agent {
        id: id.into(),
        org: org.into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    f.hub.store.enroll(&token.id, 0, &agent).unwrap().unwrap();
}

fn web_spec(image: &str) -> Value {
    json!({
        "name": "web",
        "services": [{ "name": "app", "image": image, "ports": [{ "host": 8080, "container": 80 }],
                       "health": { "http": { "port": 8080, "path": "/health" } } }],
        "strategy": { "rolling": { "batch_size": 1 } }
    })
}

#[tokio::test]
async fn deployments_have_revisions_history_and_rollback() {
    let f = fixture();
    let key = Some(f.operator_key.as_str());
    for org in ["red", "blue"] {
        call(&f.hub, json_request("POST", "/api/v1/orgs", key, json!({ "id": org }))).await;
    }
    add_agent(&f, "red", "agt_r1", &[("env", "prod")]);
    add_agent(&f, "red", "agt_r2", &[("env", "staging")]);
    add_agent(&f, "blue", "agt_b1", &[("env", "prod")]);

    let body = json!({ "spec": web_spec("web:1"), "targets": { "selector": { "env": "prod" } } });
    let (status, _, created) = call(&f.hub, json_request("POST", "/api/v1/orgs/red/deployments", key, body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["revision"], 1);
    assert_eq!(created["target_agents"], json!(["agt_r1"]), "selector picks only the org's matching agents");
    let id = created["id"].as_str().unwrap().to_string();

    let body = json!({ "spec": web_spec("web:2"), "targets": { "selector": { "env": "prod" } } });
    let (status, _, updated) = call(&f.hub, json_request("PUT", &format!("/api/v1/deployments/{id}"), key, body)).await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["revision"], 2);
    let (_, _, rolled) = call(&f.hub, json_request("POST", &format!("/api/v1/deployments/{id}/rollback"), key, json!({ "revision": 1 }))).await;
    assert_eq!(rolled["revision"], 3);
    assert_eq!(rolled["spec"]["services"][0]["image"], "web:1");
    let (_, _, history) = call(&f.hub, get(&format!("/api/v1/deployments/{id}/revisions"), key)).await;
    let changes: Vec<&str> = history["revisions"].as_array().unwrap().iter().map(|r| r["change"].as_str().unwrap()).collect();
    assert_eq!(changes, ["created", "updated: spec.services[0].image", "rollback to 1"]);
    assert!(history["revisions"].as_array().unwrap().iter().all(|r| r["created_by"] == "key:".to_string() + &f.operator_key[3..19]));

    // Another org's key sees nothing of it.
    let (_, blue_key) = gantry_hub::auth::create_api_key(&f.hub, "blue", Some("blue".into()), "test").unwrap();
    let blue = Some(blue_key.as_str());
    for (method, uri) in
        [("GET", format!("/api/v1/deployments/{id}")), ("GET", format!("/api/v1/deployments/{id}/revisions")), ("DELETE", format!("/api/v1/deployments/{id}"))]
    {
        let (status, _, _) = call(&f.hub, json_request(method, &uri, blue, json!({}))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {uri}");
    }
    let (status, _, _) = call(&f.hub, json_request("POST", &format!("/api/v1/deployments/{id}/rollback"), blue, json!({}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Delete frees the name.
    let (status, _, deleted) = call(&f.hub, json_request("DELETE", &format!("/api/v1/deployments/{id}"), key, json!({}))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(deleted["deleted_at"].is_string());
    let body = json!({ "spec": web_spec("web:1"), "targets": { "agents": ["agt_r2"] } });
    let (status, _, _) = call(&f.hub, json_request("POST", "/api/v1/orgs/red/deployments", key, body)).await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn bad_deployment_specs_are_refused_precisely_and_change_nothing() {
    let f = fixture();
    let key = Some(f.operator_key.as_str());
    for org in ["red", "blue"] {
        call(&f.hub, json_request("POST", "/api/v1/orgs", key, json!({ "id": org }))).await;
    }
    add_agent(&f, "blue", "agt_b1", &[]);
    let mut unknown = web_spec("web:1");
    unknown["services"][0]["colour"] = json!("red");
    let mut port = web_spec("web:1");
    port["services"][0]["ports"][0]["host"] = json!(70000);
    let cases = [
        (json!({ "spec": unknown, "targets": { "selector": { "a": "b" } } }), 400, "unknown field `colour`"),
        (json!({ "spec": port, "targets": { "selector": { "a": "b" } } }), 400, "services[0].ports[0].host"),
        (json!({ "spec": web_spec(""), "targets": { "selector": { "a": "b" } } }), 400, "services[0].image must not be empty"),
        (json!({ "spec": web_spec("web:1"), "targets": { "selector": { "bad key!": "b" } } }), 400, "targets.selector"),
        (json!({ "spec": web_spec("web:1"), "targets": {} }), 400, "targets must list agents"),
        (json!({ "spec": web_spec("web:1"), "targets": { "agents": ["agt_b1"] } }), 404, "target agent agt_b1 not found"),
        (json!({ "spec": web_spec("web:1") }), 400, "missing field `targets`"),
    ];
    for (body, want, message) in cases {
        let (status, _, reply) = call(&f.hub, json_request("POST", "/api/v1/orgs/red/deployments", key, body)).await;
        assert_eq!(status.as_u16(), want, "{message}: {reply}");
        assert!(reply["error"]["message"].as_str().unwrap().contains(message), "want {message:?} in {reply}");
    }
    let (_, _, list) = call(&f.hub, get("/api/v1/orgs/red/deployments", key)).await;
    assert_eq!(list["deployments"].as_array().unwrap().len(), 0, "nothing was created");
}

#[tokio::test]
async fn deployment_progress_streams_each_agents_state_changes() {
    use gantry_shared::message::{DeployReport, DeployState};
    let f = fixture();
    let key = Some(f.operator_key.as_str());
    call(&f.hub, json_request("POST", "/api/v1/orgs", key, json!({ "id": "red" }))).await;
    add_agent(&f, "red", "agt_r1", &[("env", "prod")]);
    let body = json!({ "spec": web_spec("web:1"), "targets": { "agents": ["agt_r1"] } });
    let (_, _, created) = call(&f.hub, json_request("POST", "/api/v1/orgs/red/deployments", key, body)).await;
    let id = created["id"].as_str().unwrap().to_string();
    let response = gantry_hub::api::router(f.hub.clone()).oneshot(get(&format!("/api/v1/deployments/{id}/progress"), key)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut seen = String::new();
    let report = |state: DeployState, message: &str| DeployReport { deployment_id: id.clone(), revision: 1, state, message: message.into() };
    gantry_hub::orchestrator::report(&f.hub, "agt_r1", "red", report(DeployState::Applying, "applying"));
    let mut reported_healthy = false;
    let read = async {
        while !seen.contains("\"state\":\"healthy\"") {
            let frame = body.frame().await.unwrap().unwrap();
            if let Ok(data) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
            if seen.contains("\"state\":\"applying\"") && !reported_healthy {
                reported_healthy = true;
                gantry_hub::orchestrator::report(&f.hub, "agt_r1", "red", report(DeployState::Healthy, "healthy"));
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read).await.expect("progress events");
    assert!(seen.contains("event: status") && seen.contains("\"agent\":\"agt_r1\""), "{seen}");
    // Reports about another org's deployment are ignored.
    gantry_hub::orchestrator::report(&f.hub, "agt_r1", "blue", report(DeployState::Failed, "spoofed"));
    let (_, _, view) = call(&f.hub, get(&format!("/api/v1/deployments/{id}"), key)).await;
    assert_eq!(view["agents"]["agt_r1"]["state"], "healthy");
}

#[tokio::test]
async fn secrets_and_registry_logins_are_sealed_and_reach_only_deploy_commands() {
    let f = fixture();
    let key = Some(f.operator_key.as_str());
    for org in ["red", "blue"] {
        call(&f.hub, json_request("POST", "/api/v1/orgs", key, json!({ "id": org }))).await;
    }
    add_agent(&f, "red", "agt_r1", &[("env", "prod")]);
    const VALUE: &str = "s3cr3t-db-password-7f1c";
    const PASSWORD: &str = "registry-pass-93ab";

    // Bad input: clear errors, nothing stored.
    let bad = [
        ("/api/v1/orgs/red/secrets/bad%20name", json!({ "value": "x" }), 400, "secret name"),
        ("/api/v1/orgs/red/secrets/db", json!({ "value": "x", "extra": 1 }), 400, "unknown field `extra`"),
        ("/api/v1/orgs/red/secrets/db", json!({}), 400, "missing field `value`"),
        ("/api/v1/orgs/nope/secrets/db", json!({ "value": "x" }), 404, "org nope not found"),
        ("/api/v1/orgs/red/registries/Bad_Host", json!({ "username": "u", "password": "p" }), 400, "lowercase host name"),
        ("/api/v1/orgs/red/registries/reg.example.com:99999", json!({ "username": "u", "password": "p" }), 400, "lowercase host name"),
        ("/api/v1/orgs/red/registries/reg.example.com", json!({ "username": "", "password": "p" }), 400, "username"),
    ];
    for (uri, body, want, message) in bad {
        let (status, _, reply) = call(&f.hub, json_request("PUT", uri, key, body)).await;
        assert_eq!(status.as_u16(), want, "{uri}: {reply}");
        assert!(reply["error"]["message"].as_str().unwrap().contains(message), "want {message:?} in {reply}");
    }
    let (_, _, list) = call(&f.hub, get("/api/v1/orgs/red/secrets", key)).await;
    assert_eq!(list["secrets"], json!([]));

    // Stored; reads never show the value.
    let (status, _, put) = call(&f.hub, json_request("PUT", "/api/v1/orgs/red/secrets/db-password", key, json!({ "value": VALUE }))).await;
    assert_eq!(status, StatusCode::CREATED, "{put}");
    let (status, _, _) = call(&f.hub, json_request("PUT", "/api/v1/orgs/red/secrets/db-password", key, json!({ "value": VALUE }))).await;
    assert_eq!(status, StatusCode::OK, "replacing answers 200");
    let (status, _, _) =
        call(&f.hub, json_request("PUT", "/api/v1/orgs/red/registries/registry.example.com:5000", key, json!({ "username": "deploy", "password": PASSWORD })))
            .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, _, secrets) = call(&f.hub, get("/api/v1/orgs/red/secrets", key)).await;
    let (_, _, registries) = call(&f.hub, get("/api/v1/orgs/red/registries", key)).await;
    assert_eq!(secrets["secrets"][0]["name"], "db-password");
    assert_eq!(registries["registries"][0]["username"], "deploy");
    for shown in [&secrets, &registries] {
        assert!(!shown.to_string().contains(VALUE) && !shown.to_string().contains(PASSWORD), "{shown}");
    }
    // Another org sees none of them.
    let (_, blue_key) = gantry_hub::auth::create_api_key(&f.hub, "blue", Some("blue".into()), "test").unwrap();
    let (status, _, _) = call(&f.hub, get("/api/v1/orgs/red/secrets", Some(&blue_key))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another org's secrets are not even shown to exist");
    let (_, _, blue) = call(&f.hub, get("/api/v1/orgs/blue/secrets", Some(&blue_key))).await;
    assert_eq!(blue["secrets"], json!([]));

    // A spec referencing an undefined secret is refused; a defined one is sent, with the
    // registry login, in the deploy command.
    let mut spec = web_spec("registry.example.com:5000/team/web:1");
    spec["services"][0]["env"] = json!([{ "name": "DB_PASSWORD", "secret": "db-password" }, { "name": "API", "secret": "api-token" }]);
    let (status, _, reply) =
        call(&f.hub, json_request("POST", "/api/v1/orgs/red/deployments", key, json!({ "spec": spec, "targets": { "agents": ["agt_r1"] } }))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reply["error"]["message"].as_str().unwrap().contains("secret \"api-token\" is not defined in org red"), "{reply}");
    spec["services"][0]["env"] = json!([{ "name": "DB_PASSWORD", "secret": "db-password" }]);
    let (status, _, created) =
        call(&f.hub, json_request("POST", "/api/v1/orgs/red/deployments", key, json!({ "spec": spec, "targets": { "agents": ["agt_r1"] } }))).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert!(!created.to_string().contains(VALUE));
    let deployment = f.hub.store.deployment(created["id"].as_str().unwrap()).unwrap().unwrap();
    let command = gantry_hub::orchestrator::deploy_command(&f.hub, &deployment, 1).unwrap();
    assert_eq!(command.secrets, vec![("db-password".to_string(), VALUE.to_string())]);
    assert_eq!(command.registry_auth.len(), 1);
    assert_eq!(
        (command.registry_auth[0].server.as_str(), command.registry_auth[0].username.as_str(), command.registry_auth[0].password.as_str()),
        ("registry.example.com:5000", "deploy", PASSWORD)
    );
    let printed = format!("{command:?}");
    assert!(!printed.contains(VALUE) && !printed.contains(PASSWORD), "debug output redacts: {printed}");

    // Deleting: gone from the list; 404 the second time.
    let (status, _, _) = call(&f.hub, json_request("DELETE", "/api/v1/orgs/red/registries/registry.example.com:5000", key, json!({}))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(&f.hub, json_request("DELETE", "/api/v1/orgs/red/registries/registry.example.com:5000", key, json!({}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(gantry_hub::orchestrator::deploy_command(&f.hub, &deployment, 1).unwrap().registry_auth.is_empty());

    // At rest: no clear value anywhere in the data directory's store.
    f.hub.store.flush().await.unwrap();
    let mut stack = vec![f._dir.0.join("store")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                assert!(!bytes.windows(VALUE.len()).any(|w| w == VALUE.as_bytes()), "{} holds the secret in clear", path.display());
            }
        }
    }
}

#[tokio::test]
async fn a_hub_with_another_secrets_key_refuses_to_start() {
    let f = fixture();
    let key = Some(f.operator_key.as_str());
    call(&f.hub, json_request("POST", "/api/v1/orgs", key, json!({ "id": "red" }))).await;
    let (status, _, _) = call(&f.hub, json_request("PUT", "/api/v1/orgs/red/secrets/db", key, json!({ "value": "v" }))).await;
    assert_eq!(status, StatusCode::CREATED);
    let dir = f._dir.0.clone();
    drop(f.hub);
    let other = dir.join("other.key");
    std::fs::write(&other, [7u8; 32]).unwrap();
    let error = Hub::open(Config { data_dir: dir.clone(), secrets_key_file: Some(other), ..Config::default() }).unwrap_err().to_string();
    assert!(error.contains("is not the key the store's secrets were sealed with"), "{error}");
    let missing = Hub::open(Config { data_dir: dir.clone(), secrets_key_file: Some(dir.join("missing.key")), ..Config::default() }).unwrap_err().to_string();
    assert!(missing.contains("is missing"), "{missing}");
    // The right key still opens.
    let hub = Hub::open(Config { data_dir: dir.clone(), ..Config::default() }).unwrap();
    assert_eq!(hub.store.secrets_of("red").unwrap().len(), 1);
}
