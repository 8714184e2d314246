//! The account and webhook pages over HTTP, as a browser without JavaScript uses them,
//! against a real hub: changing the password through the account form (the old password
//! stops working, the new one works, other sessions end, this one stays; a wrong current
//! password changes nothing), the same through `POST /api/v1/auth/password`, two-factor
//! enrolment through the page; an org's webhook delivery log listing a real delivery to a
//! receiver on loopback, Redeliver making a new delivery, and a Viewer neither seeing the
//! button nor being allowed the POST.

#![allow(clippy::unwrap_used)]

use gantry_tests::web::{add_member, browse, form_value, login, page, post_form, try_login, WebhookReceiver};
use gantry_tests::*;
use serde_json::{json, Value};
use std::time::Duration;

const OLD_PASSWORD: &str = "copper lantern orbit 91 walrus";
const NEW_PASSWORD: &str = "violet harbor stapler quantum 42";
const ANA: &str = "ana@acme.example.com";

fn password_form(current: &str, new: &str, again: &str) -> String {
    format!("current_password={}&new_password={}&confirm_password={}", form_value(current), form_value(new), form_value(again))
}

/// Whether the session `cookie` is still signed in.
async fn signed_in(hub: &TestHub, cookie: &str) -> bool {
    hub.api().anonymous().with_cookie(cookie).get("/api/v1/auth/me").await.0 == 200
}

#[tokio::test(flavor = "multi_thread")]
async fn password_changes_through_the_account_form() {
    let dir = TempDir::new("dashboard-account");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    let user = add_member(&hub, ANA, OLD_PASSWORD, "acme", "admin").await;
    let browser = login(&hub, ANA, OLD_PASSWORD).await;
    let laptop = login(&hub, ANA, OLD_PASSWORD).await;

    // Without a session the page sends the browser to log in.
    let anonymous = browse(&hub, None, "GET", "/account", None).await;
    assert_eq!((anonymous.status, anonymous.location.as_deref()), (303, Some("/login")));

    // Who am I, where, and the forms, each input labelled.
    let account = page(&hub, &browser, "/account").await;
    assert_eq!(account.status, 200, "{}", account.body);
    let html = &account.body;
    assert!(html.contains(&format!("<dd>{ANA}</dd>")) && html.contains(&format!("<code>{user}</code>")), "{html}");
    assert!(html.contains("href=\"/?org=acme\">acme</a>") && html.contains("status-admin\">admin"), "memberships with roles: {html}");
    assert!(html.contains("aria-current=\"page\">Account"));
    for field in ["pw-current", "pw-new", "pw-confirm"] {
        assert!(html.contains(&format!("<label for=\"{field}\">")), "{field} has a label");
    }
    assert!(html.contains("action=\"/logout\"") && html.contains("status-off\">off"), "sign out, and two-factor login is off");

    // A wrong current password: a clear error at the form, and nothing changes.
    let wrong = post_form(&hub, &browser, "/account/password", &password_form("not the password at all", NEW_PASSWORD, NEW_PASSWORD)).await;
    assert_eq!(wrong.status, 403, "{}", wrong.body);
    assert!(wrong.body.contains("role=\"alert\"><p>the current password is wrong; nothing was changed</p>"), "{}", wrong.body);
    assert!(!wrong.body.contains(NEW_PASSWORD) && !wrong.body.contains("not the password at all"), "typed passwords are never shown back");
    // Two new passwords that differ, or a weak one: refused before anything is checked.
    let differ = post_form(&hub, &browser, "/account/password", &password_form(OLD_PASSWORD, NEW_PASSWORD, "violet harbor stapler quantum 43")).await;
    assert_eq!(differ.status, 400, "{}", differ.body);
    assert!(differ.body.contains("the new password and its repetition differ"), "{}", differ.body);
    let weak = post_form(&hub, &browser, "/account/password", &password_form(OLD_PASSWORD, "short", "short")).await;
    assert_eq!(weak.status, 400);
    assert!(weak.body.contains("password must be at least 12 characters"), "{}", weak.body);
    assert!(signed_in(&hub, &laptop).await, "refused changes end no session");
    assert!(try_login(&hub, ANA, NEW_PASSWORD).await.is_none(), "the new password was not set");
    let check = login(&hub, ANA, OLD_PASSWORD).await;

    // The change: a redirect with a flash message; this session stays, the others end.
    let changed = post_form(&hub, &browser, "/account/password", &password_form(OLD_PASSWORD, NEW_PASSWORD, NEW_PASSWORD)).await;
    assert_eq!((changed.status, changed.location.as_deref()), (303, Some("/account?done=password-changed")), "{}", changed.body);
    let after = page(&hub, &browser, "/account?done=password-changed").await;
    assert_eq!(after.status, 200, "the session that changed the password stays signed in");
    assert!(after.body.contains("role=\"status\">Password changed. Your other sessions were signed out.</p>"), "{}", after.body);
    for (name, cookie) in [("laptop", &laptop), ("check", &check)] {
        assert!(!signed_in(&hub, cookie).await, "the {name} session was ended");
        let redirected = page(&hub, cookie, "/account").await;
        assert_eq!((redirected.status, redirected.location.as_deref()), (303, Some("/login")), "{name}");
    }
    assert!(try_login(&hub, ANA, OLD_PASSWORD).await.is_none(), "the old password no longer logs in");
    let fresh = login(&hub, ANA, NEW_PASSWORD).await;

    // The JSON API does the same: API keys are refused, a wrong password is 403 with a
    // stable code, and a change reports the sessions it ended.
    let (status, body) = hub.api().post("/api/v1/auth/password", &json!({ "current_password": "x", "new_password": OLD_PASSWORD })).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
    let api = hub.api().anonymous().with_cookie(&browser);
    let (status, body) = api.post("/api/v1/auth/password", &json!({ "current_password": OLD_PASSWORD, "new_password": "sunlit granary oboe 77 fjord" })).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("invalid_credentials")), "{body}");
    let (status, body) = api.post("/api/v1/auth/password", &json!({ "current_password": NEW_PASSWORD, "new_password": "sunlit granary oboe 77 fjord" })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({ "password_changed": true, "sessions_ended": 1 }));
    assert!(!signed_in(&hub, &fresh).await && signed_in(&hub, &browser).await);

    // Every attempt is in the audit log under the account, with its outcome; never a password.
    let (status, audit) = hub.api().get("/api/v1/audit?limit=1000").await;
    assert_eq!(status, 200, "{audit}");
    let outcomes: Vec<(String, String)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"] == ANA && e["action"].as_str().unwrap().ends_with("password"))
        .map(|e| (e["action"].as_str().unwrap().to_string(), e["outcome"].as_str().unwrap().to_string()))
        .collect();
    for expected in
        [("POST /account/password", "403"), ("POST /account/password", "400"), ("POST /account/password", "303"), ("POST /api/v1/auth/password", "200")]
    {
        assert!(outcomes.contains(&(expected.0.to_string(), expected.1.to_string())), "{expected:?} in {outcomes:?}");
    }
    assert!(!audit.to_string().contains(NEW_PASSWORD) && !audit.to_string().contains(OLD_PASSWORD));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_factor_login_is_set_up_from_the_account_page() {
    let dir = TempDir::new("dashboard-account-totp");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    add_member(&hub, ANA, OLD_PASSWORD, "acme", "viewer").await;
    let browser = login(&hub, ANA, OLD_PASSWORD).await;

    let started = post_form(&hub, &browser, "/account/totp", "").await;
    assert_eq!(started.status, 201, "{}", started.body);
    let secret = started.body.split("id=\"totp-secret\" tabindex=\"0\">").nth(1).and_then(|rest| rest.split('<').next()).unwrap().to_string();
    assert!(started.body.contains("href=\"otpauth://totp/"), "{}", started.body);
    // The QR code carries exactly the link, as a phone's camera reads it.
    let uri = started.body.split("<a href=\"otpauth://").nth(1).and_then(|rest| rest.split('"').next()).map(|rest| format!("otpauth://{rest}")).unwrap();
    let svg = started
        .body
        .split("<svg class=\"qr\"")
        .nth(1)
        .and_then(|rest| rest.split("</svg>").next())
        .map(|rest| format!("<svg class=\"qr\"{rest}</svg>"))
        .unwrap();
    assert_eq!(gantry_tests::browser::decode_qr(&svg, dir.path()), uri.replace("&amp;", "&"));
    assert!(uri.contains(&format!("secret={secret}")), "{uri}");
    assert!(started.body.contains("<label for=\"totp-code\">"));
    let pending = page(&hub, &browser, "/account").await;
    assert!(pending.body.contains("status-pending\">pending") && !pending.body.contains(&secret), "the secret is shown once");

    let wrong = post_form(&hub, &browser, "/account/totp/confirm", "code=000000").await;
    assert_eq!(wrong.status, 400);
    assert!(wrong.body.contains("role=\"alert\"><p>the code does not match the new secret"), "{}", wrong.body);

    let key = gantry_hub::totp::decode_secret(&secret).unwrap();
    let code = gantry_hub::totp::code_at(&key, (gantry_hub::wall_ms() / 1000) as u64);
    let confirmed = post_form(&hub, &browser, "/account/totp/confirm", &format!("code={code}")).await;
    assert_eq!((confirmed.status, confirmed.location.as_deref()), (303, Some("/account?done=totp-on")), "{}", confirmed.body);
    let on = page(&hub, &browser, "/account?done=totp-on").await;
    assert!(on.body.contains("status-on\">on") && on.body.contains("action=\"/account/totp/disable\""), "{}", on.body);
    let (status, body, _) = hub.api().anonymous().login(&json!({ "email": ANA, "password": OLD_PASSWORD })).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("totp_required")), "{body}");

    let off = post_form(&hub, &browser, "/account/totp/disable", &format!("password={}", form_value(OLD_PASSWORD))).await;
    assert_eq!((off.status, off.location.as_deref()), (303, Some("/account?done=totp-off")), "{}", off.body);
    assert!(try_login(&hub, ANA, OLD_PASSWORD).await.is_some());
    hub.stop().await;
}

/// The org's deliveries of `webhook`, newest first, as the operator reads them.
async fn deliveries(hub: &TestHub, webhook: &str) -> Vec<Value> {
    let (status, body) = hub.api().get(&format!("/api/v1/orgs/acme/webhooks/{webhook}/deliveries")).await;
    assert_eq!(status, 200, "{body}");
    body["deliveries"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_pages_list_real_deliveries_and_redeliver_for_admins_only() {
    let dir = TempDir::new("dashboard-webhooks");
    let hub = TestHub::start(&dir.path().join("hub"), |_| {}).await;
    hub.create_org("acme", 5).await;
    hub.create_org("globex", 5).await;
    add_member(&hub, "admin@acme.example.com", OLD_PASSWORD, "acme", "admin").await;
    add_member(&hub, "viewer@acme.example.com", OLD_PASSWORD, "acme", "viewer").await;
    add_member(&hub, "owner@globex.example.com", OLD_PASSWORD, "globex", "owner").await;
    let admin = login(&hub, "admin@acme.example.com", OLD_PASSWORD).await;
    let viewer = login(&hub, "viewer@acme.example.com", OLD_PASSWORD).await;
    let outsider = login(&hub, "owner@globex.example.com", OLD_PASSWORD).await;
    let receiver = WebhookReceiver::start().await;

    // Only admins see the section in the navigation.
    assert!(page(&hub, &admin, "/").await.body.contains("href=\"/webhooks\">Webhooks</a>"));
    assert!(!page(&hub, &viewer, "/").await.body.contains("href=\"/webhooks"), "viewers do not see the webhooks section");

    let empty = page(&hub, &admin, "/webhooks?org=acme").await;
    assert_eq!(empty.status, 200, "{}", empty.body);
    assert!(empty.body.contains("No webhook endpoints") && empty.body.contains("<label for=\"w-url\">"), "{}", empty.body);

    // A bad URL: the error at the form, what was typed kept, nothing created.
    let bad = post_form(&hub, &admin, "/orgs/acme/webhooks", "url=nope&events=agent.enrolled&description=pager").await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("role=\"alert\"") && bad.body.contains("url:") && bad.body.contains("value=\"agent.enrolled\" checked"), "{}", bad.body);
    assert_eq!(hub.api().get("/api/v1/orgs/acme/webhooks").await.1["webhooks"], json!([]));

    let form = format!("url={}&events=agent.enrolled&events=agent.revoked&description=test+receiver", form_value(&receiver.url()));
    let created = post_form(&hub, &admin, "/orgs/acme/webhooks", &form).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert!(created.body.contains("Signing secret of whk_"), "the secret is shown once: {}", created.body);
    let (_, list) = hub.api().get("/api/v1/orgs/acme/webhooks").await;
    let webhook = list["webhooks"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(list["webhooks"][0]["events"], json!(["agent.enrolled", "agent.revoked"]));

    // A real event: enrolling an agent is delivered to the receiver.
    let token = hub.token("acme", 1, "10m").await;
    enroll(&token, &dir.path().join("agent")).await.unwrap();
    let first = wait_for(Duration::from_secs(20), "the enrollment delivered", || async {
        deliveries(&hub, &webhook).await.into_iter().find(|d| d["status"] == "succeeded").map(|d| d["id"].as_str().unwrap().to_string())
    })
    .await;
    assert_eq!(receiver.deliveries(), vec![first.clone()]);

    let listed = page(&hub, &admin, "/webhooks?org=acme").await;
    assert!(
        listed.body.contains(&receiver.url()) && listed.body.contains("status-succeeded\">succeeded") && listed.body.contains("HTTP 200"),
        "{}",
        listed.body
    );
    let log_path = format!("/webhooks/{webhook}?org=acme");
    assert!(listed.body.contains(&format!("href=\"/webhooks/{webhook}?org=acme\"")));
    let log = page(&hub, &admin, &log_path).await;
    assert_eq!(log.status, 200, "{}", log.body);
    let redeliver = format!("/orgs/acme/webhooks/{webhook}/deliveries/{first}/redeliver");
    assert!(log.body.contains(&first) && log.body.contains("<code>agent.enrolled</code>") && log.body.contains("<td>200</td>"), "{}", log.body);
    assert!(log.body.contains(&format!("action=\"{redeliver}\"")), "{}", log.body);

    // A Viewer sees neither the pages nor the button, and the POST is refused.
    for path in ["/webhooks?org=acme", log_path.as_str()] {
        let refused = page(&hub, &viewer, path).await;
        assert_eq!(refused.status, 403, "{path}: {}", refused.body);
        assert!(!refused.body.contains("Redeliver") && !refused.body.contains(&first), "{path}");
    }
    let refused = post_form(&hub, &viewer, &redeliver, "").await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.body.contains("admin permission"), "{}", refused.body);
    // Another org's owner: as if it did not exist.
    assert_eq!(post_form(&hub, &outsider, &redeliver, "").await.status, 404);
    assert_eq!(page(&hub, &outsider, &log_path).await.status, 404);
    assert_eq!(deliveries(&hub, &webhook).await.len(), 1, "refused redeliveries made nothing");

    // Redeliver: a new delivery of the same event reaches the receiver.
    let again = post_form(&hub, &admin, &redeliver, "").await;
    assert_eq!((again.status, again.location.clone()), (303, Some(format!("/webhooks/{webhook}?org=acme&done=redelivered"))), "{}", again.body);
    let second = wait_for(Duration::from_secs(20), "the redelivery delivered", || async {
        let list = deliveries(&hub, &webhook).await;
        list.iter().find(|d| d["redelivery_of"] == first.as_str() && d["status"] == "succeeded").map(|d| d["id"].as_str().unwrap().to_string())
    })
    .await;
    assert_eq!(receiver.deliveries(), vec![first.clone(), second.clone()]);
    let log = page(&hub, &admin, &format!("{log_path}&done=redelivered")).await;
    assert!(log.body.contains("role=\"status\">Redelivery queued"), "{}", log.body);
    assert!(log.body.contains(&second) && log.body.contains(&format!("again of {first}")), "{}", log.body);

    // Delete: gone from the list, back to the empty state.
    let deleted = post_form(&hub, &admin, &format!("/orgs/acme/webhooks/{webhook}/delete"), "").await;
    assert_eq!((deleted.status, deleted.location.as_deref()), (303, Some("/webhooks?org=acme&done=webhook-deleted")), "{}", deleted.body);
    let after = page(&hub, &admin, "/webhooks?org=acme&done=webhook-deleted").await;
    assert!(after.body.contains("Webhook endpoint deleted.") && after.body.contains("No webhook endpoints"), "{}", after.body);
    hub.stop().await;
}
