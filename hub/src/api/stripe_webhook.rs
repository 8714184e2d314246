//! `POST /api/v1/webhooks/stripe`: Stripe's event deliveries. The signature is checked on
//! the raw body bytes before anything parses them; processing is `billing::stripe`'s.
//!
//! This module must not decide what an event does: it verifies, hands over and answers.

use super::ApiError;
use crate::billing::stripe::{self, EventError, EventOutcome};
use crate::Hub;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};
use std::sync::Arc;

/// Verify `Stripe-Signature` over the raw body, then process the event once. 400 for a bad
/// signature or body, 200 for a processed or duplicate event, 503 without a webhook secret.
pub async fn receive(State(hub): State<Arc<Hub>>, headers: HeaderMap, body: Bytes) -> Result<Json<Value>, ApiError> {
    let secret = match stripe::webhook_secret(&hub.config) {
        Ok(Some(secret)) => secret,
        Ok(None) => return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stripe_not_configured", "this hub has no Stripe webhook secret")),
        Err(error) => {
            tracing::error!(%error, "stripe webhook secret unreadable");
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stripe_not_configured", "the Stripe webhook secret cannot be read"));
        }
    };
    let header = headers.get("stripe-signature").map(|v| v.to_str().unwrap_or(""));
    let now_secs = crate::wall_ms() / 1000;
    if let Err(error) = stripe::verify_signature(header, &body, &secret, now_secs) {
        tracing::warn!(%error, "stripe webhook refused");
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_signature", error.to_string()));
    }
    let outcome = {
        let hub = hub.clone();
        tokio::task::spawn_blocking(move || stripe::process_event(&hub, &body, crate::wall_ms()))
            .await
            .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the hub log"))?
    };
    match outcome {
        Ok(EventOutcome::Processed { effect }) => Ok(Json(json!({ "received": true, "duplicate": false, "effect": effect }))),
        Ok(EventOutcome::Duplicate) => Ok(Json(json!({ "received": true, "duplicate": true }))),
        Err(EventError::Invalid(message)) => Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_event", message)),
        Err(EventError::Store(error)) => Err(error.into()),
    }
}
