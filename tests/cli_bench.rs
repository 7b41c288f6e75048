//! `courier bench` against a real broker: each workload with tiny sizes,
//! its `--json` report parsed and checked for present, positive and
//! consistent figures (never for timings), plus `--record`, `--chart`,
//! `--spawn-broker` and the clean-up of the bench topics.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::TestServer;
use courier::api::pb::v1::ListTopicsRequest;
use serde_json::Value;

fn bench(server: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("bench")
        .args(args)
        .env("COURIER_SERVER", server)
        .stdin(Stdio::null())
        .output()
        .expect("run courier bench")
}

/// Runs `courier bench ARGS --json`, checks it succeeded quietly, and
/// returns the one JSON object it printed.
fn bench_json(server: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = bench(server, &all);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "courier bench {args:?} failed: {stderr}"
    );
    // stderr is not a terminal here: no progress bar, nothing else.
    assert!(stderr.is_empty(), "unexpected stderr: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "exactly one JSON line: {stdout}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    check_envelope(&report);
    report
}

fn check_envelope(report: &Value) {
    assert!(report["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(report["unix_ms"].as_u64().unwrap() > 0);
    assert!(!report["broker"]["version"].as_str().unwrap().is_empty());
    assert!(!report["broker"]["fsync_mode"].as_str().unwrap().is_empty());
    assert!(report["host"]["cpus"].as_u64().unwrap() >= 1);
    assert!(report["elapsed_s"].as_f64().unwrap() > 0.0);
}

fn positive(v: &Value, key: &str) -> f64 {
    let x = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"));
    assert!(x > 0.0, "{key} = {x} in {v}");
    x
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn check_percentiles(p: &Value, count: u64) {
    assert_eq!(u(p, "count"), count, "{p}");
    let order = ["min_ms", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"];
    let values: Vec<f64> = order.iter().map(|k| p[k].as_f64().unwrap()).collect();
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "{p}");
    assert!(values[5] > 0.0, "{p}");
}

async fn bench_topics(server: &TestServer) -> Vec<String> {
    let mut clients = server.clients().await;
    let topics = clients
        .admin
        .list_topics(ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics;
    topics
        .into_iter()
        .map(|t| t.name)
        .filter(|n| n.starts_with("bench-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reports_every_message_and_cleans_up() {
    let server = TestServer::start().await;
    let report = bench_json(&server.url(), &["--messages", "2000"]);
    assert_eq!(report["workload"], "publish");
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    let r = &results[0];
    assert_eq!(r["workload"], "publish");
    assert!(r["topic"].as_str().unwrap().starts_with("bench-publish-"));
    assert_eq!(u(&r["params"], "messages"), 2000);
    assert_eq!(u(&r["params"], "size"), 256);
    assert_eq!(u(r, "published"), 2000);
    positive(r, "elapsed_s");
    let rate = positive(r, "msgs_per_s");
    let mb = positive(r, "mb_per_s");
    assert!((rate * 256.0 / 1e6 - mb).abs() < 0.01 + mb * 0.01, "{r}");
    let batch = u(&r["params"], "batch");
    assert_eq!(u(r, "publish_calls"), 2000u64.div_ceil(batch));
    check_percentiles(&r["publish_call_latency"], u(r, "publish_calls"));
    assert!(bench_topics(&server).await.is_empty(), "topics left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_message_publishers_spread_over_topics_through_the_stream_publisher() {
    let server = TestServer::start().await;
    let report = bench_json(
        &server.url(),
        &[
            "--messages",
            "1000",
            "--topics",
            "5",
            "--publisher",
            "stream",
            "--in-flight",
            "50",
            "--keep",
        ],
    );
    let r = &report["results"][0];
    assert_eq!(r["params"]["publisher"], "stream");
    assert_eq!(u(&r["params"], "topics"), 5);
    assert_eq!(u(r, "published"), 1000);
    // A call is one message.
    assert_eq!(u(r, "publish_calls"), 1000);
    check_percentiles(&r["publish_call_latency"], 1000);
    let topics = bench_topics(&server).await;
    assert_eq!(topics.len(), 5, "{topics:?}");
    let mut clients = server.clients().await;
    for name in topics {
        let stats = clients
            .admin
            .get_topic_stats(courier::api::pb::v1::GetTopicStatsRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            stats.next_offset, 200,
            "{name}: message n goes to topic n mod 5"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_get_a_batch_the_broker_accepts() {
    let server = TestServer::start().await;
    // 1 MiB messages: the default batch of 100 would be 100 MiB a call.
    let report = bench_json(&server.url(), &["--messages", "12", "--size", "1MiB"]);
    let r = &report["results"][0];
    assert_eq!(u(r, "published"), 12);
    assert_eq!(u(&r["params"], "batch"), 4);
    // Asked for explicitly, a batch over the request limit is a usage
    // error, not a transport failure half-way.
    let out = bench(&server.url(), &["--batch", "100", "--size", "1MiB"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--batch 100"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_acks_every_delivery_and_measures_disk() {
    let server = TestServer::start().await;
    let report = bench_json(
        &server.url(),
        &[
            "--workload",
            "fanout",
            "--messages",
            "500",
            "--subscriptions",
            "3",
            "--size",
            "100",
        ],
    );
    let r = &report["results"][0];
    assert_eq!(r["workload"], "fanout");
    assert_eq!(u(&r["params"], "subscriptions"), 3);
    assert_eq!(u(r, "published"), 500);
    assert_eq!(u(r, "deliveries_expected"), 1500);
    assert_eq!(u(r, "deliveries_acked"), 1500);
    assert_eq!(u(r, "redeliveries"), 0);
    assert_eq!(u(r, "acks_not_ok"), 0);
    positive(r, "publish_msgs_per_s");
    positive(r, "deliveries_acked_per_s");
    positive(r, "drain_elapsed_s");
    assert!(r["fastest_subscription_s"].as_f64() <= r["slowest_subscription_s"].as_f64());
    let disk = &r["disk"];
    assert_eq!(u(disk, "payload_bytes_per_message"), 100);
    // Every record stores the payload plus a header.
    assert!(positive(disk, "topic_bytes_per_message") > 100.0, "{disk}");
    assert!(u(disk, "data_dir_bytes_after_publish") > u(disk, "data_dir_bytes_before"));
    positive(disk, "data_dir_bytes_per_message_published");
    assert!(bench_topics(&server).await.is_empty(), "topics left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_latency_count_what_they_sent() {
    let server = TestServer::start().await;
    let url = server.url();

    let report = bench_json(&url, &["--workload", "drain", "--messages", "1000"]);
    let r = &report["results"][0];
    assert_eq!(r["workload"], "drain");
    assert_eq!(u(r, "prefilled"), 1000);
    assert_eq!(u(r, "drained"), 1000);
    assert_eq!(u(&r["params"], "max_outstanding"), 1000);
    positive(r, "msgs_per_s");
    positive(r, "mb_per_s");
    positive(r, "elapsed_s");

    let report = bench_json(
        &url,
        &[
            "--workload",
            "latency",
            "--duration",
            "1s",
            "--rate",
            "500",
            "--size",
            "64",
        ],
    );
    let r = &report["results"][0];
    assert_eq!(r["workload"], "latency");
    assert_eq!(u(&r["params"], "rate"), 500);
    assert_eq!(u(&r["params"], "duration_ms"), 1000);
    assert_eq!(u(r, "sent"), 500);
    assert_eq!(u(r, "received"), 500);
    assert_eq!(u(r, "acked"), 500);
    assert_eq!(u(r, "malformed"), 0);
    positive(r, "achieved_rate");
    check_percentiles(&r["latency"], 500);
    check_percentiles(&r["latency_from_send"], 500);
    // Measured from the intended send time, latency is never shorter than
    // from the actual send.
    assert!(r["latency"]["max_ms"].as_f64() >= r["latency_from_send"]["max_ms"].as_f64());
    assert!(bench_topics(&server).await.is_empty(), "topics left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_appends_one_line_per_run_and_chart_draws_the_sweep() {
    let server = TestServer::start().await;
    let url = server.url();
    let tmp = tempfile::tempdir().unwrap();
    let record = tmp.path().join("runs.jsonl");
    let chart = tmp.path().join("fanout.svg");
    let record_s = record.to_str().unwrap();
    let chart_s = chart.to_str().unwrap();

    let out = bench(
        &url,
        &["--messages", "300", "--record", record_s, "--quiet"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let human = String::from_utf8(out.stdout).unwrap();
    assert!(human.contains("msgs/s"), "{human}");

    let report = bench_json(
        &url,
        &[
            "--workload",
            "fanout",
            "--messages",
            "100",
            "--chart",
            chart_s,
            "--record",
            record_s,
        ],
    );
    let subs: Vec<u64> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| u(&r["params"], "subscriptions"))
        .collect();
    assert_eq!(subs, [1, 2, 5, 10, 20]);
    for r in report["results"].as_array().unwrap() {
        assert_eq!(
            u(r, "deliveries_acked"),
            100 * u(&r["params"], "subscriptions")
        );
    }
    assert_eq!(report["chart"], chart_s);
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 2);

    let lines: Vec<Value> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["workload"], "publish");
    assert_eq!(lines[1], report);
    for line in &lines {
        check_envelope(line);
    }
    assert!(bench_topics(&server).await.is_empty(), "topics left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_with_a_spawned_broker_measures_a_restart() {
    // No --server needed: the bench starts its own broker.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let unreachable = "http://127.0.0.1:1";
    let report = bench_json(
        unreachable,
        &[
            "--workload",
            "backlog",
            "--messages",
            "2000",
            "--spawn-broker",
            "--bench-dir",
            dir,
        ],
    );
    assert_eq!(report["broker"]["spawned"], true);
    let r = &report["results"][0];
    assert_eq!(r["workload"], "backlog");
    assert_eq!(u(r, "published"), 2000);
    positive(r, "resident_memory_bytes");
    positive(r, "vm_rss_bytes");
    positive(r, "data_dir_bytes");
    assert_eq!(r["restart_measured"], true);
    let restart = &r["restart"];
    positive(restart, "restart_s");
    positive(restart, "first_delivery_after_spawn_s");
    assert_eq!(u(restart, "shutdown_exit_code"), 0);
    assert!(restart["first_delivery_after_spawn_s"].as_f64() >= restart["restart_s"].as_f64());
    positive(restart, "vm_rss_bytes");
    // The spawned broker's data dir is gone.
    assert_eq!(std::fs::read_dir(Path::new(dir)).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_draws_every_curve_and_restarts_the_idle_broker() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let chart = tmp.path().join("scale.svg");
    let report = bench_json(
        "http://127.0.0.1:1",
        &[
            "--workload",
            "scale",
            "--topics",
            "20",
            "--subscriptions",
            "3",
            "--size",
            "8KiB",
            "--messages",
            "300",
            "--spawn-broker",
            "--bench-dir",
            dir.to_str().unwrap(),
            "--chart",
            chart.to_str().unwrap(),
        ],
    );
    let r = &report["results"][0];
    assert_eq!(r["workload"], "scale");
    let points = r["points"].as_array().unwrap();
    let curve = |name: &str, key: &str| -> Vec<u64> {
        points
            .iter()
            .filter(|p| p["curve"] == name)
            .map(|p| u(p, key))
            .collect()
    };
    // Each curve ends at its cap.
    assert_eq!(curve("topics", "topics"), vec![1, 10, 20]);
    assert_eq!(curve("subscriptions", "subscriptions"), vec![1, 3]);
    assert_eq!(curve("size", "size"), vec![256, 4096, 8192]);
    for p in points {
        assert_eq!(u(p, "messages"), 300, "{p}");
        positive(p, "publish_msgs_per_s");
        positive(p, "vm_rss_bytes");
        assert!(u(p, "threads") >= 2, "{p}");
        if p["curve"] == "topics" {
            assert_eq!(p["publisher"], "stream", "{p}");
        }
        if p["curve"] == "subscriptions" {
            positive(p, "deliveries_acked_per_s");
        }
    }
    let idle = &r["idle"];
    assert_eq!((u(idle, "topics"), u(idle, "subscriptions")), (20, 20));
    positive(idle, "threads");
    positive(&idle["restart"], "first_delivery_after_spawn_s");
    positive(idle, "threads_after_restart");
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    // Four series over three panels, a dot per point of each.
    assert_eq!(svg.matches("<polyline").count(), 4);
    assert_eq!(svg.matches("<circle").count(), 3 + 2 * 2 + 3);
    assert!(svg.contains(">8 KiB</text>"), "{svg}");
    // The spawned broker's data dir is gone.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_without_a_spawned_broker_says_restart_was_not_measured() {
    let server = TestServer::start().await;
    let report = bench_json(
        &server.url(),
        &["--workload", "backlog", "--messages", "500"],
    );
    let r = &report["results"][0];
    assert_eq!(r["restart_measured"], false);
    assert_eq!(r["restart"], Value::Null);
    positive(r, "resident_memory_bytes");
    assert!(bench_topics(&server).await.is_empty(), "topics left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumers_hold_what_the_streams_queue_and_give_it_back() {
    let server = TestServer::start().await;
    let report = bench_json(
        &server.url(),
        &[
            "--workload",
            "slow-consumers",
            "--messages",
            "400",
            "--size",
            "256KiB",
            "--streams",
            "2",
        ],
    );
    let r = &report["results"][0];
    assert_eq!(r["workload"], "slow-consumers");
    assert_eq!(u(r, "streams"), 2);
    assert_eq!(u(r, "memory_max_bytes"), 1 << 30);
    // Two streams queue at most 16 MiB (64 messages) each, plus what the
    // transport holds (a 4 MiB response being encoded, the client's 5 MiB
    // HTTP/2 window): far fewer than the 400 messages flow control allows.
    let held = u(r, "held_messages");
    assert!((1..=2 * (64 + 40)).contains(&held), "held {held} in {r}");
    assert!(u(r, "queued_delivery_peak_bytes") <= 2 * (16 << 20), "{r}");
    assert_eq!(u(r, "queued_delivery_after_end_bytes"), 0, "{r}");
    positive(r, "resident_peak_bytes");
    positive(r, "resident_after_streams_end_bytes");
    assert!(bench_topics(&server).await.is_empty(), "topics left behind");
}

#[test]
fn flags_of_other_workloads_are_usage_errors() {
    let out = bench(
        "http://127.0.0.1:1",
        &["--workload", "publish", "--rate", "10"],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--rate applies only to"), "{stderr}");
}
