//! Exhausted connections and file descriptors, against a real `courier
//! serve` child: sockets that never speak are closed after the handshake
//! timeout, the connection limit closes what is over it, and at the file
//! descriptor limit accept backs off instead of spinning, CreateTopic says
//! RESOURCE_EXHAUSTED, and everything works again once descriptors free up.

mod common;

use std::io::Read as _;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Clients, spawn_broker_with};
use courier::api::pb::v1;

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// True if the broker closed `s` (EOF or reset) within `within`.
fn closed_by_peer(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // e.g. the server's SETTINGS frame
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true, // reset
        }
    }
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_never_speak_are_closed_and_the_limit_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = spawn_broker_with(
        tmp.path(),
        &["--handshake-timeout", "500ms", "--connections-max", "40"],
        None,
    );
    let target = addr(&broker.url);
    // 40 silent sockets fill the limit; the 41st is closed at once.
    let mut idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(&target).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let mut over = TcpStream::connect(&target).unwrap();
    assert!(
        closed_by_peer(&mut over, Duration::from_millis(400)),
        "a connection over the limit was kept"
    );
    // All 40 are closed after the handshake timeout.
    let start = Instant::now();
    for (i, s) in idle.iter_mut().enumerate() {
        assert!(
            closed_by_peer(s, Duration::from_secs(5)),
            "silent connection {i} still open after {:?}",
            start.elapsed()
        );
    }
    // And a real client is served.
    let mut c = Clients::connect(&broker.url).await;
    c.create_topic("t").await;
    broker.child.kill().unwrap();
    broker.child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_fd_limit_accept_backs_off_and_errors_are_resource_exhausted() {
    let tmp = tempfile::tempdir().unwrap();
    // A limit of 128 descriptors, and a connection limit above it, so the
    // descriptors run out before the connection limit is reached.
    let mut broker = spawn_broker_with(
        tmp.path(),
        &["--handshake-timeout", "60s", "--connections-max", "10000"],
        Some(128),
    );
    let pid = broker.child.id();
    let mut c = Clients::connect(&broker.url).await;
    c.create_topic("t").await;
    c.create_sub("s", "t").await;
    let target = addr(&broker.url);
    // Sockets until the broker stops accepting: the backlog holds the
    // rest, which the kernel still completes.
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(&target).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(pid) - before;
    assert!(
        used < 0.5,
        "the broker used {used:.2} s of CPU in 2 s at the fd limit: accept is spinning"
    );

    // Creating topics needs descriptors: the first failure is
    // RESOURCE_EXHAUSTED, not INTERNAL.
    let mut exhausted = None;
    for i in 0..200 {
        let r = c
            .admin
            .create_topic(v1::CreateTopicRequest {
                name: format!("x{i}"),
                retention: None,
            })
            .await;
        if let Err(status) = r {
            exhausted = Some(status);
            break;
        }
    }
    let status = exhausted.expect("200 topics created at a limit of 128 descriptors");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    // The established connection keeps working: publish and deliver.
    c.publish("t", &["at the limit"]).await;

    // Free the descriptors: new connections and topics work again.
    drop(idle);
    std::thread::sleep(Duration::from_millis(500));
    let mut fresh = Clients::connect(&broker.url).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fresh
            .admin
            .create_topic(v1::CreateTopicRequest {
                name: "after".into(),
                retention: None,
            })
            .await
        {
            Ok(_) => break,
            Err(s) if Instant::now() < deadline => {
                eprintln!("not yet: {s:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("CreateTopic still fails after descriptors were freed: {s:?}"),
        }
    }
    let got = fresh.pull_n("s", 1, Duration::from_secs(5)).await;
    assert_eq!(common::text(&got[0]), "at the limit");
    assert!(
        broker.child.try_wait().unwrap().is_none(),
        "the broker exited"
    );
    broker.child.kill().unwrap();
    broker.child.wait().unwrap();
}
