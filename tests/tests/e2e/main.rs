//! Gantry's end-to-end tests: real hubs and agents on loopback, real Docker, real Chromium.
//! One module per area; all link into one test program.

mod accounts;
mod alerts;
mod artefacts;
mod audit;
mod backup;
mod billing;
mod ca_rollover;
mod chaos;
mod checks;
mod cli;
mod dashboard_account;
mod dashboard_e2e;
mod dashboard_pages;
mod deployments;
mod docker;
mod enrollment;
mod hygiene;
mod installer;
mod isolation;
mod keys;
mod ledger;
mod lifecycle;
mod mfa;
mod network;
mod openapi;
mod org_data;
mod plan_limits;
mod protocol;
mod sessions;
mod stripe;
mod support_actions;
mod telemetry;
mod tidy;
mod tls;
mod webhooks;
