//! How fleet modules send to devices: a [`Publisher`] handed to them by the server's MQTT
//! task, so the registry, the bundle delivery and the rollout engine never own a connection.

use std::sync::Arc;

/// Publishes `payload` (QoS 1, not retained) on `<prefix>/<device>/<leaf>`; `false` when it
/// could not be queued (not connected, or the client's bounded request queue is full). The
/// caller keeps what it must re-send (outstanding directives are re-sent on the next tick or
/// when the device comes back).
pub type Publisher = Arc<dyn Fn(&str, &str, Vec<u8>) -> bool + Send + Sync>;

/// Topic leaf of signed directives (`<prefix>/<device>/commands`).
pub const COMMANDS_LEAF: &str = "commands";

/// What [`recorder`] keeps: (device, leaf, payload) per publish.
pub type Recorded = Arc<std::sync::Mutex<Vec<(String, String, Vec<u8>)>>>;

/// A publisher that keeps what it was given (tests).
pub fn recorder() -> (Publisher, Recorded) {
    let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = sent.clone();
    let p: Publisher = Arc::new(move |device: &str, leaf: &str, payload: Vec<u8>| {
        if let Ok(mut v) = s.lock() {
            v.push((device.to_string(), leaf.to_string(), payload));
        }
        true
    });
    (p, sent)
}
