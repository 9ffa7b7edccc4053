//! Connecting to the cluster: seeds, bounded attempts, our own retry loop.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, Event, ReconnectToServer, ServerAddr};
use flowctl_core::FlowError;
use flowctl_core::gate::Gate;
use flowctl_core::lifecycle::{Lease, Ledger, RetryPolicy, retry};
use flowctl_core::stage::{DropReason, Stage, StageCounter};
use tokio::sync::watch;

use crate::ClusterError;

/// Credentials passed through to async-nats.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Credentials {
    /// No credentials.
    #[default]
    None,
    /// `user` / `password`.
    UserPassword(String, String),
    /// A token.
    Token(String),
    /// A NATS credentials file (JWT + nkey seed); needs the `nkeys` feature.
    #[cfg(feature = "nkeys")]
    CredentialsFile(PathBuf),
}

impl Credentials {
    /// What secret these credentials send in the CONNECT message, if any:
    /// a credentials file sends a JWT and a signature of the server's nonce,
    /// never its seed.
    fn secret(&self) -> Option<&'static str> {
        match self {
            Credentials::UserPassword(..) => Some("a user and password"),
            Credentials::Token(_) => Some("a token"),
            _ => None,
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::UserPassword(u, _) => write!(f, "UserPassword({u}, ***)"),
            Credentials::Token(_) => f.write_str("Token(***)"),
            #[cfg(feature = "nkeys")]
            Credentials::CredentialsFile(p) => write!(f, "CredentialsFile({})", p.display()),
        }
    }
}

/// TLS settings passed through to async-nats (rustls with the `ring` backend).
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// Require TLS even if the server does not ask for it.
    pub required: bool,
    /// Extra root certificates (PEM files).
    pub root_certificates: Vec<PathBuf>,
    /// Client certificate and key (PEM files) for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// How [`Cluster::connect`] reaches the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Seed URLs (`nats://host:port`); every attempt tries each of them once.
    pub seeds: Vec<String>,
    /// Bound of one TCP + TLS + handshake try against one seed.
    pub connect_timeout: Duration,
    /// Our retry loop around whole attempts (never async-nats's
    /// `retry_on_initial_connect`). Its `attempt_timeout` should exceed
    /// `seeds.len() * connect_timeout`. Its `ledger` is ignored: see `ledger`.
    pub retry: RetryPolicy,
    /// PING period; a node that stops answering is dropped after about three
    /// periods (async-nats disconnects when more than 2 PINGs are unanswered).
    pub ping_interval: Duration,
    /// Timeout of JetStream API requests and publish acks.
    pub request_timeout: Duration,
    /// Connection name shown in the server's `/connz`; also names the
    /// connection's stage, `nats.<name>.connection` (without a name, the seed
    /// of the first connect stands in), which counts
    /// `flowctl_nats_reconnects_total`.
    pub name: Option<String>,
    /// Prefix of the inboxes (reply subjects) this client subscribes to
    /// (default `_INBOX`). Useful to find this client's subscriptions in `/subsz`.
    pub inbox_prefix: Option<String>,
    /// Credentials.
    pub credentials: Credentials,
    /// TLS.
    pub tls: Tls,
    /// Send a password or a token over connections that are not TLS. Off by
    /// default: with [`Credentials::UserPassword`] or [`Credentials::Token`],
    /// [`Cluster::connect`] refuses to run unless TLS is required
    /// ([`Tls::required`] or `tls://` seeds), because a NATS server, or a man
    /// in the middle posing as one, that answers "TLS not required" would
    /// otherwise receive them in clear. Turn it on only where nobody can
    /// intercept the connection (loopback, a trusted private network): every
    /// hop can read and replay the secret.
    pub allow_plaintext_credentials: bool,
    /// Messages buffered per subscription inside async-nats before it drops
    /// (see [`crate::CoreSource`]). Pull sources never exceed their batch size.
    pub subscription_capacity: usize,
    /// Where connections, subscriptions and tasks are counted.
    pub ledger: Ledger,
}

impl ClusterConfig {
    /// Defaults for these seeds: 2 s per seed, 5 attempts, 1 s pings, 5 s requests.
    pub fn new<I, S>(seeds: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let seeds: Vec<String> = seeds.into_iter().map(Into::into).collect();
        let connect_timeout = Duration::from_secs(2);
        let attempt = connect_timeout * (seeds.len().max(1) as u32) + Duration::from_secs(1);
        ClusterConfig {
            seeds,
            connect_timeout,
            retry: RetryPolicy {
                attempt_timeout: attempt,
                ..RetryPolicy::default()
            },
            ping_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            name: None,
            inbox_prefix: None,
            credentials: Credentials::None,
            tls: Tls::default(),
            allow_plaintext_credentials: false,
            subscription_capacity: 4096,
            ledger: Ledger::global().clone(),
        }
    }

    /// Sets [`ClusterConfig::allow_plaintext_credentials`]: whether a password
    /// or a token may be sent without TLS. Read the risk there first.
    pub fn allow_plaintext_credentials(mut self, allow: bool) -> Self {
        self.allow_plaintext_credentials = allow;
        self
    }
}

/// State shared by the cluster handle, its sources and sinks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) client: async_nats::Client,
    pub(crate) js: async_nats::jetstream::Context,
    pub(crate) ledger: Ledger,
    pub(crate) subscription_capacity: usize,
    /// Bumped on every (re)connect: pull sources re-issue their demand.
    pub(crate) generation: watch::Receiver<u64>,
    pub(crate) events: Arc<Events>,
    _connection: Lease,
}

/// What the event callback records.
#[derive(Debug)]
pub(crate) struct Events {
    /// The gates of the live core subscriptions, by subscription id: a drop
    /// is counted on its subscription's stage when async-nats reports it,
    /// whether or not the consumer is reading.
    pub(crate) gates: Mutex<HashMap<u64, Gate>>,
    pub(crate) reconnects: AtomicU64,
    pub(crate) slow_total: AtomicU64,
    /// The last permission violations the server reported (`-ERR`), newest last.
    pub(crate) violations: Mutex<std::collections::VecDeque<String>>,
    /// Bumped on every new violation, to wake waiting sources.
    pub(crate) violation_gen: watch::Sender<u64>,
    /// `flowctl_nats_reconnects_total` of the connection's stage.
    reconnects_metric: StageCounter,
}

impl Events {
    fn new(stage: &Stage) -> Self {
        Events {
            reconnects_metric: stage.counter("flowctl_nats_reconnects_total"),
            gates: Mutex::default(),
            reconnects: AtomicU64::new(0),
            slow_total: AtomicU64::new(0),
            violations: Mutex::default(),
            violation_gen: watch::channel(0).0,
        }
    }
}

impl Events {
    /// The server's text of a permission violation of `op` ("publish" or
    /// "subscription") on exactly `subject`, if one was reported.
    pub(crate) fn denied(&self, op: &str, subject: &str) -> Option<String> {
        let quoted = format!("\"{subject}\"");
        let v = self.violations.lock().ok()?;
        v.iter()
            .rev()
            .find(|t| {
                let l = t.to_lowercase();
                l.contains(op) && t.contains(&quoted)
            })
            .cloned()
    }
}

/// A connection to a NATS cluster.
///
/// Cheap to clone. The connection closes when the last clone and the last
/// source/sink made from it are dropped; async-nats's own connection task ends
/// then, and every task flowctl started for it is counted in
/// [`ClusterConfig::ledger`] until it ends.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub(crate) shared: Arc<Shared>,
}

fn retry_if(e: &FlowError) -> bool {
    match e.transport_error::<ClusterError>() {
        Some(ClusterError::AuthRejected { .. } | ClusterError::PermissionDenied(_)) => false,
        _ => e.is_transient(),
    }
}

impl Cluster {
    /// Connects to one of `config.seeds`, retrying whole rounds over the seeds
    /// with backoff.
    ///
    /// # Errors
    /// [`ClusterError::NoSeedReachable`] (each seed with its reason),
    /// [`ClusterError::AuthRejected`] (not retried), `FlowError::Config` for an
    /// unparsable seed, or for a password or token that TLS would not protect
    /// (see [`ClusterConfig::allow_plaintext_credentials`]); nothing is sent then.
    pub async fn connect(config: ClusterConfig) -> Result<Cluster, FlowError> {
        if config.seeds.is_empty() {
            return Err(FlowError::Config("no seed urls given".into()));
        }
        let mut addrs = Vec::new();
        for s in &config.seeds {
            let a: ServerAddr = s
                .parse()
                .map_err(|e| FlowError::Config(format!("seed {}: {e}", redact_seed(s))))?;
            if a.has_user_pass() || a.password().is_some() {
                // async-nats never reads them: the connection would go out
                // without the credentials the user meant to send.
                return Err(FlowError::Config(format!(
                    "seed {}: a user or password in a seed url is not used; \
                     set ClusterConfig::credentials instead",
                    redact_seed(s)
                )));
            }
            addrs.push(a);
        }
        if let Some(secret) = config.credentials.secret() {
            let plain: Vec<&str> = config
                .seeds
                .iter()
                .zip(&addrs)
                .filter(|(_, a)| !config.tls.required && !a.tls_required())
                .map(|(s, _)| s.as_str())
                .collect();
            if !plain.is_empty() && !config.allow_plaintext_credentials {
                return Err(FlowError::Config(format!(
                    "credentials ({secret}) would be sent in clear to {}: tls is not required; \
                     set tls.required (with the server's ca in tls.root_certificates) or use \
                     tls:// seeds, or set allow_plaintext_credentials to accept sending them \
                     without tls",
                    plain.join(", ")
                )));
            }
        }
        let policy = RetryPolicy {
            retry_if,
            ledger: config.ledger.clone(),
            ..config.retry.clone()
        };
        let rounds = AtomicU64::new(0);
        let result = retry(&policy, |_attempt| {
            rounds.fetch_add(1, Ordering::Relaxed);
            // Nothing to own here: a cancelled async-nats connect spawns no task
            // and drops its socket with the future (see the crate docs).
            round(&config, &addrs)
        })
        .await;
        match result {
            Ok(c) => Ok(c),
            Err(e) => Err(match e.transport_error::<ClusterError>() {
                Some(ClusterError::NoSeedReachable { seeds, .. }) => {
                    ClusterError::NoSeedReachable {
                        attempts: rounds.load(Ordering::Relaxed) as u32,
                        seeds: seeds.clone(),
                    }
                    .into()
                }
                _ => e,
            }),
        }
    }

    /// The async-nats client, for anything flowctl does not wrap.
    pub fn client(&self) -> &async_nats::Client {
        &self.shared.client
    }

    /// The JetStream context (stream and consumer administration).
    pub fn jetstream(&self) -> &async_nats::jetstream::Context {
        &self.shared.js
    }

    /// Times the connection was re-established after a loss.
    pub fn reconnects(&self) -> u64 {
        // async-nats reports the first connect as `Event::Connected` too.
        self.shared
            .events
            .reconnects
            .load(Ordering::Relaxed)
            .saturating_sub(1)
    }

    /// The ledger this cluster counts into.
    pub fn ledger(&self) -> &Ledger {
        &self.shared.ledger
    }
}

/// One round: every seed once, in order, each bounded by `connect_timeout`.
async fn round(config: &ClusterConfig, addrs: &[ServerAddr]) -> Result<Cluster, FlowError> {
    let mut why = Vec::new();
    for (i, seed) in config.seeds.iter().enumerate() {
        match connect_seed(config, addrs, i).await {
            Ok(c) => return Ok(c),
            Err(SeedError::Auth(reason)) => {
                return Err(ClusterError::AuthRejected {
                    seed: seed.clone(),
                    reason,
                }
                .into());
            }
            Err(SeedError::Other(reason)) => {
                tracing::debug!(seed = %seed, %reason, "seed unreachable");
                why.push((seed.clone(), reason));
            }
        }
    }
    Err(ClusterError::NoSeedReachable {
        attempts: 1,
        seeds: why,
    }
    .into())
}

enum SeedError {
    Auth(String),
    Other(String),
}

/// `s` with anything between the scheme and an `@` (a user and password)
/// replaced by `***`, for error messages.
fn redact_seed(s: &str) -> String {
    match s.rfind('@') {
        Some(at) => {
            let start = s.find("://").map_or(0, |i| i + 3).min(at);
            format!("{}***{}", &s[..start], &s[at..])
        }
        None => s.to_owned(),
    }
}

async fn connect_seed(
    config: &ClusterConfig,
    addrs: &[ServerAddr],
    first: usize,
) -> Result<Cluster, SeedError> {
    // The connection's stage: `nats.<connection name, or the seed of the
    // first connect>.connection`.
    let stage = Stage::new(format!(
        "nats.{}.connection",
        config
            .name
            .clone()
            .unwrap_or_else(|| redact_seed(&config.seeds[first]))
    ));
    let events = Arc::new(Events::new(&stage));
    let (gen_tx, gen_rx) = watch::channel(0u64);
    let mut opts = ConnectOptions::new()
        .connection_timeout(config.connect_timeout)
        .ping_interval(config.ping_interval)
        .request_timeout(Some(config.request_timeout))
        .subscription_capacity(config.subscription_capacity);
    // Pick the seed of this try for the first connect only; reconnects use
    // async-nats's own selection over seeds and discovered servers.
    let chosen = addrs[first].clone();
    let picked = Arc::new(AtomicBool::new(false));
    opts = opts.reconnect_to_server_callback(move |_servers, _info| {
        let first_call = !picked.swap(true, Ordering::SeqCst);
        let chosen = chosen.clone();
        async move {
            first_call.then_some(ReconnectToServer {
                addr: chosen,
                delay: Some(Duration::ZERO),
            })
        }
    });
    let ev = events.clone();
    opts = opts.event_callback(move |event| {
        let ev = ev.clone();
        let gen_tx = gen_tx.clone();
        async move {
            match event {
                Event::Connected => {
                    // async-nats reports the first connect as `Connected` too.
                    if ev.reconnects.fetch_add(1, Ordering::Relaxed) > 0 {
                        ev.reconnects_metric.increment(1);
                    }
                    gen_tx.send_modify(|g| *g += 1);
                }
                Event::ServerError(async_nats::ServerError::Other(text))
                    if text.to_lowercase().contains("permissions violation") =>
                {
                    if let Ok(mut v) = ev.violations.lock() {
                        if v.len() >= 64 {
                            v.pop_front();
                        }
                        v.push_back(text);
                    }
                    ev.violation_gen.send_modify(|g| *g += 1);
                }
                Event::SlowConsumer(sid) => {
                    ev.slow_total.fetch_add(1, Ordering::Relaxed);
                    // Under the map's lock: the subscription cannot
                    // deregister in between (its gate would miss the drop).
                    if let Ok(g) = ev.gates.lock()
                        && let Some(gate) = g.get(&sid)
                    {
                        gate.record_drop(DropReason::SlowConsumer, 1);
                    }
                }
                _ => {}
            }
        }
    });
    if let Some(n) = &config.name {
        opts = opts.name(n);
    }
    if let Some(p) = &config.inbox_prefix {
        opts = opts.custom_inbox_prefix(p);
    }
    opts = match &config.credentials {
        Credentials::None => opts,
        Credentials::UserPassword(u, p) => opts.user_and_password(u.clone(), p.clone()),
        Credentials::Token(t) => opts.token(t.clone()),
        #[cfg(feature = "nkeys")]
        Credentials::CredentialsFile(path) => opts
            .credentials_file(path)
            .await
            .map_err(|e| SeedError::Other(format!("credentials file {}: {e}", path.display())))?,
    };
    // With a secret to send and no opt-out, every connection must be TLS:
    // `tls://` seeds alone would not cover reconnects to the servers the
    // cluster announces (async-nats dials those as `nats://`).
    if config.tls.required
        || (config.credentials.secret().is_some() && !config.allow_plaintext_credentials)
    {
        opts = opts.require_tls(true);
    }
    for r in &config.tls.root_certificates {
        opts = opts.add_root_certificates(r.clone());
    }
    if let Some((cert, key)) = &config.tls.client_cert {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    let client = match opts.connect(addrs.to_vec()).await {
        Ok(c) => c,
        Err(e) => {
            return Err(match e.kind() {
                ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                    SeedError::Auth(e.to_string())
                }
                _ => SeedError::Other(e.to_string()),
            });
        }
    };
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(config.request_timeout)
        .build(client.clone());
    let shared = Shared {
        client,
        js,
        ledger: config.ledger.clone(),
        subscription_capacity: config.subscription_capacity,
        generation: gen_rx,
        events,
        _connection: config.ledger.acquire("nats.connection"),
    };
    Ok(Cluster {
        shared: Arc::new(shared),
    })
}
