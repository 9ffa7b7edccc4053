//! Command-line options, hand-parsed (the soak has few and they are simple).

use std::path::PathBuf;
use std::time::Duration;

/// Every scenario the soak knows, in the order `all` runs them.
pub(crate) const SCENARIOS: &[&str] = &["pipe", "telemetry", "ssh", "zmq", "cluster", "pipeline"];

/// The `ssh` scenario against OpenSSH's sshd: not in `all`, added by `--sshd`
/// (next to `ssh`) or named with `--scenario`.
pub(crate) const SSH_SSHD: &str = "ssh-sshd";

/// A deliberate bug, so that a test can prove the soak fails and names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inject {
    /// The consumer silently drops one message.
    DropOne,
    /// The `pipe` scenario starts a process (`sleep`) and forgets it.
    LeakProcess,
}

#[derive(Debug, Clone)]
pub(crate) struct Opts {
    pub(crate) duration: Duration,
    pub(crate) seed: u64,
    pub(crate) scenarios: Vec<&'static str>,
    pub(crate) json: Option<PathBuf>,
    pub(crate) plot: Option<PathBuf>,
    pub(crate) inject: Option<Inject>,
    pub(crate) timer_bound_us: u64,
    /// `--nats`: an external cluster for the `cluster` and `pipeline`
    /// scenarios instead of the local 3-node one they start.
    pub(crate) nats: Option<Nats>,
    /// `--metrics ADDR`: serve the metrics of every stage at `GET /metrics`.
    pub(crate) metrics: Option<std::net::SocketAddr>,
    /// `--linger`: after the report, keep serving `--metrics` until stdin closes.
    pub(crate) linger: bool,
}

/// An external NATS cluster (`--nats`, `--nats-monitor`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Nats {
    /// Client URLs used as seeds.
    pub(crate) urls: Vec<String>,
    /// HTTP monitoring URLs of every node, for the leak check (`/subsz`,
    /// `/connz`); without them that check is skipped and says so.
    pub(crate) monitor: Vec<String>,
}

/// Default p99 lateness bound of the 1 ms timer that shares each scenario's
/// thread. A starved runtime misses it by hundreds of ms (tmq: 1.09 s); a fair
/// one by well under a ms on an idle machine. 50 ms leaves room for a loaded
/// 2-core CI machine that deschedules the whole process now and then.
pub(crate) const TIMER_P99_BOUND_US: u64 = 50_000;

pub(crate) const USAGE: &str = "\
usage: flowctl-soak [--duration D] [--seed N] [--scenario NAME[,NAME...]] [--sshd] [--json FILE] [--plot DIR]
                    [--metrics ADDR [--linger]]
  --duration D     total run time, split between scenarios: 90s, 10m, 1h (default 60s)
  --seed N         seed of the fault schedule and payloads (default: from the clock; printed)
  --scenario NAME  all (default) or a comma-separated list of: pipe, telemetry, ssh, zmq, cluster,
                   pipeline, ssh-sshd (the ssh scenario against OpenSSH's sshd)
  --sshd           also run the ssh scenario against OpenSSH's sshd (ssh-sshd, after ssh), started
                   on a free loopback port (installed by `cargo xtask setup`)
  --json FILE      write the report as JSON
  --plot DIR       write SVG charts of buffered bytes and RSS over time
  --timer-bound-ms N  p99 lateness allowed to the 1 ms timer on each scenario's thread (default 50)
  --nats URL,...   cluster and pipeline scenarios: use this running NATS cluster (JetStream, 3 nodes)
                   instead of starting a local one; no node is killed then
  --nats-monitor URL,...  its nodes' monitoring URLs (http://host:8222), for the leak check
  --metrics ADDR   serve every stage's metrics in the Prometheus text format at http://ADDR/metrics
                   (e.g. 127.0.0.1:9464; port 0 picks a free one, printed at start)
  --linger         with --metrics: after the report, keep serving until stdin is closed, so a
                   scraper takes the final values
  --inject BUG     deliberately break an invariant (drop-one, or leak-process: the pipe scenario
                   leaves a process running), to prove the soak can fail";

/// Parses `90s`, `10m`, `1h`, `250ms` or a plain number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected e.g. 90s, 10m, 1h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s, m or h")),
    };
    if d.is_zero() {
        return Err("duration must be greater than zero".into());
    }
    Ok(d)
}

impl Opts {
    pub(crate) fn parse(args: impl IntoIterator<Item = String>) -> Result<Opts, String> {
        let mut opts = Opts {
            duration: Duration::from_secs(60),
            seed: seed_from_clock(),
            scenarios: SCENARIOS.to_vec(),
            json: None,
            plot: None,
            inject: None,
            timer_bound_us: TIMER_P99_BOUND_US,
            nats: None,
            metrics: None,
            linger: false,
        };
        let mut sshd = false;
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
            };
            match flag.as_str() {
                "--duration" => opts.duration = parse_duration(&value()?)?,
                "--seed" => {
                    let v = value()?;
                    opts.seed = v
                        .parse()
                        .map_err(|_| format!("bad seed {v:?}: expected an integer"))?;
                }
                "--scenario" => opts.scenarios = parse_scenarios(&value()?)?,
                "--json" => opts.json = Some(value()?.into()),
                "--plot" => opts.plot = Some(value()?.into()),
                "--inject" => {
                    opts.inject = match value()?.as_str() {
                        "drop-one" => Some(Inject::DropOne),
                        "leak-process" => Some(Inject::LeakProcess),
                        other => {
                            return Err(format!(
                                "unknown --inject {other:?}: known: drop-one, leak-process"
                            ));
                        }
                    }
                }
                "--timer-bound-ms" => {
                    let v = value()?;
                    let ms: u64 = v
                        .parse()
                        .map_err(|_| format!("bad --timer-bound-ms {v:?}: expected an integer"))?;
                    opts.timer_bound_us = ms * 1000;
                }
                "--metrics" => {
                    let v = value()?;
                    opts.metrics = Some(v.parse().map_err(|_| {
                        format!("bad --metrics {v:?}: expected an address like 127.0.0.1:9464")
                    })?);
                }
                "--linger" => opts.linger = true,
                "--sshd" => sshd = true,
                "--nats" => opts.nats.get_or_insert_with(Nats::default).urls = list(&value()?),
                "--nats-monitor" => {
                    opts.nats.get_or_insert_with(Nats::default).monitor = list(&value()?);
                }
                "-h" | "--help" => return Err(USAGE.to_string()),
                other => return Err(format!("unknown option {other:?}\n{USAGE}")),
            }
        }
        if sshd && !opts.scenarios.contains(&SSH_SSHD) {
            let at = opts
                .scenarios
                .iter()
                .position(|s| *s == "ssh")
                .map_or(opts.scenarios.len(), |i| i + 1);
            opts.scenarios.insert(at, SSH_SSHD);
        }
        if opts.linger && opts.metrics.is_none() {
            return Err(format!("--linger needs --metrics\n{USAGE}"));
        }
        if let Some(n) = &opts.nats
            && n.urls.is_empty()
        {
            return Err(format!(
                "--nats needs at least one URL (and --nats-monitor needs --nats)\n{USAGE}"
            ));
        }
        Ok(opts)
    }
}

/// A comma-separated list, without empty items.
fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect()
}

fn parse_scenarios(list: &str) -> Result<Vec<&'static str>, String> {
    if list == "all" {
        return Ok(SCENARIOS.to_vec());
    }
    list.split(',')
        .map(|name| {
            SCENARIOS
                .iter()
                .chain([&SSH_SSHD])
                .find(|s| **s == name)
                .copied()
                .ok_or_else(|| {
                    format!(
                        "unknown scenario {name:?}; available: {}, {SSH_SSHD}",
                        SCENARIOS.join(", ")
                    )
                })
        })
        .collect()
}

fn seed_from_clock() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64 % 1_000_000_007)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Opts, String> {
        Opts::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn options() {
        let o = parse(&[
            "--duration",
            "20s",
            "--seed",
            "42",
            "--scenario",
            "pipe",
            "--inject",
            "drop-one",
        ])
        .unwrap();
        assert_eq!(
            (o.duration, o.seed, o.scenarios, o.inject),
            (
                Duration::from_secs(20),
                42,
                vec!["pipe"],
                Some(Inject::DropOne)
            )
        );
        assert_eq!(
            parse(&["--scenario", "pipeline"]).unwrap().scenarios,
            vec!["pipeline"]
        );
        assert_eq!(parse(&["--scenario", "all"]).unwrap().scenarios, SCENARIOS);
        assert_eq!(
            parse(&["--sshd"]).unwrap().scenarios,
            [
                "pipe",
                "telemetry",
                "ssh",
                "ssh-sshd",
                "zmq",
                "cluster",
                "pipeline"
            ]
        );
        assert_eq!(
            parse(&["--scenario", "zmq", "--sshd"]).unwrap().scenarios,
            ["zmq", "ssh-sshd"]
        );
        assert_eq!(
            parse(&["--scenario", "ssh-sshd", "--sshd"])
                .unwrap()
                .scenarios,
            ["ssh-sshd"]
        );
        assert_eq!(parse(&[]).unwrap().scenarios.last(), Some(&"pipeline"));
        assert!(
            parse(&["--scenario", "nope"])
                .unwrap_err()
                .contains("unknown scenario")
        );
        assert!(parse(&["--frobnicate"]).is_err());
        assert!(parse(&["--seed"]).unwrap_err().contains("needs a value"));
    }

    #[test]
    fn an_external_nats_cluster() {
        assert_eq!(parse(&[]).unwrap().nats, None);
        let o = parse(&[
            "--nats",
            "nats://a:4222, nats://b:4222",
            "--nats-monitor",
            "http://a:8222,http://b:8222",
        ])
        .unwrap();
        assert_eq!(
            o.nats,
            Some(Nats {
                urls: vec!["nats://a:4222".into(), "nats://b:4222".into()],
                monitor: vec!["http://a:8222".into(), "http://b:8222".into()],
            })
        );
        assert!(parse(&["--nats-monitor", "http://a:8222"]).is_err());
        assert!(parse(&["--nats", ","]).is_err());
    }

    #[test]
    fn a_metrics_address() {
        assert_eq!(parse(&[]).unwrap().metrics, None);
        let o = parse(&["--metrics", "127.0.0.1:9464", "--linger"]).unwrap();
        assert_eq!(o.metrics, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(o.linger);
        assert!(parse(&["--metrics", "localhost"]).is_err());
        assert!(
            parse(&["--linger"])
                .unwrap_err()
                .contains("--linger needs --metrics")
        );
    }
}
