//! People and their access, against a real hub over HTTP: invitations (single use, expiry),
//! roles (least privilege, the Owner role guarded, the last Owner kept), API keys (scopes
//! within the creator's own, expiry, revocation, last use), and disabling a user, which
//! ends their sessions and stops their keys at once.

#![allow(clippy::unwrap_used)]

use gantry_tests::*;
use serde_json::{json, Value};
use std::time::Duration;

const PASSWORD: &str = "violet harbor stapler quantum 42";

async fn send_json(api: &Api, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, text) = api.send(method, path, Some("application/json"), serde_json::to_vec(body).unwrap()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Invite `email` to `org` as `role` (by `inviter`) and accept; a browser-like client
/// holding the new session.
async fn join(hub: &TestHub, inviter: &Api, org: &str, email: &str, role: &str) -> Api {
    let (code, invitation) = inviter.post(&format!("/api/v1/orgs/{org}/invitations"), &json!({ "email": email, "role": role })).await;
    assert_eq!(code, 201, "{invitation}");
    accept(hub, invitation["token"].as_str().unwrap(), PASSWORD).await.unwrap_or_else(|(code, body)| panic!("accept: {code} {body}"))
}

async fn accept(hub: &TestHub, token: &str, password: &str) -> Result<Api, (u16, Value)> {
    let anonymous = hub.api().anonymous();
    let (code, headers, text) = anonymous
        .send("POST", "/api/v1/invitations/accept", Some("application/json"), json!({ "token": token, "password": password }).to_string().into_bytes())
        .await;
    if code != 200 {
        return Err((code, serde_json::from_str(&text).unwrap_or(Value::String(text))));
    }
    let cookie = headers.get("set-cookie").unwrap().to_str().unwrap().split(';').next().unwrap().to_string();
    Ok(Api { cookie: Some(cookie), ..anonymous })
}

async fn me(api: &Api) -> Value {
    let (code, body) = api.get("/api/v1/auth/me").await;
    assert_eq!(code, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invitations_roles_keys_and_disabling_work_as_people_expect() {
    let dir = TempDir::new("accounts");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 10).await;
    hub.create_org("globex", 10).await;
    let operator = hub.api();

    // An invitation is for one address, works once, and a bad password spends nothing.
    let (code, invitation) = operator.post("/api/v1/orgs/acme/invitations", &json!({ "email": "Alice@Example.com", "role": "owner", "ttl": "1d" })).await;
    assert_eq!(code, 201, "{invitation}");
    assert_eq!(invitation["email"], "alice@example.com");
    assert!(invitation["url"].as_str().unwrap().contains("/invite?token=gi_"), "{invitation}");
    let token = invitation["token"].as_str().unwrap().to_string();
    let (code, body) = accept(&hub, &token, "short").await.err().unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(hub.hub.store.user_by_email("alice@example.com").unwrap().is_none(), "a refused acceptance creates no account");
    let (code, body) = accept(&hub, &format!("{}x", &token[..token.len() - 1]), PASSWORD).await.err().unwrap();
    assert_eq!((code, body["error"]["code"].as_str().unwrap()), (404, "invitation_invalid"), "a forged secret");
    let alice = accept(&hub, &token, PASSWORD).await.unwrap();
    let (code, body) = accept(&hub, &token, PASSWORD).await.err().unwrap();
    assert_eq!((code, body["error"]["code"].as_str().unwrap()), (410, "invitation_used"));
    let who = me(&alice).await;
    assert_eq!(who["memberships"], json!([{ "org": "acme", "role": "owner" }]), "{who}");

    // An expired invitation is refused and creates nobody.
    let (code, late) = operator.post("/api/v1/orgs/acme/invitations", &json!({ "email": "late@example.com", "role": "viewer", "ttl": 1 })).await;
    assert_eq!(code, 201, "{late}");
    wait_for(Duration::from_secs(10), "the invitation to expire", || async {
        let (_, list) = operator.get("/api/v1/orgs/acme/invitations").await;
        list["invitations"].as_array().unwrap().iter().any(|i| i["id"] == late["id"] && i["status"] == "expired").then_some(())
    })
    .await;
    let (code, body) = accept(&hub, late["token"].as_str().unwrap(), PASSWORD).await.err().unwrap();
    assert_eq!((code, body["error"]["code"].as_str().unwrap()), (410, "invitation_expired"));
    assert!(hub.hub.store.user_by_email("late@example.com").unwrap().is_none());

    // The owner builds a team; each role gets what it needs and no more.
    let viewer = join(&hub, &alice, "acme", "bob@example.com", "viewer").await;
    let deployer = join(&hub, &alice, "acme", "carol@example.com", "deployer").await;
    let admin = join(&hub, &alice, "acme", "dave@example.com", "admin").await;
    let billing = join(&hub, &alice, "acme", "erin@example.com", "billing").await;
    assert_eq!(viewer.get("/api/v1/orgs/acme/agents").await.0, 200);
    assert_eq!(billing.get("/api/v1/orgs/acme/agents").await.0, 403, "billing sees usage and invoices only");
    assert_eq!(viewer.get("/api/v1/orgs/globex/agents").await.0, 404, "another org looks absent");
    let deployment = json!({ "spec": { "name": "web", "services": [{ "name": "app", "image": "busybox:1" }] }, "targets": { "selector": { "role": "none" } } });
    let (code, body) = viewer.post("/api/v1/orgs/acme/deployments", &deployment).await;
    assert_eq!(code, 403, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("deploy permission"), "{body}");
    let (code, body) = deployer.post("/api/v1/orgs/acme/deployments", &deployment).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(deployer.post("/api/v1/orgs/acme/enrollment-tokens", &json!({})).await.0, 403, "deployers do not enroll machines");
    assert_eq!(admin.post("/api/v1/orgs/acme/enrollment-tokens", &json!({})).await.0, 201);

    // Admins manage people below Owner; only an Owner touches the Owner role.
    let bob_id = me(&viewer).await["id"].as_str().unwrap().to_string();
    let alice_id = me(&alice).await["id"].as_str().unwrap().to_string();
    let (code, body) = send_json(&admin, "PUT", &format!("/api/v1/orgs/acme/members/{bob_id}"), &json!({ "role": "owner" })).await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(admin.post("/api/v1/orgs/acme/invitations", &json!({ "email": "x@example.com", "role": "owner" })).await.0, 403);
    let (code, body) = send_json(&admin, "PUT", &format!("/api/v1/orgs/acme/members/{alice_id}"), &json!({ "role": "viewer" })).await;
    assert_eq!(code, 403, "an admin cannot demote an owner: {body}");
    let (code, body) = send_json(&admin, "PUT", &format!("/api/v1/orgs/acme/members/{bob_id}"), &json!({ "role": "deployer" })).await;
    assert_eq!((code, body["role"].as_str()), (200, Some("deployer")), "{body}");
    let (code, body) = send_json(&alice, "PUT", &format!("/api/v1/orgs/acme/members/{alice_id}"), &json!({ "role": "admin" })).await;
    assert_eq!(code, 409, "the last owner stays: {body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("last owner"), "{body}");
    let (code, _, _) = alice.send("DELETE", &format!("/api/v1/orgs/acme/members/{alice_id}"), None, vec![]).await;
    assert_eq!(code, 403, "a cookie-authenticated DELETE without JSON or same-origin proof is refused (CSRF)");
    let (code, _) = send_json(&alice, "DELETE", &format!("/api/v1/orgs/acme/members/{alice_id}"), &json!({})).await;
    assert_eq!(code, 409);
    let (_, members) = viewer.get("/api/v1/orgs/acme/members").await;
    assert_eq!(members["members"].as_array().unwrap().len(), 5, "{members}");
    let (code, body) = send_json(&admin, "PUT", "/api/v1/orgs/acme/members/usr_nobody", &json!({ "role": "viewer" })).await;
    assert_eq!(code, 404, "non-members are invited, not added: {body}");

    // API keys: scopes within the creator's reach, shown once, usable until revoked.
    let (code, body) = admin.post("/api/v1/orgs/acme/api-keys", &json!({ "name": "ci", "scopes": ["billing"] })).await;
    assert_eq!(code, 403, "an admin cannot mint billing access: {body}");
    let (code, body) = admin.post("/api/v1/orgs/acme/api-keys", &json!({ "name": "ci", "scopes": ["launch"] })).await;
    assert_eq!(code, 400, "{body}");
    let (code, read_key) = admin.post("/api/v1/orgs/acme/api-keys", &json!({ "name": "dashboards", "scopes": ["read"] })).await;
    assert_eq!(code, 201, "{read_key}");
    let reader = operator.with_bearer(read_key["key"].as_str().unwrap());
    assert_eq!(reader.get("/api/v1/orgs/acme/deployments").await.0, 200);
    assert_eq!(reader.post("/api/v1/orgs/acme/deployments", &deployment).await.0, 403, "a read key cannot deploy");
    assert_eq!(reader.get("/api/v1/orgs/globex/deployments").await.0, 404);
    let (_, keys) = admin.get("/api/v1/orgs/acme/api-keys").await;
    let listed = keys["api_keys"].as_array().unwrap().iter().find(|k| k["id"] == read_key["id"]).unwrap().clone();
    assert!(listed["last_used_at"].is_string(), "last use is recorded: {listed}");
    assert!(listed.get("key").is_none() && !keys.to_string().contains(read_key["key"].as_str().unwrap()), "the secret is shown once only");

    // Disabling the admin ends their sessions and stops their key at once; enabling brings
    // the key back (sessions stay ended).
    let dave_id = me(&admin).await["id"].as_str().unwrap().to_string();
    let (code, body) = operator.post(&format!("/api/v1/users/{dave_id}/disable"), &json!({})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["sessions_ended"], 1, "{body}");
    assert_eq!(admin.get("/api/v1/auth/me").await.0, 401);
    assert_eq!(reader.get("/api/v1/orgs/acme/deployments").await.0, 401, "keys of a disabled user stop working");
    let (code, body) = operator.post(&format!("/api/v1/users/{dave_id}/enable"), &json!({})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(reader.get("/api/v1/orgs/acme/deployments").await.0, 200);
    assert_eq!(admin.get("/api/v1/auth/me").await.0, 401, "ended sessions stay ended");
    assert_eq!(alice.post(&format!("/api/v1/users/{bob_id}/disable"), &json!({})).await.0, 403, "only operators disable people");

    // A key's rights follow its creator's: demoted to viewer, their admin key can only read.
    let (code, admin_key) = alice.post("/api/v1/orgs/acme/api-keys", &json!({ "name": "ops", "scopes": ["admin"], "ttl": "30d" })).await;
    assert_eq!(code, 201, "{admin_key}");
    assert!(admin_key["expires_at"].is_string());
    let ops = operator.with_bearer(admin_key["key"].as_str().unwrap());
    assert_eq!(ops.post("/api/v1/orgs/acme/enrollment-tokens", &json!({})).await.0, 201);
    let (code, revoked) = send_json(&alice, "DELETE", &format!("/api/v1/orgs/acme/api-keys/{}", admin_key["id"].as_str().unwrap()), &json!({})).await;
    assert_eq!(code, 200, "{revoked}");
    assert_eq!(ops.post("/api/v1/orgs/acme/enrollment-tokens", &json!({})).await.0, 401, "a revoked key is refused");

    // A short-lived key stops by itself.
    let (code, brief) = alice.post("/api/v1/orgs/acme/api-keys", &json!({ "name": "brief", "scopes": ["read"], "ttl": 1 })).await;
    assert_eq!(code, 201, "{brief}");
    let brief = operator.with_bearer(brief["key"].as_str().unwrap());
    wait_for(Duration::from_secs(10), "the key to expire", || async { (brief.get("/api/v1/orgs/acme/agents").await.0 == 401).then_some(()) }).await;

    // The link opens a page; its form joins and logs in like the API does.
    let (code, invitation) = alice.post("/api/v1/orgs/acme/invitations", &json!({ "email": "frank@example.com", "role": "viewer" })).await;
    assert_eq!(code, 201, "{invitation}");
    let link = invitation["url"].as_str().unwrap();
    let path = &link[link.find("/invite").unwrap()..];
    let (code, _, page) = operator.anonymous().send("GET", path, None, vec![]).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("frank@example.com is invited to <strong>acme</strong> as <strong>viewer</strong>"), "{page}");
    assert!(page.contains("autocomplete=\"new-password\""), "a new account chooses a password: {page}");
    let form = format!("token={}&email=frank%40example.com&password=short", invitation["token"].as_str().unwrap());
    let (code, _, page) = operator.anonymous().send("POST", "/invite", Some("application/x-www-form-urlencoded"), form.into_bytes()).await;
    assert_eq!(code, 400, "{page}");
    assert!(page.contains("at least 12 characters"), "the page says what was wrong: {page}");
    let form = format!("token={}&email=frank%40example.com&password={}", invitation["token"].as_str().unwrap(), PASSWORD.replace(' ', "+"));
    let (code, headers, _) = operator.anonymous().send("POST", "/invite", Some("application/x-www-form-urlencoded"), form.into_bytes()).await;
    assert_eq!((code, headers.get("location").map(|l| l.to_str().unwrap())), (303, Some("/")));
    let cookie = headers.get("set-cookie").unwrap().to_str().unwrap().split(';').next().unwrap().to_string();
    let frank = Api { cookie: Some(cookie), ..operator.anonymous() };
    assert_eq!(me(&frank).await["memberships"], json!([{ "org": "acme", "role": "viewer" }]));
    let (code, _, page) = operator.anonymous().send("GET", path, None, vec![]).await;
    assert_eq!(code, 410, "a spent link says so: {page}");
    assert!(page.contains("already been used"), "{page}");
    let (code, _, page) = operator.anonymous().send("GET", "/invite?token=gi_nope.nope", None, vec![]).await;
    assert_eq!(code, 404, "{page}");

    // Operators see everyone.
    let (code, users) = operator.get("/api/v1/users").await;
    assert_eq!(code, 200);
    let emails: Vec<&str> = users["users"].as_array().unwrap().iter().map(|u| u["email"].as_str().unwrap()).collect();
    assert_eq!(emails, ["alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com", "erin@example.com", "frank@example.com", ADMIN_EMAIL]);
    assert_eq!(viewer.get("/api/v1/users").await.0, 403);
    hub.stop().await;
}
