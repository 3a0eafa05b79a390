//! The benches' command lines (`bench coordinator`, its `--store etcd`,
//! `bench agent`, `bench fleet`): flags given as `--name value` or
//! `--name=value`, read one at a time; every error names the flag and ends
//! with the bench's usage.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::util::{release_dir, workspace_root};

/// What both `bench coordinator`s (embedded and etcd) take: the
/// coordinator to run, where the report and logs go, and how long the run
/// may take.
pub struct Run {
    /// `--coordinator PATH` (another build; default: the release one).
    pub binary: PathBuf,
    /// `--out DIR` (default: `target/bench`).
    pub out: PathBuf,
    /// `--deadline SECS` (default: 600).
    pub deadline: Duration,
}

impl Default for Run {
    fn default() -> Self {
        Self {
            binary: release_dir().join("baton-coordinator"),
            out: workspace_root().join("target/bench"),
            deadline: Duration::from_secs(600),
        }
    }
}

/// A bench's arguments, read flag by flag.
pub struct Args<'a> {
    rest: std::slice::Iter<'a, String>,
    usage: &'a str,
    flag: String,
    inline: Option<String>,
}

impl<'a> Args<'a> {
    /// Reads `args`; errors quote `usage`.
    pub fn new(args: &'a [String], usage: &'a str) -> Self {
        Self {
            rest: args.iter(),
            usage,
            flag: String::new(),
            inline: None,
        }
    }

    /// The next flag (or bare word), `None` at the end.
    pub fn flag(&mut self) -> Option<String> {
        let arg = self.rest.next()?;
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        self.flag.clone_from(&flag);
        self.inline = inline;
        Some(flag)
    }

    /// The current flag's value: after its `=`, or the next word.
    pub fn value(&mut self) -> Result<String> {
        self.inline
            .take()
            .or_else(|| self.rest.next().cloned())
            .with_context(|| format!("{} needs a value; usage: {}", self.flag, self.usage))
    }

    /// The current flag's value as a number (`10_000` reads as 10000).
    pub fn number<T: FromStr>(&mut self) -> Result<T> {
        let value = self.value()?;
        value.replace('_', "").parse().ok().with_context(|| {
            format!(
                "{} {value:?} is not a number; usage: {}",
                self.flag, self.usage
            )
        })
    }

    /// The current flag's value as a number of at least `least`: a count
    /// of zero measures nothing.
    pub fn at_least<T: FromStr + PartialOrd + std::fmt::Display>(&mut self, least: T) -> Result<T> {
        let n = self.number()?;
        if n < least {
            bail!(
                "{} must be at least {least}; usage: {}",
                self.flag,
                self.usage
            );
        }
        Ok(n)
    }

    /// The current flag's value as a whole number of seconds, at least 1:
    /// a zero deadline or duration would end the run before it started.
    pub fn seconds(&mut self) -> Result<Duration> {
        let value = self.value()?;
        let seconds: u64 = value.replace('_', "").parse().ok().with_context(|| {
            format!(
                "{} {value:?} is not a whole number of seconds; usage: {}",
                self.flag, self.usage
            )
        })?;
        if seconds == 0 {
            bail!(
                "{} must be at least 1 second; usage: {}",
                self.flag,
                self.usage
            );
        }
        Ok(Duration::from_secs(seconds))
    }
}

impl Args<'_> {
    /// Reads `flag` into `run` when it is one of [`Run`]'s, or `--store`
    /// naming `store` (the bench's own); false for any other flag.
    pub fn run_flag(&mut self, flag: &str, run: &mut Run, store: &str) -> Result<bool> {
        match flag {
            "--coordinator" => run.binary = PathBuf::from(self.value()?),
            "--out" => run.out = PathBuf::from(self.value()?),
            "--deadline" => run.deadline = self.seconds()?,
            "--store" => {
                let named = self.value()?;
                if named != store {
                    bail!(
                        "this bench measures --store {store}, not {named}; usage: {}",
                        self.usage
                    );
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_spaced_and_inline_values_and_names_the_flag_in_errors() {
        let words: Vec<String> = [
            "coordinator",
            "--waiters",
            "10_000",
            "--out=/tmp/x",
            "--deadline",
        ]
        .map(String::from)
        .to_vec();
        let mut args = Args::new(&words, "USAGE");
        assert_eq!(args.flag().as_deref(), Some("coordinator"));
        assert_eq!(args.flag().as_deref(), Some("--waiters"));
        assert_eq!(args.number::<usize>().unwrap(), 10_000);
        assert_eq!(args.flag().as_deref(), Some("--out"));
        assert_eq!(args.value().unwrap(), "/tmp/x");
        assert_eq!(args.flag().as_deref(), Some("--deadline"));
        let missing = args.value().unwrap_err().to_string();
        assert_eq!(missing, "--deadline needs a value; usage: USAGE");
        assert_eq!(args.flag(), None);

        let words: Vec<String> = ["--waiters", "many"].map(String::from).to_vec();
        let mut args = Args::new(&words, "USAGE");
        args.flag();
        let bad = args.number::<usize>().unwrap_err().to_string();
        assert_eq!(bad, "--waiters \"many\" is not a number; usage: USAGE");
    }

    #[test]
    fn seconds_and_counts_refuse_zero_and_words_naming_the_flag() {
        let words: Vec<String> = [
            "--deadline=0",
            "--timeout",
            "soon",
            "--duration",
            "1_0",
            "--samples",
            "0",
            "--samples=2",
            "--name=a=b",
            "a=b",
        ]
        .map(String::from)
        .to_vec();
        let mut args = Args::new(&words, "USAGE");
        args.flag();
        let zero = args.seconds().unwrap_err().to_string();
        assert_eq!(zero, "--deadline must be at least 1 second; usage: USAGE");
        args.flag();
        let word = args.seconds().unwrap_err().to_string();
        assert_eq!(
            word,
            "--timeout \"soon\" is not a whole number of seconds; usage: USAGE"
        );
        args.flag();
        assert_eq!(args.seconds().unwrap(), Duration::from_secs(10));
        args.flag();
        let none = args.at_least(1usize).unwrap_err().to_string();
        assert_eq!(none, "--samples must be at least 1; usage: USAGE");
        args.flag();
        assert_eq!(args.at_least(1usize).unwrap(), 2);
        // Only the first `=` of a flag splits; a bare word is not a flag.
        assert_eq!(args.flag().as_deref(), Some("--name"));
        assert_eq!(args.value().unwrap(), "a=b");
        assert_eq!(args.flag().as_deref(), Some("a=b"));
    }
}
