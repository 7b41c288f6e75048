//! The `courier` binary against a real broker: the README walkthrough in
//! JSON mode, and errors as one line with a non-zero exit.

mod common;

use std::process::{Command, Output, Stdio};

use common::TestServer;

fn courier(server: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(args)
        .env("COURIER_SERVER", server)
        .stdin(Stdio::null())
        .output()
        .expect("run courier")
}

fn ok(server: &str, args: &[&str]) -> String {
    let out = courier(server, args);
    assert!(
        out.status.success(),
        "courier {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walkthrough_works_from_the_command_line() {
    let server = TestServer::start().await;
    let url = server.url();
    let url = url.as_str();
    ok(url, &["topic", "create", "orders"]);
    ok(
        url,
        &[
            "sub",
            "create",
            "billing",
            "--topic",
            "orders",
            "--max-delivery-attempts",
            "3",
            "--ack-deadline",
            "5s",
        ],
    );
    ok(url, &["sub", "create", "shipping", "--topic", "orders"]);
    let ids = ok(
        url,
        &[
            "publish", "orders", "--attr", "kind=new", "order 1", "--json",
        ],
    );
    assert_eq!(json_lines(&ids)[0]["message_id"], "0");

    let mut child = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["publish", "orders", "--lines"])
        .env("COURIER_SERVER", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"order 2\norder 3\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 2);

    let pulled = json_lines(&ok(
        url,
        &[
            "pull", "shipping", "--max", "10", "--wait", "2s", "--ack", "--json",
        ],
    ));
    assert_eq!(pulled.len(), 3);
    assert_eq!(pulled[0]["attributes"]["kind"], "new");
    assert_eq!(pulled[0]["delivery_attempt"], 1);
    let stats = json_lines(&ok(url, &["sub", "stats", "shipping", "--json"]));
    assert_eq!(stats[0]["backlog_messages"], 0);

    let pulled = json_lines(&ok(
        url,
        &["pull", "billing", "--max", "10", "--wait", "2s", "--json"],
    ));
    assert_eq!(pulled.len(), 3);
    let ack_id = pulled[1]["ack_id"].as_str().unwrap().to_string();
    ok(
        url,
        &[
            "nack",
            "billing",
            &ack_id,
            "--reject",
            "--reason",
            "bad payload",
        ],
    );
    let dlq = json_lines(&ok(url, &["dlq", "list", "billing", "--json"]));
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0]["reason_text"], "bad payload");
    let status = ok(url, &["status", "orders", "1", "--json"]);
    assert!(status.contains("dead"), "{status}");
    ok(url, &["dlq", "redrive", "billing"]);
    assert!(json_lines(&ok(url, &["dlq", "list", "billing", "--json"])).is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_line_with_the_status_code_and_a_non_zero_exit() {
    let server = TestServer::start().await;
    let url = server.url();
    let out = courier(&url, &["sub", "create", "x", "--topic", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("NOT_FOUND") && stderr.contains("nope"),
        "{stderr}"
    );

    let out = courier(&url, &["topic", "create", "bad/name"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("INVALID_ARGUMENT")
    );

    // Nothing listening there.
    let out = courier("http://127.0.0.1:1", &["topic", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("cannot reach")
    );
    server.stop().await;
}

#[test]
fn publish_usage_names_the_topic_before_the_message() {
    let out = courier("http://127.0.0.1:1", &["publish", "--help"]);
    let help = String::from_utf8(out.stdout).unwrap();
    let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap();
    assert_eq!(
        usage,
        "Usage: courier publish [OPTIONS] <TOPIC> <MESSAGE|--file <FILE>|--lines>"
    );
}

#[test]
fn a_server_that_accepts_and_never_answers_times_out_naming_it() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Accept and hold every connection without a byte in reply.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    let server = format!("http://{addr}");
    let out = courier(&server, &["topic", "list", "--timeout", "300ms"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        format!("error: topic list: no answer from courier at {server} within 300ms (--timeout)")
    );
    // A pull's wait comes on top of the timeout, and the error says so too.
    let out = courier(
        &server,
        &["pull", "s", "--wait", "200ms", "--timeout", "100ms"],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no answer from courier at"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_delete_keeps_a_topic_with_subscriptions_unless_forced_and_says_what_went() {
    let server = TestServer::start().await;
    let url = server.url();
    ok(&url, &["topic", "create", "orders"]);
    ok(&url, &["sub", "create", "billing", "--topic", "orders"]);
    ok(&url, &["publish", "orders", "unread"]);
    let out = courier(&url, &["topic", "delete", "orders"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("FAILED_PRECONDITION: topic \"orders\" has 1 subscription (billing)"),
        "{stderr}"
    );
    // Nothing was deleted.
    ok(&url, &["sub", "stats", "billing"]);
    let said = ok(&url, &["topic", "delete", "orders", "--force"]);
    assert_eq!(
        said.trim(),
        "deleted topic \"orders\" and its subscriptions \"billing\""
    );
    let out = courier(&url, &["sub", "stats", "billing"]);
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_lines_publishes_every_line_when_its_reader_goes_away() {
    use std::io::{BufRead as _, Write as _};
    let server = TestServer::start().await;
    let url = server.url();
    ok(&url, &["topic", "create", "t"]);
    const LINES: u64 = 20_000;
    // `seq 1 20000 | courier publish t --lines | head -1`
    let mut child = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["publish", "t", "--lines"])
        .env("COURIER_SERVER", &url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 1..=LINES {
            writeln!(stdin, "{i}").unwrap();
        }
    });
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The id of line 1 (concurrent batches may land in any order).
    let id: u64 = first.trim().parse().unwrap();
    assert!(id < LINES, "{first}");
    // The reader is gone (stdout dropped here).
    writer.join().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = ok(&url, &["topic", "stats", "t", "--json"]);
    let stats: serde_json::Value = serde_json::from_str(stats.trim()).unwrap();
    assert_eq!(stats["next_offset"], LINES, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_reason_shows_in_status_and_a_fixed_dead_letter_is_resent() {
    let server = TestServer::start().await;
    let url = server.url();
    let url = url.as_str();
    ok(url, &["topic", "create", "orders"]);
    ok(
        url,
        &[
            "sub",
            "create",
            "billing",
            "--topic",
            "orders",
            "--min-backoff",
            "10ms",
            "--max-backoff",
            "10ms",
            "--jitter",
            "off",
        ],
    );
    let got = json_lines(&ok(url, &["sub", "get", "billing", "--json"]));
    assert_eq!(got[0]["retry_policy"]["no_jitter"], true);
    ok(url, &["sub", "update", "billing", "--jitter", "on"]);
    let got = json_lines(&ok(url, &["sub", "get", "billing", "--json"]));
    assert_eq!(got[0]["retry_policy"]["no_jitter"], false);
    assert_eq!(got[0]["retry_policy"]["min_backoff_ms"], 10);
    ok(
        url,
        &["publish", "orders", "--attr", "v=1", "{\"amount\": \"x\"}"],
    );
    let pulled = json_lines(&ok(url, &["pull", "billing", "--wait", "2s", "--json"]));
    let ack_id = pulled[0]["ack_id"].as_str().unwrap().to_string();
    ok(
        url,
        &[
            "nack",
            "billing",
            &ack_id,
            "--reason",
            "amount is not a number",
        ],
    );
    let status = ok(url, &["status", "orders", "0"]);
    assert!(
        status.contains("attempt 1 nacked: amount is not a number"),
        "{status}"
    );

    let pulled = json_lines(&ok(url, &["pull", "billing", "--wait", "2s", "--json"]));
    let ack_id = pulled[0]["ack_id"].as_str().unwrap().to_string();
    ok(
        url,
        &[
            "nack",
            "billing",
            &ack_id,
            "--reject",
            "--reason",
            "bad amount",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("fixed.json");
    std::fs::write(&fixed, "{\"amount\": 12.5}").unwrap();
    let out = ok(
        url,
        &[
            "dlq",
            "redrive",
            "billing",
            "--id",
            "0",
            "--data-file",
            fixed.to_str().unwrap(),
            "--attr",
            "v=2",
        ],
    );
    assert_eq!(
        out.trim(),
        "redrove 1 dead letter of \"billing\" (message 0 with replaced data and attributes)"
    );
    let status = ok(url, &["status", "orders", "0"]);
    assert!(
        status.contains("redriven with replaced content"),
        "{status}"
    );
    let pulled = json_lines(&ok(
        url,
        &["pull", "billing", "--wait", "2s", "--ack", "--json"],
    ));
    assert_eq!(pulled[0]["message_id"], "0");
    // JSON output carries data as base64: this is `{"amount": 12.5}`.
    assert_eq!(pulled[0]["data"], "eyJhbW91bnQiOiAxMi41fQ==");
    assert_eq!(pulled[0]["attributes"]["v"], "2");
    // Nothing left to replace: an error naming the message, exit 1.
    let out = courier(
        url,
        &["dlq", "redrive", "billing", "--id", "0", "--data", "x"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NOT_FOUND") && err.contains("\"0\""), "{err}");
    server.stop().await;
}
