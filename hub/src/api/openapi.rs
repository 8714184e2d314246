//! The OpenAPI 3.1 document of the HTTP API, served at [`OPENAPI_PATH`].
//!
//! Routes are registered through [`Routes`], which adds each one to the axum `Router` and
//! records its operation (method, path template, summary, tag, request body, query string,
//! response, security) in the same call, so the document cannot miss or invent a route.
//! Schemas come from the handlers' own types through `schemars` (JSON Schema 2020-12, the
//! dialect of OpenAPI 3.1), with serde's attributes (`rename_all`, `tag`, `default`,
//! `deny_unknown_fields`) reflected; they live under `components/schemas`.
//!
//! This module only describes and routes: it knows no handler, store or credential.

use axum::handler::Handler;
use axum::http::{header, HeaderValue};
use axum::response::IntoResponse;
use axum::routing::{on, MethodFilter};
use axum::Router;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;

/// Where the hub serves the document (public, like the probes).
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

/// Where the schemas of the document live.
const SCHEMAS: &str = "/components/schemas";

/// Builds a schema (a `$ref` into the components, or an inline schema) with the generator.
type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn reference<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

fn inline<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    T::json_schema(generator)
}

/// What a successful answer carries.
#[derive(Debug, Clone, Copy)]
enum Body {
    /// A JSON object this API builds ad hoc (no Rust type describes it).
    Object,
    /// JSON of a type.
    Json(SchemaFn),
    /// `{"<key>": [T, ...]}`, the shape of the list routes.
    List(&'static str, SchemaFn),
    /// Text of this media type (probes, metrics, exports).
    Text(&'static str),
    /// Server-Sent Events.
    EventStream,
    /// No body (204).
    Empty,
}

/// One operation's description, given when its route is registered.
///
/// By default an operation needs a credential (API key or session cookie), answers 200
/// with a JSON object, and may answer with the API's error shape on 400, 401, 403, 404 and
/// (under `/api/v1`) 429.
#[derive(Debug, Clone)]
pub struct Op {
    summary: &'static str,
    description: Option<&'static str>,
    tag: &'static str,
    id: Option<&'static str>,
    body: Option<SchemaFn>,
    query: Option<SchemaFn>,
    response: Body,
    statuses: Vec<u16>,
    public: bool,
    errors: Vec<u16>,
}

impl Op {
    /// An operation with a one-line summary.
    pub fn new(summary: &'static str) -> Op {
        Op {
            summary,
            description: None,
            tag: "other",
            id: None,
            body: None,
            query: None,
            response: Body::Object,
            statuses: vec![200],
            public: false,
            errors: Vec::new(),
        }
    }

    /// Longer text (CommonMark) under the summary.
    pub fn describe(mut self, text: &'static str) -> Op {
        self.description = Some(text);
        self
    }

    /// The group the operation is listed under.
    pub fn tag(mut self, tag: &'static str) -> Op {
        self.tag = tag;
        self
    }

    /// The `operationId`; by default the handler's path in the crate (`deployments_list`).
    pub fn id(mut self, id: &'static str) -> Op {
        self.id = Some(id);
        self
    }

    /// The JSON request body, as the handler's `ApiJson<T>` reads it.
    pub fn body<T: JsonSchema>(mut self) -> Op {
        self.body = Some(reference::<T>);
        self
    }

    /// The query string, as the handler's `ApiQuery<T>` reads it: one parameter per field.
    pub fn query<T: JsonSchema>(mut self) -> Op {
        self.query = Some(inline::<T>);
        self
    }

    /// The answer is JSON of type `T`.
    pub fn response<T: JsonSchema>(mut self) -> Op {
        self.response = Body::Json(reference::<T>);
        self
    }

    /// The answer is `{"<key>": [T, ...]}`.
    pub fn list<T: JsonSchema>(mut self, key: &'static str) -> Op {
        self.response = Body::List(key, reference::<T>);
        self
    }

    /// The answer is text of `media_type`.
    pub fn text(mut self, media_type: &'static str) -> Op {
        self.response = Body::Text(media_type);
        self
    }

    /// The answer is a stream of Server-Sent Events.
    pub fn event_stream(mut self) -> Op {
        self.response = Body::EventStream;
        self
    }

    /// The answer is `204 No Content`.
    pub fn no_content(mut self) -> Op {
        self.response = Body::Empty;
        self.statuses = vec![204];
        self
    }

    /// The success status, when it is not 200 (`201` for creations).
    pub fn status(mut self, status: u16) -> Op {
        self.statuses = vec![status];
        self
    }

    /// Another success status with the same body (`201` of a `PUT` that created).
    pub fn or_status(mut self, status: u16) -> Op {
        self.statuses.push(status);
        self
    }

    /// Needs no credential.
    pub fn public(mut self) -> Op {
        self.public = true;
        self
    }

    /// Another error status this operation answers (409, ...).
    pub fn error(mut self, status: u16) -> Op {
        self.errors.push(status);
        self
    }
}

/// A registered, documented operation.
#[derive(Debug, Clone)]
struct Documented {
    method: &'static str,
    path: &'static str,
    handler: &'static str,
    op: Op,
}

/// The route builder: every route of the hub is registered here, which both routes it and
/// (unless it is a dashboard page) documents it.
///
/// Other modules register their routes the same way, with a function from `Routes` to
/// `Routes` chained in with [`Routes::with`]:
///
/// ```ignore
/// pub(crate) fn routes(routes: Routes<Arc<Hub>>) -> Routes<Arc<Hub>> {
///     routes.get("/api/v1/things", list, Op::new("List things").tag("things"))
/// }
/// ```
#[derive(Debug)]
pub struct Routes<S = std::sync::Arc<crate::Hub>> {
    router: Router<S>,
    documented: Vec<Documented>,
}

impl<S: Clone + Send + Sync + 'static> Default for Routes<S> {
    fn default() -> Self {
        Routes::new()
    }
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    /// No routes yet.
    pub fn new() -> Self {
        Routes { router: Router::new(), documented: Vec::new() }
    }

    fn add<H: Handler<T, S>, T: 'static>(mut self, filter: MethodFilter, method: &'static str, path: &'static str, handler: H, op: Option<Op>) -> Self {
        if let Some(op) = op {
            self.documented.push(Documented { method, path, handler: std::any::type_name::<H>(), op });
        }
        // axum merges the method routers of one path, and panics on a method registered twice.
        self.router = self.router.route(path, on(filter, handler));
        self
    }

    /// Route `GET path` to `handler`, documented as `op`.
    pub fn get<H: Handler<T, S>, T: 'static>(self, path: &'static str, handler: H, op: Op) -> Self {
        self.add(MethodFilter::GET, "get", path, handler, Some(op))
    }

    /// Route `POST path` to `handler`, documented as `op`.
    pub fn post<H: Handler<T, S>, T: 'static>(self, path: &'static str, handler: H, op: Op) -> Self {
        self.add(MethodFilter::POST, "post", path, handler, Some(op))
    }

    /// Route `PUT path` to `handler`, documented as `op`.
    pub fn put<H: Handler<T, S>, T: 'static>(self, path: &'static str, handler: H, op: Op) -> Self {
        self.add(MethodFilter::PUT, "put", path, handler, Some(op))
    }

    /// Route `PATCH path` to `handler`, documented as `op`.
    pub fn patch<H: Handler<T, S>, T: 'static>(self, path: &'static str, handler: H, op: Op) -> Self {
        self.add(MethodFilter::PATCH, "patch", path, handler, Some(op))
    }

    /// Route `DELETE path` to `handler`, documented as `op`.
    pub fn delete<H: Handler<T, S>, T: 'static>(self, path: &'static str, handler: H, op: Op) -> Self {
        self.add(MethodFilter::DELETE, "delete", path, handler, Some(op))
    }

    /// A dashboard page (HTML for browsers, form posts): routed, not documented.
    pub fn page<H: Handler<T, S>, T: 'static>(self, method: MethodFilter, path: &'static str, handler: H) -> Self {
        self.add(method, "page", path, handler, None)
    }

    /// Register the routes of another module: `routes.with(accounts::routes)`.
    pub fn with(self, register: impl FnOnce(Self) -> Self) -> Self {
        register(self)
    }

    /// The OpenAPI document of the routes registered so far, with [`OPENAPI_PATH`] itself.
    pub fn document(&self) -> Value {
        document(self.documented.iter().chain(std::iter::once(&openapi_route())))
    }

    /// The router of every registered route plus [`OPENAPI_PATH`] serving the document.
    pub fn into_router(self) -> Router<S> {
        let text = self.document().to_string();
        let serve = move || async move { ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], text).into_response() };
        self.router.route(OPENAPI_PATH, on(MethodFilter::GET, serve))
    }
}

fn openapi_route() -> Documented {
    Documented {
        method: "get",
        path: OPENAPI_PATH,
        handler: "openapi",
        op: Op::new("This document").describe("The OpenAPI 3.1 description of this API.").tag("meta").id("openapi").public(),
    }
}

/// The names of a template's `{param}`s, in order.
pub fn path_params(path: &str) -> Vec<&str> {
    path.split('/').filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}')).map(|name| name.trim_start_matches('*')).collect()
}

/// `operationId` from the handler's type name: `gantry_hub::api::deployments::list` gives
/// `deployments_list`; closures get one from the method and path.
fn operation_id(route: &Documented) -> String {
    if let Some(id) = route.op.id {
        return id.to_string();
    }
    let name = if route.handler.contains("{{closure}}") {
        format!("{}{}", route.method, route.path)
    } else {
        route.handler.trim_start_matches("gantry_hub::api::").trim_start_matches("gantry_hub::").to_string()
    };
    let id: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    id.split('_').filter(|part| !part.is_empty()).collect::<Vec<_>>().join("_")
}

/// Standard error answers: status, component name, description.
const ERRORS: &[(u16, &str, &str)] = &[
    (400, "BadRequest", "The request is malformed or invalid; nothing was changed."),
    (401, "Unauthorized", "No valid credential: log in or send an API key as `Authorization: Bearer`."),
    (403, "Forbidden", "The credential's role or key scopes do not allow this."),
    (404, "NotFound", "No such object, or one of another org (they answer alike)."),
    (409, "Conflict", "The object already exists or changed meanwhile."),
    (413, "PayloadTooLarge", "The request body is larger than the hub accepts."),
    (415, "UnsupportedMediaType", "The body must be sent as `application/json`."),
    (429, "TooManyRequests", "Rate limited; retry after `Retry-After` seconds."),
];

fn error_ref(status: u16) -> Option<Value> {
    ERRORS.iter().find(|(s, _, _)| *s == status).map(|(_, name, _)| json!({ "$ref": format!("#/components/responses/{name}") }))
}

fn error_responses() -> Value {
    let mut responses = Map::new();
    for (status, name, description) in ERRORS {
        let mut response = json!({
            "description": description,
            "content": { "application/json": { "schema": { "$ref": format!("#{SCHEMAS}/Error") } } },
        });
        if *status == 429 {
            response["headers"] =
                json!({ "Retry-After": { "description": "Seconds to wait before retrying.", "schema": { "type": "integer", "minimum": 0 } } });
        }
        responses.insert(name.to_string(), response);
    }
    Value::Object(responses)
}

fn error_schema() -> Value {
    json!({
        "description": "Every error answer of the API.",
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": { "type": "string", "description": "Stable machine-readable code (`not_found`, `invalid_body`, ...)." },
                    "message": { "type": "string", "description": "What went wrong, for people." },
                },
            },
        },
    })
}

/// A query parameter's schema: a field's `Option` shows as a non-required parameter, so
/// `null` is dropped from its types and defaults (a query string cannot send null).
fn query_schema(mut schema: Value) -> Value {
    if let Some(field) = schema.as_object_mut() {
        if field.get("default") == Some(&Value::Null) {
            field.remove("default");
        }
    }
    if let Some(Value::Array(types)) = schema.get_mut("type") {
        types.retain(|t| t != "null");
        if types.len() == 1 {
            schema["type"] = types[0].clone();
        }
    }
    if let Some(Value::Array(choices)) = schema.get_mut("anyOf") {
        choices.retain(|c| c.get("type") != Some(&json!("null")));
        if choices.len() == 1 {
            return choices[0].clone();
        }
    }
    schema
}

fn render(route: &Documented, generator: &mut SchemaGenerator) -> Value {
    let op = &route.op;
    let mut parameters: Vec<Value> =
        path_params(route.path).into_iter().map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } })).collect();
    if let Some(query) = op.query {
        let schema = query(generator).to_value();
        let required: BTreeSet<&str> = schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        for (name, field) in schema.get("properties").and_then(Value::as_object).into_iter().flatten() {
            let mut parameter = json!({ "name": name, "in": "query", "required": required.contains(name.as_str()) });
            let mut field = query_schema(field.clone());
            if let Some(description) = field.as_object_mut().and_then(|f| f.remove("description")) {
                parameter["description"] = description;
            }
            parameter["schema"] = field;
            parameters.push(parameter);
        }
    }
    let content = match op.response {
        Body::Object => Some(json!({ "application/json": { "schema": { "type": "object" } } })),
        Body::Json(schema) => Some(json!({ "application/json": { "schema": schema(generator).to_value() } })),
        Body::List(key, schema) => Some(json!({ "application/json": { "schema": {
            "type": "object",
            "required": [key],
            "properties": { key: { "type": "array", "items": schema(generator).to_value() } },
        } } })),
        Body::Text(media_type) => Some(json!({ media_type: { "schema": { "type": "string" } } })),
        Body::EventStream => Some(json!({ "text/event-stream": { "schema": { "type": "string" } } })),
        Body::Empty => None,
    };
    let mut responses = Map::new();
    for status in &op.statuses {
        let description = axum::http::StatusCode::from_u16(*status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Success");
        let mut response = json!({ "description": description });
        if let Some(content) = &content {
            response["content"] = content.clone();
        }
        responses.insert(status.to_string(), response);
    }
    let in_api = route.path.starts_with("/api/");
    let mut errors: BTreeSet<u16> = op.errors.iter().copied().collect();
    if in_api {
        errors.extend([400, 429]);
    }
    if !op.public {
        errors.extend([401, 403, 404]);
    }
    if !path_params(route.path).is_empty() {
        errors.insert(404);
    }
    let mut operation = json!({
        "operationId": operation_id(route),
        "summary": op.summary,
        "tags": [op.tag],
    });
    if let Some(body) = op.body {
        errors.extend([413, 415]);
        operation["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": body(generator).to_value() } } });
    }
    for status in errors {
        if let Some(reference) = error_ref(status) {
            responses.insert(status.to_string(), reference);
        }
    }
    if let Some(description) = op.description {
        operation["description"] = json!(description);
    }
    if !parameters.is_empty() {
        operation["parameters"] = Value::Array(parameters);
    }
    operation["responses"] = Value::Object(responses);
    operation["security"] = if op.public { json!([]) } else { json!([{ "bearerAuth": [] }, { "cookieAuth": [] }]) };
    operation
}

fn document<'a>(routes: impl Iterator<Item = &'a Documented>) -> Value {
    let mut generator = schemars::generate::SchemaSettings::draft2020_12()
        .with(|settings| {
            settings.definitions_path = SCHEMAS.into();
            settings.meta_schema = None;
        })
        .into_generator();
    let mut paths = Map::new();
    let mut tags = BTreeSet::new();
    for route in routes {
        tags.insert(route.op.tag);
        let item = paths.entry(route.path.to_string()).or_insert_with(|| json!({}));
        item[route.method] = render(route, &mut generator);
    }
    let mut schemas = generator.take_definitions(true);
    schemas.insert("Error".to_string(), error_schema());
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Gantry hub API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The hub's HTTP API. Every error answers `{\"error\": {\"code\", \"message\"}}`. \
                Authenticate with an API key (`Authorization: Bearer gk_...`) or the session cookie \
                that `POST /api/v1/auth/login` sets.",
        },
        "tags": tags.into_iter().map(|name| json!({ "name": name })).collect::<Vec<_>>(),
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": error_responses(),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (`gk_...`) sent as `Authorization: Bearer gk_...`.",
                },
                "cookieAuth": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": crate::auth::SESSION_COOKIE,
                    "description": format!("The login session cookie (named `{}` when the hub is reached over HTTPS).", crate::auth::SECURE_SESSION_COOKIE),
                },
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Hub;
    use axum::body::Body;
    use axum::http::{Method, Request, StatusCode};
    use std::collections::BTreeMap;
    use tower::ServiceExt;

    /// Every operation of the document: (path, method, operation).
    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                out.push((path.clone(), method.clone(), operation.clone()));
            }
        }
        out
    }

    #[test]
    fn openapi_path_parameters_match_their_templates() {
        let doc = crate::api::routes().document();
        let operations = operations(&doc);
        assert!(operations.len() > 70, "only {} operations documented", operations.len());
        for (path, method, operation) in &operations {
            assert!(path.starts_with('/') && !path.contains(':'), "{path} is not an OpenAPI path template");
            let template: BTreeSet<&str> = path_params(path).into_iter().collect();
            assert_eq!(template.len(), path_params(path).len(), "{path} repeats a parameter");
            let parameters: Vec<Value> = operation["parameters"].as_array().cloned().unwrap_or_default();
            let documented: BTreeSet<&str> = parameters.iter().filter(|p| p["in"] == "path").map(|p| p["name"].as_str().unwrap()).collect();
            assert_eq!(documented, template, "{method} {path}: path parameters differ from the template");
            for parameter in &parameters {
                assert!(parameter["in"] == "query" || parameter["required"] == true, "{method} {path}: {parameter} must be required");
            }
            let mut names: Vec<_> = parameters.iter().map(|p| (p["in"].as_str().unwrap(), p["name"].as_str().unwrap())).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), parameters.len(), "{method} {path}: a parameter is listed twice");
        }
    }

    #[test]
    fn openapi_operation_ids_are_unique() {
        let doc = crate::api::routes().document();
        let mut seen = BTreeMap::new();
        for (path, method, operation) in operations(&doc) {
            let id = operation["operationId"].as_str().unwrap().to_string();
            assert!(!id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{method} {path}: operationId {id:?}");
            if let Some(other) = seen.insert(id.clone(), format!("{method} {path}")) {
                panic!("operationId {id} of {method} {path} is also {other}'s; give one `Op::id`");
            }
        }
        assert_eq!(seen.get("list_agents").map(String::as_str), Some("get /api/v1/orgs/{org}/agents"));
        assert_eq!(seen.get("deployments_create").map(String::as_str), Some("post /api/v1/orgs/{org}/deployments"));
    }

    #[test]
    fn openapi_references_resolve() {
        fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::String(r)) = map.get("$ref") {
                        out.push(r);
                    }
                    map.values().for_each(|v| refs(v, out));
                }
                Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let doc = crate::api::routes().document();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(found.contains(&"#/components/schemas/DeploymentSpec"), "the deployment spec is not described");
        for reference in found {
            let pointer = reference.strip_prefix('#').unwrap_or_else(|| panic!("{reference} is not local"));
            assert!(doc.pointer(pointer).is_some(), "{reference} does not resolve");
        }
    }

    /// Serde's attributes show in the schemas: `deny_unknown_fields`, `rename_all`,
    /// internally tagged enums and defaults.
    #[test]
    fn openapi_schemas_follow_serde() {
        let doc = crate::api::routes().document();
        let schemas = &doc["components"]["schemas"];
        assert_eq!(schemas["DeploymentSpec"]["additionalProperties"], json!(false));
        let required: Vec<&str> = schemas["DeploymentSpec"]["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(required, ["name", "services"], "fields with serde defaults are optional");
        assert!(schemas["RestartPolicy"].to_string().contains("unless-stopped"), "{}", schemas["RestartPolicy"]);
        assert!(schemas["Probe"].to_string().contains("\"disk_free\""), "{}", schemas["Probe"]);
        assert_eq!(schemas["ServiceSpec"]["properties"]["stop_grace_secs"]["default"], json!(10));
        let agents = &doc["paths"]["/api/v1/orgs/{org}/agents"]["get"];
        assert_eq!(
            agents["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["agents"]["items"]["$ref"],
            "#/components/schemas/AgentView"
        );
        let logs = &doc["paths"]["/api/v1/agents/{id}/logs"]["get"]["parameters"];
        assert!(logs.as_array().unwrap().iter().any(|p| p["name"] == "limit" && p["in"] == "query" && p["schema"]["type"] == "integer"), "{logs}");
    }

    /// Every documented operation reaches a handler (not the fallback nor the 405 answer),
    /// so the document names only routes that exist; and, called with an operator key, no
    /// handler fails to extract its path (axum answers 500 when the template's parameters
    /// do not fit the handler's `Path`).
    #[tokio::test]
    async fn openapi_operations_are_all_routed() {
        let dir = std::env::temp_dir().join(format!("gantry-openapi-{}-{}", std::process::id(), rand::random::<u64>()));
        crate::init(&dir, "127.0.0.1:7443", "ops@example.com", Some("a long enough password")).unwrap();
        let mut config = crate::config::Config { data_dir: dir.clone(), ..crate::config::Config::default() };
        config.rate_limit.enabled = false;
        let key = std::fs::read_to_string(dir.join("operator.key")).unwrap().trim().to_string();
        let hub = Hub::open(config).unwrap();
        let router = crate::api::router(hub.clone());
        let doc = crate::api::routes().document();
        for (path, method, _) in operations(&doc) {
            let uri = path.split('/').map(|s| if s.starts_with('{') { "x1" } else { s }).collect::<Vec<_>>().join("/");
            let request = Request::builder()
                .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
                .uri(&uri)
                .header(axum::http::header::AUTHORIZATION, format!("Bearer {key}"))
                .body(Body::empty())
                .unwrap();
            let response = router.clone().oneshot(request).await.unwrap();
            let status = response.status();
            // An event stream answers for as long as the client listens: its status is enough.
            let streaming = response.headers().get(axum::http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            let body = if streaming { Default::default() } else { axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap_or_default() };
            let text = String::from_utf8_lossy(&body);
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path} is documented but not routed");
            assert!(!(status == StatusCode::NOT_FOUND && text.contains("route not found")), "{method} {path} is documented but not routed");
            assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{method} {path}: {text}");
        }
        drop(router);
        drop(hub);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
