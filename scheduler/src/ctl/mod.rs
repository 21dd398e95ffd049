//! `flotactl` commands, one module each.

pub mod bench;
pub mod ceiling;
pub mod councils;
pub mod demo;
pub mod dlq;
pub mod inspect;
pub mod submit;
pub mod workload;
