//! Runs `cargo test`, passing its output through, and adds up its `test result:` lines so that
//! `cargo xtask test` can close with one line that counts every test it ran.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::sys::describe;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Tally {
    pub fn add(&mut self, other: Tally) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

/// Reads "test result: ok. 23 passed; 0 failed; 1 ignored; 0 measured; ..." lines.
pub fn parse_result_line(line: &str) -> Option<Tally> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let count = |word: &str| -> Option<u64> {
        rest.split(';')
            .find_map(|part| {
                part.trim()
                    .trim_start_matches("ok. ")
                    .trim_start_matches("FAILED. ")
                    .strip_suffix(word)
            })
            .and_then(|n| n.trim().parse().ok())
    };
    Some(Tally {
        passed: count(" passed")?,
        failed: count(" failed")?,
        ignored: count(" ignored").unwrap_or(0),
    })
}

/// Runs a `cargo test` command with its stdout passed through; returns the exit verdict and
/// the sum of its result lines.
pub fn run_counting(cmd: &mut Command) -> (Result<()>, Tally) {
    let mut tally = Tally::default();
    let result = (|| {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut out = std::io::stdout();
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            if let Some(t) = parse_result_line(&line) {
                tally.add(t);
            }
            writeln!(out, "{line}")?;
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("`{}` failed ({status})", describe(cmd));
        }
        Ok(())
    })();
    (result, tally)
}

/// The skipped tests in a skip log (`name\treason` lines), one entry per test name.
pub fn read_skips(log: &str) -> std::collections::BTreeMap<String, String> {
    log.lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(name, why)| (name.trim().to_string(), why.trim().to_string()))
        .filter(|(name, _)| !name.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_skip_logs() {
        let skips = read_skips("a\tneeds root\nb\tno docker\na\tneeds root\n\ngarbage\n");
        assert_eq!(skips.len(), 2);
        assert_eq!(skips["a"], "needs root");
        assert_eq!(skips["b"], "no docker");
    }

    #[test]
    fn reads_cargo_result_lines() {
        let ok = "test result: ok. 23 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.09s";
        assert_eq!(
            parse_result_line(ok),
            Some(Tally {
                passed: 23,
                failed: 0,
                ignored: 1
            })
        );
        let failed = "test result: FAILED. 22 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.09s";
        assert_eq!(
            parse_result_line(failed),
            Some(Tally {
                passed: 22,
                failed: 1,
                ignored: 0
            })
        );
        assert_eq!(parse_result_line("running 3 tests"), None);
        assert_eq!(parse_result_line("test result: garbage"), None);
    }

    #[test]
    fn tallies_add_up() {
        let mut t = Tally {
            passed: 1,
            failed: 2,
            ignored: 3,
        };
        t.add(Tally {
            passed: 10,
            failed: 0,
            ignored: 1,
        });
        assert_eq!(
            t,
            Tally {
                passed: 11,
                failed: 2,
                ignored: 4
            }
        );
    }
}
