//! The OpenAPI document as a client meets it: `GET /api/v1/openapi.json` answers without a
//! credential, passes the independent `openapi-spec-validator` (PyPI), lists the routes
//! clients rely on with their request schemas, and the hub's live answers to its JSON
//! `GET` routes validate against the schemas it declares (python `jsonschema`).
//!
//! The validator is a hard requirement: without it this test fails (`.ci/run` installs it).

#![allow(clippy::unwrap_used)]

use gantry_tests::*;
use serde_json::{json, Value};
use std::path::Path;

/// Run a python command; exit status and combined output. Fails the test when python
/// itself is missing.
async fn python(args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new("python3")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("python3 could not be run ({e}); this test needs python3 with openapi-spec-validator"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// Validate every `(schema, instance)` sample with jsonschema (draft 2020-12), resolving
/// `#/components/...` references against the document.
const VALIDATE_SAMPLES: &str = r#"
import json, sys, jsonschema
doc = json.load(open(sys.argv[1]))
failures = []
for sample in json.load(open(sys.argv[2])):
    root = {"$schema": "https://json-schema.org/draft/2020-12/schema", "allOf": [sample["schema"]], "components": doc["components"]}
    errors = list(jsonschema.Draft202012Validator(root).iter_errors(sample["instance"]))
    failures += ["%s: %s at %s" % (sample["what"], e.message, "/".join(map(str, e.absolute_path))) for e in errors]
print("\n".join(failures) or "%d samples valid" % len(json.load(open(sys.argv[2]))))
sys.exit(1 if failures else 0)
"#;

/// The declared JSON schema of a 200 answer, if the operation answers JSON.
fn json_response_schema(operation: &Value) -> Option<Value> {
    operation["responses"]["200"]["content"]["application/json"]["schema"].as_object().map(|s| Value::Object(s.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_valid_and_matches_the_live_api() {
    let (ok, output) = python(&["-c", "import openapi_spec_validator, jsonschema"]).await;
    assert!(
        ok,
        "openapi-spec-validator is not installed for python3 ({output}); install it with `python3 -m pip install openapi-spec-validator` (.ci/run does)"
    );

    let dir = TempDir::new("openapi");
    let hub = TestHub::start(dir.path(), |_| {}).await;
    let api = hub.api();

    // Public: no credential needed.
    let (status, doc) = api.anonymous().get("/api/v1/openapi.json").await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["openapi"], "3.1.0");

    // Routes clients rely on.
    let paths = &doc["paths"];
    for (method, path) in
        [("get", "/api/v1/orgs/{org}/agents"), ("post", "/api/v1/orgs/{org}/deployments"), ("get", "/api/v1/agents/{id}"), ("post", "/api/v1/auth/password")]
    {
        assert!(paths[path][method].is_object(), "{method} {path} is not documented");
    }
    let create = &paths["/api/v1/orgs/{org}/deployments"]["post"];
    let body_ref = create["requestBody"]["content"]["application/json"]["schema"]["$ref"].as_str().expect("deployment create has a request body schema");
    let body_schema = doc.pointer(body_ref.trim_start_matches('#')).unwrap_or_else(|| panic!("{body_ref} does not resolve"));
    let required: Vec<&str> = body_schema["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(required, ["spec", "targets"], "{body_schema}");
    assert_eq!(paths["/api/v1/agents/{id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/AgentView");
    assert_eq!(paths["/api/v1/agents/{id}"]["get"]["responses"]["404"]["$ref"], "#/components/responses/NotFound");
    assert_eq!(paths["/api/v1/orgs/{org}/agents"]["get"]["security"], json!([{ "bearerAuth": [] }, { "cookieAuth": [] }]));

    // The independent validator.
    let doc_file = dir.path().join("openapi.json");
    std::fs::write(&doc_file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let (ok, output) = python(&["-m", "openapi_spec_validator", doc_file.to_str().unwrap()]).await;
    assert!(ok, "openapi-spec-validator refused the document:\n{output}");

    // Live answers against the declared schemas: every JSON GET without path parameters or
    // required query parameters, and those of one org and one (enrolled) agent.
    hub.create_org("acme", 5).await;
    let token = hub.token("acme", 1, "1h").await;
    let agent = enroll(&token, &dir.path().join("agent")).await.unwrap();
    // A subscription, so the org's billing routes have something to show.
    let plan = json!({ "id": "basic", "name": "Basic", "prices": { "currency": "EUR", "base_minor": 1000, "meters": [
        { "meter": "log_bytes", "included": 1000, "charge": { "model": "graduated", "tiers": [
            { "up_to": 5000, "unit": { "minor": 1, "per": 100 } }, { "up_to": null, "unit": { "minor": 1, "per": 200 } } ] } } ] } });
    assert_eq!(api.post("/api/v1/plans", &plan).await.0, 201);
    let (status, _, body) = api.send("PUT", "/api/v1/orgs/acme/subscription", Some("application/json"), br#"{"plan":"basic"}"#.to_vec()).await;
    assert_eq!(status, 200, "{body}");
    let mut samples = Vec::new();
    for (path, item) in paths.as_object().unwrap() {
        let Some(schema) = json_response_schema(&item["get"]) else { continue };
        let concrete = path.replace("{org}", "acme").replace("{id}", &agent);
        if concrete.contains('{') || (path.contains("{id}") && !path.starts_with("/api/v1/agents/")) {
            continue;
        }
        // An operation with required query parameters cannot be called bare.
        let parameters = item["get"]["parameters"].as_array().cloned().unwrap_or_default();
        if parameters.iter().any(|p| p["in"] == "query" && p["required"] == true) {
            continue;
        }
        let (status, body) = api.get(&concrete).await;
        assert_eq!(status, 200, "GET {concrete}: {body}");
        samples.push(json!({ "what": format!("GET {concrete}"), "schema": schema, "instance": body }));
    }
    let what: Vec<&str> = samples.iter().map(|s| s["what"].as_str().unwrap()).collect();
    for expected in ["GET /api/v1/orgs", "GET /api/v1/orgs/acme/agents", "GET /api/v1/orgs/acme/alert-rules"] {
        assert!(what.contains(&expected), "{expected} was not checked: {what:?}");
    }
    let samples_file = dir.path().join("samples.json");
    std::fs::write(&samples_file, serde_json::to_vec(&samples).unwrap()).unwrap();
    let (ok, output) = python(&["-c", VALIDATE_SAMPLES, path_str(&doc_file), path_str(&samples_file)]).await;
    assert!(ok, "live answers do not match the document:\n{output}");

    hub.stop().await;
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}
