//! Backend health: the rise/fall decision (pure) and the probes (TCP connect, HTTP GET expecting
//! 2xx), each run on its own thread at its interval, reporting results over a channel.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::Sender,
        Arc,
    },
    time::Duration,
};

use crate::config::{HealthCheck, HealthProbe};

/// A backend's health as rise/fall thresholds decide it. Backends start healthy, so traffic
/// flows from the first moment; `fall` failures in a row take one out, `rise` successes in a
/// row bring it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    streak: u32,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            healthy: true,
            streak: 0,
        }
    }
}

impl Health {
    /// Records one probe result; true when the backend's health changed.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> bool {
        if ok == self.healthy {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let threshold = if self.healthy { fall } else { rise };
        if self.streak >= threshold {
            self.healthy = ok;
            self.streak = 0;
            return true;
        }
        false
    }
}

/// Probes `ip:port` once: a TCP connect, or an HTTP/1.0 GET whose status must be 2xx.
pub fn probe(check: &HealthCheck, ip: IpAddr, port: u16) -> Result<(), String> {
    let addr = SocketAddr::new(ip, check.port.unwrap_or(port));
    let mut stream =
        TcpStream::connect_timeout(&addr, check.timeout).map_err(|e| format!("connect: {e}"))?;
    let HealthProbe::Http { path } = &check.probe else {
        return Ok(());
    };
    stream
        .set_read_timeout(Some(check.timeout))
        .and_then(|_| stream.set_write_timeout(Some(check.timeout)))
        .map_err(|e| e.to_string())?;
    let host = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    // One write: a server may answer after its first read and close, resetting later pieces.
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: sluice-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut head = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        match stream.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    status_ok(&head[..got])
}

/// Checks an HTTP status line: "HTTP/1.x 2xx ...".
pub fn status_ok(head: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(head);
    let mut parts = text.split_whitespace();
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/") {
        return Err(format!(
            "not an HTTP response: {:?}",
            text.lines().next().unwrap_or("")
        ));
    }
    if code.len() == 3 && code.starts_with('2') {
        Ok(())
    } else {
        Err(format!("HTTP status {code}"))
    }
}

/// One probe result, as a checker thread reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub service: String,
    pub backend: IpAddr,
    pub port: u16,
    pub result: Result<(), String>,
}

/// A running checker; dropping it stops the thread after its current probe.
pub struct Checker {
    stop: Arc<AtomicBool>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts probing one backend every `check.interval`, sending each result to `results`.
pub fn spawn(
    service: String,
    backend: IpAddr,
    port: u16,
    check: HealthCheck,
    results: Sender<ProbeResult>,
) -> Checker {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            let result = probe(&check, backend, port);
            if flag.load(Ordering::Relaxed) {
                return;
            }
            let report = ProbeResult {
                service: service.clone(),
                backend,
                port,
                result,
            };
            if results.send(report).is_err() {
                return;
            }
            let mut slept = Duration::ZERO;
            while slept < check.interval && !flag.load(Ordering::Relaxed) {
                let step = Duration::from_millis(50).min(check.interval - slept);
                std::thread::sleep(step);
                slept += step;
            }
        }
    });
    Checker { stop }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_backend_leaves_after_fall_failures_and_returns_after_rise_successes() {
        let mut h = Health::default();
        assert!(h.healthy);
        assert!(!h.observe(false, 2, 3));
        assert!(!h.observe(false, 2, 3));
        assert!(h.observe(false, 2, 3), "third failure in a row");
        assert!(!h.healthy);
        assert!(!h.observe(true, 2, 3));
        assert!(!h.observe(false, 2, 3), "a failure resets the streak");
        assert!(!h.observe(true, 2, 3));
        assert!(h.observe(true, 2, 3));
        assert!(h.healthy);
    }

    #[test]
    fn one_success_between_failures_keeps_a_backend_in() {
        let mut h = Health::default();
        for _ in 0..10 {
            assert!(!h.observe(false, 1, 2));
            assert!(!h.observe(true, 1, 2));
        }
        assert!(h.healthy);
    }

    #[test]
    fn http_status_lines_are_judged_by_their_code() {
        assert!(status_ok(b"HTTP/1.1 200 OK\r\n").is_ok());
        assert!(status_ok(b"HTTP/1.0 204 No Content").is_ok());
        assert_eq!(
            status_ok(b"HTTP/1.1 503 Unavailable"),
            Err("HTTP status 503".into())
        );
        assert!(status_ok(b"SSH-2.0-OpenSSH").is_err());
    }

    fn check(probe: HealthProbe) -> HealthCheck {
        HealthCheck {
            probe,
            port: None,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(500),
            rise: 1,
            fall: 1,
        }
    }

    #[test]
    fn probes_talk_to_real_sockets_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for (i, conn) in listener.incoming().take(3).enumerate() {
                let mut conn = conn.unwrap();
                let mut buf = [0u8; 512];
                let _ = conn.read(&mut buf);
                let reply: &[u8] = if i == 1 {
                    b"HTTP/1.0 200 OK\r\n\r\nok"
                } else {
                    b"HTTP/1.0 500 Oops\r\n\r\n"
                };
                let _ = conn.write_all(reply);
            }
        });
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(probe(&check(HealthProbe::Tcp), ip, port).is_ok());
        let http = check(HealthProbe::Http {
            path: "/healthz".into(),
        });
        assert_eq!(probe(&http, ip, port), Ok(()));
        assert_eq!(probe(&http, ip, port), Err("HTTP status 500".into()));
        server.join().unwrap();
        // Nobody listens on the port any more.
        assert!(probe(&check(HealthProbe::Tcp), ip, port)
            .unwrap_err()
            .starts_with("connect"));
    }
}
