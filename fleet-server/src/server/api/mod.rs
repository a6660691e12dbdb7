//! The admin API's resource routers (devices, bundles, rollouts, audit); each module returns
//! a router with its state applied, authorizing every handler with
//! [`super::http::authorize`] at the role the action needs.

pub mod audit;
pub mod bundles;
pub mod devices;
pub mod rollouts;
