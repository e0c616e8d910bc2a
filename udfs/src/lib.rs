//! sluice-udfs: the built-in stages — DataFusion SQL ([`sql`]) and the registry of Rust
//! functions ([`functions`]).

pub mod aggregate;
pub mod functions;
pub mod registry;
pub mod route;
pub mod sql;
