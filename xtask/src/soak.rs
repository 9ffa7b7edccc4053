//! `cargo xtask soak`: long-running scenarios that reproduce each failure
//! flowctl exists to prevent (unbounded buffering, starvation, reactor-bound
//! reassembly, leaked connect attempts) against real peers, and report memory,
//! latency and leak evidence.
//!
//! No scenario exists yet (issue 7). The options are parsed now so that
//! scripts can be written against the final interface:
//!
//! - `--duration D`: how long each scenario runs; `90`, `90s`, `15m`, `2h`, `500ms`.
//! - `--seed N`: seed for every random choice, so a failing run can be replayed.
//! - `--json FILE`: where the machine-readable report goes.
//! - `--scenario NAME`: run only this scenario.

use std::path::PathBuf;
use std::time::Duration;

use crate::util::Args;

/// Parsed `soak` options; `None` means "the scenario's default".
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Options {
    duration: Option<Duration>,
    seed: Option<u64>,
    json: Option<PathBuf>,
    scenario: Option<String>,
}

impl Options {
    fn parse(mut args: Args) -> Result<Self, String> {
        let options = Self {
            duration: args.parsed("--duration", parse_duration)?,
            seed: args.parsed("--seed", |s| s.parse().map_err(|e| format!("{e}")))?,
            json: args.value("--json")?.map(PathBuf::from),
            scenario: args.value("--scenario")?,
        };
        args.finish()?;
        Ok(options)
    }
}

/// Parses the options and reports that there is nothing to run yet.
pub(crate) fn run(args: Args) -> Result<(), String> {
    let options = Options::parse(args)?;
    println!("soak: no scenarios yet (see issue 7)");
    println!("soak: options: {options:?}");
    Ok(())
}

/// `90` (seconds), `90s`, `15m`, `2h` or `500ms`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| "expected a number with an optional unit: ms, s, m, h".to_owned())?;
    let per_unit = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("unknown unit `{unit}`; use ms, s, m or h")),
    };
    n.checked_mul(per_unit)
        .map(Duration::from_secs)
        .ok_or_else(|| "duration too large".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
