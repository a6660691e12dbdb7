//! The embedded MQTT broker (rumqttd, MQTT 3.1.1, plain TCP): a fresh clone runs the fleet
//! server without an external broker. It runs on its own thread and current-thread runtime;
//! stopping it drops that runtime, which closes the listener and every connection.
//!
//! rumqttd's `Broker::start` only logs a listener's bind error from a thread it spawned, so
//! this module (1) probes the address itself first and returns a clear [`BrokerError::Bind`],
//! and (2) runs rumqttd's `Server` directly, so a bind failure in the (tiny) window after the
//! probe still comes back as an error instead of a log line. rumqttd keeps messages in memory
//! only (no persistence); delivery guarantees come from the devices' outboxes and acks.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttd::protocol::v4::V4;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// How long the broker's connections get to close after a stop.
const STOP_DEADLINE: Duration = Duration::from_secs(2);
/// How long the listener gets to accept a first connection after the start.
const READY_DEADLINE: Duration = Duration::from_secs(5);

/// Why the embedded broker is not running.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded MQTT broker cannot listen on {addr} (broker.listen): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded MQTT broker on {addr}: {problem}")]
    Failed { addr: SocketAddr, problem: String },
}

/// Limits of the embedded broker.
#[derive(Debug, Clone)]
pub struct BrokerLimits {
    pub max_connections: usize,
    pub max_payload_bytes: usize,
}

/// A running embedded broker.
pub struct EmbeddedBroker {
    addr: SocketAddr,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    failed: Option<oneshot::Receiver<String>>,
}

impl EmbeddedBroker {
    /// Binds `addr` (probe), starts rumqttd on it and waits until it accepts connections.
    pub async fn start(addr: SocketAddr, limits: &BrokerLimits) -> Result<Self, BrokerError> {
        // rumqttd would only log this from its own thread: check it here first
        drop(
            std::net::TcpListener::bind(addr)
                .map_err(|source| BrokerError::Bind { addr, source })?,
        );
        let segment = limits
            .max_payload_bytes
            .saturating_mul(2)
            .max(4 * 1024 * 1024);
        let router = Router::new(
            0,
            RouterConfig {
                max_connections: limits.max_connections,
                max_outgoing_packet_count: 200,
                // in-memory log per topic filter: 10 segments of at least two payloads each
                max_segment_size: segment,
                max_segment_count: 10,
                ..RouterConfig::default()
            },
        );
        let router_tx = router.spawn();
        let settings = ServerSettings {
            name: "fleet-embedded-v4".into(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 1,
            connections: ConnectionSettings {
                connection_timeout_ms: 10_000,
                max_payload_size: limits.max_payload_bytes,
                max_inflight_count: 100,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let mut server = Server::new(settings, router_tx, V4);
        let stop = CancellationToken::new();
        let (fail_tx, mut fail_rx) = oneshot::channel::<String>();
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = fail_tx.send(format!("cannot start its runtime: {e}"));
                        return;
                    }
                };
                rt.block_on(async {
                    tokio::select! {
                        _ = thread_stop.cancelled() => {}
                        r = server.start(LinkType::Remote) => {
                            let problem = match r {
                                Ok(()) => "listener stopped".to_string(),
                                Err(e) => e.to_string(),
                            };
                            let _ = fail_tx.send(problem);
                        }
                    }
                });
                // closes the listener and every connection task
                rt.shutdown_timeout(STOP_DEADLINE);
            })
            .map_err(|e| BrokerError::Failed {
                addr,
                problem: format!("cannot start its thread: {e}"),
            })?;
        let mut broker = EmbeddedBroker {
            addr,
            stop,
            thread: Some(thread),
            failed: None,
        };
        let probe = connect_addr(addr);
        let deadline = tokio::time::Instant::now() + READY_DEADLINE;
        loop {
            if let Ok(problem) = fail_rx.try_recv() {
                broker.stop().await;
                return Err(BrokerError::Failed { addr, problem });
            }
            if mqtt_ping(probe).await {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                broker.stop().await;
                return Err(BrokerError::Failed {
                    addr,
                    problem: format!("not accepting connections after {READY_DEADLINE:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        broker.failed = Some(fail_rx);
        Ok(broker)
    }

    /// The listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `mqtt://` URL a local client connects to.
    pub fn url(&self) -> String {
        let a = connect_addr(self.addr);
        format!("mqtt://{}:{}", a.ip(), a.port())
    }

    /// Resolves when the broker stopped on its own (its listener failed), with the reason.
    pub async fn failed(&mut self) -> String {
        match self.failed.as_mut() {
            Some(rx) => match rx.await {
                Ok(p) => p,
                // the thread ended without a message: it was stopped
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    /// Stops the listener and closes every connection (within about 2 s).
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Whether an MQTT 3.1.1 CONNECT to `addr` gets a CONNACK (then disconnects cleanly, so
/// the broker logs no aborted connection).
async fn mqtt_ping(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CLIENT: &[u8] = b"fleet-ready-probe";
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let mut connect = vec![0x10, (12 + CLIENT.len()) as u8];
        connect.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 5]);
        connect.extend_from_slice(&[0, CLIENT.len() as u8]);
        connect.extend_from_slice(CLIENT);
        s.write_all(&connect).await?;
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).await?;
        s.write_all(&[0xe0, 0]).await?;
        Ok::<bool, std::io::Error>(connack[0] == 0x20 && connack[3] == 0)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Ok(true))
    )
}

/// Where a local client connects for a listen address (unspecified -> loopback).
fn connect_addr(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v) if v.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v) if v.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_port_is_a_bind_error_naming_the_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let limits = BrokerLimits {
            max_connections: 10,
            max_payload_bytes: 1024 * 1024,
        };
        let err = EmbeddedBroker::start(addr, &limits)
            .await
            .err()
            .expect("the port is taken");
        assert!(matches!(err, BrokerError::Bind { .. }), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }

    #[tokio::test]
    async fn it_accepts_connections_and_stops() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let limits = BrokerLimits {
            max_connections: 10,
            max_payload_bytes: 1024 * 1024,
        };
        let mut b = EmbeddedBroker::start(addr, &limits).await.unwrap();
        assert_eq!(b.url(), format!("mqtt://127.0.0.1:{}", addr.port()));
        assert!(mqtt_ping(addr).await, "CONNACK from the broker");
        b.stop().await;
        assert!(!mqtt_ping(addr).await, "stopped");
        // the listener is closed: the port can be bound again
        assert!(std::net::TcpListener::bind(addr).is_ok());
    }
}
