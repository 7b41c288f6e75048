//! `courier serve`: resolves the broker's settings from flags, environment
//! variables, a TOML config file and defaults (in that order of
//! precedence), sets up logging, and runs [`crate::server::run`] until
//! SIGINT or SIGTERM.
//!
//! The resolution is pure: [`Settings`] holds one source's values,
//! [`Settings::from_env`] and [`Settings::from_toml`] build a layer from an
//! injected environment lookup or file text, and [`merge`] combines the
//! layers over [`BrokerConfig::new`]'s defaults.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use serde::Deserialize;
use tokio::signal::unix::{SignalKind, signal};

use super::parse;
use crate::broker::BrokerConfig;
use crate::server::ServeOptions;
use crate::storage::FsyncMode;

/// Listen address when no source sets one.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Data directory when no source sets one.
pub const DEFAULT_DATA_DIR: &str = "./courier-data";
/// Exit code after a second SIGINT/SIGTERM cut a graceful shutdown short.
const FORCED_EXIT_CODE: i32 = 130;

/// Environment variable of each setting.
pub const ENV_LISTEN: &str = "COURIER_LISTEN";
pub const ENV_DATA_DIR: &str = "COURIER_DATA_DIR";
pub const ENV_FSYNC: &str = "COURIER_FSYNC";
pub const ENV_CONFIG: &str = "COURIER_CONFIG";
pub const ENV_LOG_FORMAT: &str = "COURIER_LOG_FORMAT";
pub const ENV_SEGMENT_BYTES: &str = "COURIER_SEGMENT_BYTES";
pub const ENV_MAX_MESSAGE_BYTES: &str = "COURIER_MAX_MESSAGE_BYTES";
pub const ENV_TAIL_CACHE_BYTES: &str = "COURIER_TAIL_CACHE_BYTES";
pub const ENV_MEMORY_MAX: &str = "COURIER_MEMORY_MAX";
pub const ENV_UNACKED_WINDOW_MAX: &str = "COURIER_UNACKED_WINDOW_MAX";
pub const ENV_WRITER_THREADS: &str = "COURIER_WRITER_THREADS";
/// Most `writer_threads`.
const WRITER_THREADS_MAX: u64 = 64;
pub const ENV_SYNCFS: &str = "COURIER_SYNCFS";
pub const ENV_CONNECTIONS_MAX: &str = "COURIER_CONNECTIONS_MAX";
pub const ENV_HANDSHAKE_TIMEOUT: &str = "COURIER_HANDSHAKE_TIMEOUT";

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// Plain text for people.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("bad log format {s:?}: expected human or json")),
        }
    }
}

/// Whether the writer pool may make a round durable with one `syncfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum SyncFsMode {
    /// Where the file system's `syncfs` can be trusted (ext4, XFS, btrfs).
    #[default]
    Auto,
    /// Never: one fdatasync per file written.
    Off,
}

impl FromStr for SyncFsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(SyncFsMode::Auto),
            "off" => Ok(SyncFsMode::Off),
            _ => Err(format!("bad syncfs mode {s:?}: expected auto or off")),
        }
    }
}

/// Flags of `courier serve`. Every setting may also come from an
/// environment variable or the config file; flags win over both.
#[derive(Args, Debug, Clone, Default, PartialEq)]
pub struct ServeArgs {
    /// Address to listen on, IP:PORT or HOST:PORT [env: COURIER_LISTEN] [default: 127.0.0.1:50051]
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub listen: Option<SocketAddr>,

    /// Directory holding all broker data [env: COURIER_DATA_DIR] [default: ./courier-data]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// When writes count as durable: always, interval:MS or never [env: COURIER_FSYNC] [default: always]
    #[arg(long, value_name = "MODE")]
    pub fsync: Option<FsyncMode>,

    /// TOML config file with lower precedence than flags and environment [env: COURIER_CONFIG]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log line format on stderr [env: COURIER_LOG_FORMAT] [default: human]
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Size of topic log segments, e.g. 64MiB [env: COURIER_SEGMENT_BYTES]
    #[arg(long, value_name = "BYTES", value_parser = parse::bytes)]
    pub segment_bytes: Option<u64>,

    /// Largest message (data + attributes + ordering key), e.g. 10MiB [env: COURIER_MAX_MESSAGE_BYTES]
    #[arg(long, value_name = "BYTES", value_parser = parse::bytes)]
    pub max_message_bytes: Option<u64>,

    /// Whole broker: bytes of recent messages served from memory, part of --memory-max [env: COURIER_TAIL_CACHE_BYTES] [default: 1/16 of --memory-max]
    #[arg(long, value_name = "BYTES", value_parser = parse::bytes)]
    pub tail_cache_bytes: Option<u64>,

    /// Whole broker: message bytes held in memory (tail caches, pending appends, queued deliveries) [env: COURIER_MEMORY_MAX] [default: 1GiB]
    #[arg(long, value_name = "BYTES", value_parser = parse::bytes)]
    pub memory_max: Option<u64>,

    /// Per subscription: how far past the ack floor messages are handed out [env: COURIER_UNACKED_WINDOW_MAX]
    #[arg(long, value_name = "N")]
    pub unacked_window_max: Option<u64>,

    /// Threads that write and sync every log, 1 to 64; an idle topic costs none [env: COURIER_WRITER_THREADS] [default: 4]
    #[arg(long, value_name = "N")]
    pub writer_threads: Option<u64>,

    /// Sync a round of many logs with one syncfs where the file system allows it (ext4, XFS, btrfs), or off: one fdatasync per file [env: COURIER_SYNCFS] [default: auto]
    #[arg(long, value_enum, value_name = "MODE")]
    pub syncfs: Option<SyncFsMode>,

    /// Most client connections open at once [env: COURIER_CONNECTIONS_MAX] [default: derived from the file descriptor limit]
    #[arg(long, value_name = "N")]
    pub connections_max: Option<u64>,

    /// Time a new connection has to start HTTP/2, e.g. 10s or 500ms [env: COURIER_HANDSHAKE_TIMEOUT] [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse::duration_ms)]
    pub handshake_timeout: Option<u64>,
}

/// The settings one source gives; `None` leaves a setting to lower ones.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub fsync: Option<FsyncMode>,
    pub log_format: Option<LogFormat>,
    pub segment_bytes: Option<u64>,
    pub max_message_bytes: Option<u64>,
    pub tail_cache_bytes: Option<u64>,
    pub memory_max: Option<u64>,
    pub unacked_window_max: Option<u64>,
    pub writer_threads: Option<u64>,
    pub syncfs: Option<SyncFsMode>,
    pub connections_max: Option<u64>,
    /// Milliseconds.
    pub handshake_timeout: Option<u64>,
}

/// The `serve` configuration once every source is merged.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub options: ServeOptions,
    pub log_format: LogFormat,
}

/// The config file's shape. Unknown keys are an error naming the key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    fsync: Option<String>,
    log_format: Option<String>,
    segment_bytes: Option<ByteSize>,
    max_message_bytes: Option<ByteSize>,
    tail_cache_bytes: Option<ByteSize>,
    memory_max: Option<ByteSize>,
    unacked_window_max: Option<u64>,
    writer_threads: Option<u64>,
    syncfs: Option<String>,
    connections_max: Option<u64>,
    handshake_timeout: Option<String>,
}

/// A byte count in the config file: an integer or a string with a unit
/// (`"64MiB"`).
#[derive(Debug)]
struct ByteSize(u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte count such as 1048576 or \"64MiB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("{v} is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse::bytes(v).map(ByteSize).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Settings {
    /// The layer given by command-line flags.
    pub fn from_flags(args: &ServeArgs) -> Settings {
        Settings {
            listen: args.listen,
            data_dir: args.data_dir.clone(),
            fsync: args.fsync,
            log_format: args.log_format,
            segment_bytes: args.segment_bytes,
            max_message_bytes: args.max_message_bytes,
            tail_cache_bytes: args.tail_cache_bytes,
            memory_max: args.memory_max,
            unacked_window_max: args.unacked_window_max,
            writer_threads: args.writer_threads,
            syncfs: args.syncfs,
            connections_max: args.connections_max,
            handshake_timeout: args.handshake_timeout,
        }
    }

    /// The layer given by `COURIER_*` environment variables, read through
    /// `lookup`. Empty variables count as unset.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Settings> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        fn parsed<T>(
            name: &str,
            value: Option<String>,
            parse: impl Fn(&str) -> Result<T, String>,
        ) -> anyhow::Result<Option<T>> {
            value
                .map(|v| parse(v.trim()).map_err(|e| anyhow::anyhow!("{name}={v:?}: {e}")))
                .transpose()
        }
        Ok(Settings {
            listen: parsed(ENV_LISTEN, get(ENV_LISTEN), parse_listen)?,
            data_dir: get(ENV_DATA_DIR).map(PathBuf::from),
            fsync: parsed(ENV_FSYNC, get(ENV_FSYNC), FsyncMode::from_str)?,
            log_format: parsed(
                ENV_LOG_FORMAT,
                get(ENV_LOG_FORMAT),
                <LogFormat as FromStr>::from_str,
            )?,
            segment_bytes: parsed(ENV_SEGMENT_BYTES, get(ENV_SEGMENT_BYTES), parse::bytes)?,
            max_message_bytes: parsed(
                ENV_MAX_MESSAGE_BYTES,
                get(ENV_MAX_MESSAGE_BYTES),
                parse::bytes,
            )?,
            tail_cache_bytes: parsed(
                ENV_TAIL_CACHE_BYTES,
                get(ENV_TAIL_CACHE_BYTES),
                parse::bytes,
            )?,
            memory_max: parsed(ENV_MEMORY_MAX, get(ENV_MEMORY_MAX), parse::bytes)?,
            unacked_window_max: parsed(ENV_UNACKED_WINDOW_MAX, get(ENV_UNACKED_WINDOW_MAX), count)?,
            writer_threads: parsed(ENV_WRITER_THREADS, get(ENV_WRITER_THREADS), count)?,
            syncfs: parsed(
                ENV_SYNCFS,
                get(ENV_SYNCFS),
                <SyncFsMode as FromStr>::from_str,
            )?,
            connections_max: parsed(ENV_CONNECTIONS_MAX, get(ENV_CONNECTIONS_MAX), count)?,
            handshake_timeout: parsed(
                ENV_HANDSHAKE_TIMEOUT,
                get(ENV_HANDSHAKE_TIMEOUT),
                parse::duration_ms,
            )?,
        })
    }

    /// The layer given by a config file's text; `origin` names the file in
    /// errors.
    pub fn from_toml(origin: &str, text: &str) -> anyhow::Result<Settings> {
        let file: FileConfig = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_string();
            match e.span().and_then(|span| text.get(..span.start)) {
                // Quote the offending line: errors about a value (rather
                // than an unknown key) do not name the key otherwise.
                Some(before) => {
                    let line = before.matches('\n').count() + 1;
                    let start = before.rfind('\n').map_or(0, |i| i + 1);
                    let source = text[start..].lines().next().unwrap_or("").trim();
                    anyhow::anyhow!("config file {origin}: line {line} `{source}`: {message}")
                }
                None => anyhow::anyhow!("config file {origin}: {message}"),
            }
        })?;
        let key = |name: &str, e: String| anyhow::anyhow!("config file {origin}: {name}: {e}");
        Ok(Settings {
            listen: file
                .listen
                .map(|v| parse_listen(&v).map_err(|e| key("listen", e)))
                .transpose()?,
            data_dir: file.data_dir,
            fsync: file
                .fsync
                .map(|v| FsyncMode::from_str(&v).map_err(|e| key("fsync", e)))
                .transpose()?,
            log_format: file
                .log_format
                .map(|v| <LogFormat as FromStr>::from_str(&v).map_err(|e| key("log_format", e)))
                .transpose()?,
            segment_bytes: file.segment_bytes.map(|b| b.0),
            max_message_bytes: file.max_message_bytes.map(|b| b.0),
            tail_cache_bytes: file.tail_cache_bytes.map(|b| b.0),
            memory_max: file.memory_max.map(|b| b.0),
            unacked_window_max: file.unacked_window_max,
            writer_threads: file.writer_threads,
            syncfs: file
                .syncfs
                .map(|v| <SyncFsMode as FromStr>::from_str(&v).map_err(|e| key("syncfs", e)))
                .transpose()?,
            connections_max: file.connections_max,
            handshake_timeout: file
                .handshake_timeout
                .map(|v| parse::duration_ms(&v).map_err(|e| key("handshake_timeout", e)))
                .transpose()?,
        })
    }

    /// This layer over `lower`: each setting from `self` if set, else from
    /// `lower`.
    pub fn over(self, lower: Settings) -> Settings {
        Settings {
            listen: self.listen.or(lower.listen),
            data_dir: self.data_dir.or(lower.data_dir),
            fsync: self.fsync.or(lower.fsync),
            log_format: self.log_format.or(lower.log_format),
            segment_bytes: self.segment_bytes.or(lower.segment_bytes),
            max_message_bytes: self.max_message_bytes.or(lower.max_message_bytes),
            tail_cache_bytes: self.tail_cache_bytes.or(lower.tail_cache_bytes),
            memory_max: self.memory_max.or(lower.memory_max),
            unacked_window_max: self.unacked_window_max.or(lower.unacked_window_max),
            writer_threads: self.writer_threads.or(lower.writer_threads),
            syncfs: self.syncfs.or(lower.syncfs),
            connections_max: self.connections_max.or(lower.connections_max),
            handshake_timeout: self.handshake_timeout.or(lower.handshake_timeout),
        }
    }
}

fn count(v: &str) -> Result<u64, String> {
    v.parse::<u64>().map_err(|e| format!("not a count: {e}"))
}

/// `IP:PORT`, or `HOST:PORT` with a host name that resolves here
/// (`localhost:50051`): the first address it resolves to.
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs as _;
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let bad = || format!("bad listen address {s:?}: expected IP:PORT such as {DEFAULT_LISTEN}");
    // Only something shaped HOST:PORT is looked up.
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    let mut addrs = s
        .to_socket_addrs()
        .map_err(|e| format!("bad listen address {s:?}: cannot resolve {host:?} ({e})"))?;
    addrs
        .next()
        .ok_or_else(|| format!("bad listen address {s:?}: {host:?} resolves to no address"))
}

/// Merges the layers, highest precedence first, over the defaults
/// ([`BrokerConfig::new`], [`DEFAULT_LISTEN`], [`DEFAULT_DATA_DIR`]) and
/// checks the result.
pub fn merge(flags: Settings, env: Settings, file: Settings) -> anyhow::Result<Resolved> {
    let s = flags.over(env).over(file);
    let listen = match s.listen {
        Some(listen) => listen,
        None => parse_listen(DEFAULT_LISTEN).map_err(anyhow::Error::msg)?,
    };
    let mut broker = BrokerConfig::new(
        s.data_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
    );
    if let Some(fsync) = s.fsync {
        broker.fsync = fsync;
    }
    if let Some(n) = s.segment_bytes {
        anyhow::ensure!(n >= 1, "segment_bytes must be at least 1");
        broker.segment_bytes_max = n;
    }
    if let Some(n) = s.max_message_bytes {
        anyhow::ensure!(n >= 1, "max_message_bytes must be at least 1");
        broker.message_bytes_max = usize::try_from(n)
            .map_err(|_| anyhow::anyhow!("max_message_bytes {n} is too large"))?;
    }
    if let Some(n) = s.memory_max {
        broker.memory_bytes_max = n;
        broker.tail_cache_bytes_max = n / crate::broker::config::TAIL_CACHE_SHARE_DEFAULT;
    }
    if let Some(n) = s.tail_cache_bytes {
        broker.tail_cache_bytes_max = n;
    }
    crate::broker::memory::MemoryShares::of(&broker).map_err(anyhow::Error::msg)?;
    if let Some(n) = s.unacked_window_max {
        anyhow::ensure!(n >= 1, "unacked_window_max must be at least 1");
        broker.unacked_window_max = n;
    }
    if let Some(n) = s.writer_threads {
        anyhow::ensure!(
            (1..=WRITER_THREADS_MAX).contains(&n),
            "writer_threads must be 1 to {WRITER_THREADS_MAX}, not {n}"
        );
        broker.writer_threads = n as usize;
    }
    if let Some(mode) = s.syncfs {
        broker.syncfs = mode == SyncFsMode::Auto;
    }
    if let Some(n) = s.connections_max {
        anyhow::ensure!(n >= 1, "connections_max must be at least 1");
    }
    if let Some(ms) = s.handshake_timeout {
        anyhow::ensure!(ms >= 1, "handshake_timeout must be at least 1ms");
    }
    Ok(Resolved {
        options: ServeOptions {
            listen,
            broker,
            connections_max: s
                .connections_max
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            handshake_timeout: s.handshake_timeout.map(std::time::Duration::from_millis),
        },
        log_format: s.log_format.unwrap_or_default(),
    })
}

/// Resolves `serve`'s configuration from its flags, an environment lookup
/// and a file reader: the config file named by `--config` or
/// `COURIER_CONFIG` (none by default) is read and parsed.
pub fn resolve(
    args: &ServeArgs,
    env: impl Fn(&str) -> Option<String>,
    read_file: impl Fn(&Path) -> std::io::Result<String>,
) -> anyhow::Result<Resolved> {
    let config_path = args.config.clone().or_else(|| {
        env(ENV_CONFIG)
            .filter(|v| !v.trim().is_empty())
            .map(PathBuf::from)
    });
    let env_layer = Settings::from_env(&env)?;
    let file_layer = match config_path {
        Some(path) => {
            let text = read_file(&path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            Settings::from_toml(&path.display().to_string(), &text)?
        }
        None => Settings::default(),
    };
    merge(Settings::from_flags(args), env_layer, file_layer)
}

impl ServeArgs {
    /// Runs the broker until SIGINT or SIGTERM.
    pub async fn run(self) -> anyhow::Result<()> {
        let resolved = resolve(
            &self,
            |k| std::env::var(k).ok(),
            |p| std::fs::read_to_string(p),
        )?;
        init_logging(resolved.log_format);
        let shutdown = shutdown_signal().context("installing signal handlers")?;
        let data_dir = resolved.options.broker.data_dir.clone();
        let fsync = resolved.options.broker.fsync;
        let on_ready = move |addr: SocketAddr| {
            tracing::info!(
                "courier listening on {addr} (data dir {}, fsync {fsync})",
                data_dir.display()
            );
        };
        crate::server::run(resolved.options, shutdown, on_ready).await
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::filter::LevelFilter;
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A subscriber already installed (tests) is kept.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A future that completes on the first SIGINT or SIGTERM. A second signal
/// during the graceful shutdown exits the process at once.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::info!("received {name}, shutting down");
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
            tracing::warn!("received {name} again, exiting without finishing the shutdown");
            std::process::exit(FORCED_EXIT_CODE);
        });
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn serve_args(argv: &[&str]) -> ServeArgs {
        let argv = ["courier", "serve"].iter().chain(argv).copied();
        match Cli::try_parse_from(argv) {
            Ok(Cli {
                command: Command::Serve(args),
            }) => args,
            other => panic!("not a serve command line: {other:?}"),
        }
    }

    fn no_file(path: &Path) -> std::io::Result<String> {
        panic!("unexpected read of {}", path.display())
    }

    #[test]
    fn defaults_come_from_broker_config() {
        let r = merge(
            Settings::default(),
            Settings::default(),
            Settings::default(),
        )
        .unwrap();
        let d = BrokerConfig::new(DEFAULT_DATA_DIR);
        assert_eq!(r.options.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(r.options.broker.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(r.options.broker.fsync, FsyncMode::Always);
        assert_eq!(r.options.broker.segment_bytes_max, d.segment_bytes_max);
        assert_eq!(r.options.broker.message_bytes_max, d.message_bytes_max);
        assert_eq!(
            r.options.broker.tail_cache_bytes_max,
            d.tail_cache_bytes_max
        );
        assert_eq!(r.options.broker.unacked_window_max, d.unacked_window_max);
        assert_eq!(r.log_format, LogFormat::Human);
    }

    #[test]
    fn flags_override_env_override_file_override_defaults() {
        let file = Settings::from_toml(
            "c.toml",
            r#"
            listen = "0.0.0.0:1"
            data_dir = "/file"
            fsync = "never"
            log_format = "json"
            segment_bytes = "1MiB"
            max_message_bytes = 1000
            tail_cache_bytes = 0
            unacked_window_max = 7
            writer_threads = 3
            syncfs = "off"
            "#,
        )
        .unwrap();
        let env = Settings::from_env(env(&[
            (ENV_LISTEN, "0.0.0.0:2"),
            (ENV_DATA_DIR, "/env"),
            (ENV_FSYNC, "interval:50"),
        ]))
        .unwrap();
        let flags = Settings::from_flags(&serve_args(&["--listen", "0.0.0.0:3"]));
        let r = merge(flags, env, file).unwrap();
        assert_eq!(r.options.listen.to_string(), "0.0.0.0:3"); // flag
        assert_eq!(r.options.broker.data_dir, PathBuf::from("/env")); // env
        assert_eq!(r.options.broker.fsync, FsyncMode::Interval(50)); // env
        assert_eq!(r.log_format, LogFormat::Json); // file
        assert_eq!(r.options.broker.segment_bytes_max, 1 << 20); // file
        assert_eq!(r.options.broker.message_bytes_max, 1000);
        assert_eq!(r.options.broker.tail_cache_bytes_max, 0);
        assert_eq!(r.options.broker.unacked_window_max, 7);
        assert_eq!(r.options.broker.writer_threads, 3);
        assert!(!r.options.broker.syncfs);
        let d = BrokerConfig::new("x");
        assert!(d.syncfs, "syncfs is auto by default");
        assert_eq!(r.options.broker.tick_ms, d.tick_ms); // default
    }

    #[test]
    fn every_flag_parses_into_its_setting() {
        let args = serve_args(&[
            "--listen",
            "127.0.0.1:9",
            "--data-dir",
            "/d",
            "--fsync",
            "interval:100",
            "--config",
            "c.toml",
            "--log-format",
            "json",
            "--segment-bytes",
            "8MiB",
            "--max-message-bytes",
            "1024",
            "--tail-cache-bytes",
            "0",
            "--memory-max",
            "512MiB",
            "--unacked-window-max",
            "5",
            "--writer-threads",
            "2",
            "--syncfs",
            "off",
            "--connections-max",
            "7",
            "--handshake-timeout",
            "2s",
        ]);
        assert_eq!(args.config, Some(PathBuf::from("c.toml")));
        let s = Settings::from_flags(&args);
        assert_eq!(
            s,
            Settings {
                listen: Some("127.0.0.1:9".parse().unwrap()),
                data_dir: Some("/d".into()),
                fsync: Some(FsyncMode::Interval(100)),
                log_format: Some(LogFormat::Json),
                segment_bytes: Some(8 << 20),
                max_message_bytes: Some(1024),
                tail_cache_bytes: Some(0),
                memory_max: Some(512 << 20),
                unacked_window_max: Some(5),
                writer_threads: Some(2),
                syncfs: Some(SyncFsMode::Off),
                connections_max: Some(7),
                handshake_timeout: Some(2000),
            }
        );
        assert_eq!(serve_args(&[]), ServeArgs::default());
    }

    #[test]
    fn listen_addresses_may_name_a_host() {
        assert_eq!(
            parse_listen("127.0.0.1:9").unwrap(),
            "127.0.0.1:9".parse::<SocketAddr>().unwrap()
        );
        let local = parse_listen("localhost:50070").unwrap();
        assert!(local.ip().is_loopback(), "{local}");
        assert_eq!(local.port(), 50070);
        assert!(parse_listen("localhost").is_err());
        assert!(parse_listen("localhost:http").is_err());
        assert!(parse_listen(":80").is_err());
    }

    #[test]
    fn bad_flag_values_are_usage_errors() {
        for argv in [
            &["courier", "serve", "--listen", "localhost"][..],
            &["courier", "serve", "--fsync", "interval:0"],
            &["courier", "serve", "--log-format", "xml"],
            &["courier", "serve", "--segment-bytes", "big"],
            &["courier", "serve", "--server", "http://x"],
        ] {
            let err = Cli::try_parse_from(argv).expect_err(&argv.join(" "));
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn unknown_config_keys_are_named() {
        let err = Settings::from_toml("c.toml", "listen = \"127.0.0.1:1\"\nlisten_addr = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_addr"), "{err}");
        assert!(err.contains("c.toml"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn bad_config_values_name_the_key() {
        for (text, key) in [
            ("fsync = \"sometimes\"", "fsync"),
            ("listen = \"nowhere\"", "listen"),
            ("log_format = \"xml\"", "log_format"),
            ("segment_bytes = -1", "segment_bytes"),
            ("segment_bytes = \"lots\"", "segment_bytes"),
            ("unacked_window_max = \"x\"", "unacked_window_max"),
        ] {
            let err = Settings::from_toml("c.toml", text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let err = Settings::from_env(env(&[(ENV_FSYNC, "sometimes")])).unwrap_err();
        assert!(
            err.to_string().starts_with("COURIER_FSYNC=\"sometimes\""),
            "{err}"
        );
        let err = Settings::from_env(env(&[(ENV_SEGMENT_BYTES, "x")])).unwrap_err();
        assert!(err.to_string().contains(ENV_SEGMENT_BYTES), "{err}");
        // Empty means unset.
        let s = Settings::from_env(env(&[(ENV_LISTEN, ""), (ENV_FSYNC, " ")])).unwrap();
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn zero_limits_are_rejected() {
        for s in [
            Settings {
                segment_bytes: Some(0),
                ..Settings::default()
            },
            Settings {
                max_message_bytes: Some(0),
                ..Settings::default()
            },
            Settings {
                unacked_window_max: Some(0),
                ..Settings::default()
            },
            Settings {
                writer_threads: Some(0),
                ..Settings::default()
            },
            Settings {
                writer_threads: Some(65),
                ..Settings::default()
            },
        ] {
            assert!(merge(s, Settings::default(), Settings::default()).is_err());
        }
    }

    #[test]
    fn config_file_comes_from_flag_or_env() {
        let read = |path: &Path| -> std::io::Result<String> {
            match path.to_str() {
                Some("flag.toml") => Ok("data_dir = \"/flag-file\"".into()),
                Some("env.toml") => Ok("data_dir = \"/env-file\"".into()),
                _ => Err(std::io::ErrorKind::NotFound.into()),
            }
        };
        let env_cfg = env(&[(ENV_CONFIG, "env.toml")]);
        let r = resolve(&serve_args(&["--config", "flag.toml"]), &env_cfg, read).unwrap();
        assert_eq!(r.options.broker.data_dir, PathBuf::from("/flag-file"));
        let r = resolve(&serve_args(&[]), &env_cfg, read).unwrap();
        assert_eq!(r.options.broker.data_dir, PathBuf::from("/env-file"));
        let r = resolve(&serve_args(&[]), env(&[]), no_file).unwrap();
        assert_eq!(r.options.broker.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        let err = resolve(&serve_args(&["--config", "missing.toml"]), env(&[]), read).unwrap_err();
        assert!(
            format!("{err:#}").contains("reading config file missing.toml"),
            "{err:#}"
        );
    }
}
