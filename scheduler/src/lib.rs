//! `flota-scheduler` and `flotactl`: the scheduler records task state,
//! releases dependents and serves the HTTP API and dashboard; `flotactl` is
//! the operator's and producer's CLI.
//!
//! # Layout
//! - [`results`]: consumes `P.results` and `plan.approved`; records once; acks after the record.
//! - [`dependencies`]: releases or fails parked tasks; the dependency deadline sweep.
//! - [`graph`]: dependency rules as pure functions (cycle detection at submit).
//! - [`dataloss`]: notices Redis losing data under the fleet (epoch marker).
//! - [`plans`]: approved plans → one deliberation per role; completion events, once each.
//! - [`http`]: the API router; [`auth`]: bearer-token checks; `dashboard.html`: the dashboard.
//! - [`broker`]: the publishing connection, rebuilt on demand; passive queue declares.
//! - [`metrics`], [`activity`]: `/metrics`, and the dashboard's last minutes.
//! - [`state`]: what handlers and background tasks share.
//! - [`server`]: the process body: API, consumer, sweep, gauges under one shutdown token.
//! - [`fleet`]: starts gpusim, scheduler and workers as child processes (demo, bench, tests).
//! - [`ctl`]: the `flotactl` commands (`ctl::workload`: the demo's messages).

pub mod activity;
pub mod auth;
pub mod broker;
pub mod ctl;
pub mod dataloss;
pub mod deadletters;
pub mod dependencies;
pub mod fleet;
pub mod graph;
pub mod http;
pub mod metrics;
pub mod plans;
pub mod results;
pub mod server;
pub mod state;
