//! Progress of a long operator job (`kek rotate`, `escrow reseal`, `db copy`, …).
//!
//! On a terminal: an indicatif bar on standard error with the count, rate and ETA. Anywhere
//! else (a pipe, a log file, systemd): one plain line when a phase starts, one at most every
//! [`PLAIN_INTERVAL`] while it runs, and one when it ends, so a job under a supervisor still
//! says how far it is. `KEYHOLD_PROGRESS=plain` forces the plain lines on a terminal too (and
//! `bar` the bar off one).
//!
//! Every job ends with a [`Summary`] line: what was done, how many, how long, how fast.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the plain (non-terminal) progress lines are written at most.
pub const PLAIN_INTERVAL: Duration = Duration::from_secs(1);

/// The progress of one phase of a job: `items` of `unit` done out of an optional total.
pub struct Progress {
    label: String,
    unit: &'static str,
    total: Option<u64>,
    started: Instant,
    out: Output,
}

enum Output {
    Bar(ProgressBar),
    Plain(Mutex<PlainState>),
}

struct PlainState {
    done: u64,
    last_line: Instant,
}

fn wants_bar() -> bool {
    match std::env::var("KEYHOLD_PROGRESS").as_deref() {
        Ok("plain") => false,
        Ok("bar") => true,
        _ => std::io::stderr().is_terminal(),
    }
}

impl Progress {
    /// Starts a phase called `label` counting `unit`s (`"rows"`, `"states"`), out of `total`
    /// when it is known.
    pub fn start(label: impl Into<String>, unit: &'static str, total: Option<u64>) -> Self {
        let label = label.into();
        let started = Instant::now();
        let out = if wants_bar() {
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            let template = if total.is_some() {
                "{msg} [{bar:32}] {human_pos}/{human_len} {unit} · {per_sec} · ETA {eta}"
            } else {
                "{msg} {spinner} {human_pos} {unit} · {per_sec} · {elapsed}"
            }
            .replace("{unit}", unit);
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(label.clone());
            Output::Bar(bar)
        } else {
            plain_line(&format!(
                "{label}: started{}",
                total
                    .map(|n| format!(", {n} {unit} to do"))
                    .unwrap_or_default()
            ));
            Output::Plain(Mutex::new(PlainState {
                done: 0,
                last_line: started,
            }))
        };
        Progress {
            label,
            unit,
            total,
            started,
            out,
        }
    }

    /// Records `n` more items done.
    pub fn inc(&self, n: u64) {
        match &self.out {
            Output::Bar(bar) => bar.inc(n),
            Output::Plain(state) => {
                let Ok(mut s) = state.lock() else { return };
                s.done += n;
                let now = Instant::now();
                if now.duration_since(s.last_line) >= PLAIN_INTERVAL {
                    s.last_line = now;
                    plain_line(&self.line(s.done, now));
                }
            }
        }
    }

    fn done(&self) -> u64 {
        match &self.out {
            Output::Bar(bar) => bar.position(),
            Output::Plain(state) => state.lock().map(|s| s.done).unwrap_or(0),
        }
    }

    fn line(&self, done: u64, now: Instant) -> String {
        let secs = now.duration_since(self.started).as_secs_f64();
        let rate = rate(done, secs);
        match self.total {
            Some(total) => {
                let eta = if rate > 0.0 && total > done {
                    format!(", ETA {:.0} s", (total - done) as f64 / rate)
                } else {
                    String::new()
                };
                format!(
                    "{}: {done}/{total} {} ({rate:.0} {}/s{eta})",
                    self.label, self.unit, self.unit
                )
            }
            None => format!(
                "{}: {done} {} ({rate:.0} {}/s)",
                self.label, self.unit, self.unit
            ),
        }
    }

    /// Ends the phase and writes its summary line.
    pub fn finish(self) -> Summary {
        let summary = Summary {
            label: self.label.clone(),
            unit: self.unit,
            items: self.done(),
            elapsed: self.started.elapsed(),
        };
        match &self.out {
            Output::Bar(bar) => bar.finish_and_clear(),
            Output::Plain(_) => {}
        }
        plain_line(&summary.to_string());
        summary
    }
}

fn rate(items: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        items as f64 / secs
    } else {
        0.0
    }
}

fn plain_line(line: &str) {
    let mut err = std::io::stderr().lock();
    // A progress line that cannot be written (closed stderr) must not fail the job.
    let _ = writeln!(err, "{line}");
}

/// What a finished phase did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The phase.
    pub label: String,
    /// What was counted.
    pub unit: &'static str,
    /// How many.
    pub items: u64,
    /// How long it took.
    pub elapsed: Duration,
}

impl Summary {
    /// Items per second.
    pub fn rate(&self) -> f64 {
        rate(self.items, self.elapsed.as_secs_f64())
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: done, {} {} in {:.1} s ({:.0} {}/s)",
            self.label,
            self.items,
            self.unit,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.unit
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_carry_count_total_rate_and_eta() {
        let p = Progress {
            label: "kek rotate".into(),
            unit: "rows",
            total: Some(100),
            started: Instant::now() - Duration::from_secs(2),
            out: Output::Plain(Mutex::new(PlainState {
                done: 0,
                last_line: Instant::now(),
            })),
        };
        let line = p.line(50, p.started + Duration::from_secs(2));
        assert_eq!(line, "kek rotate: 50/100 rows (25 rows/s, ETA 2 s)");
        let open = Progress { total: None, ..p };
        let line = open.line(50, open.started + Duration::from_secs(2));
        assert_eq!(line, "kek rotate: 50 rows (25 rows/s)");
    }

    #[test]
    fn the_summary_counts_what_was_done() {
        let s = Summary {
            label: "db copy messages".into(),
            unit: "rows",
            items: 3000,
            elapsed: Duration::from_millis(1500),
        };
        assert_eq!(s.rate(), 2000.0);
        assert_eq!(
            s.to_string(),
            "db copy messages: done, 3000 rows in 1.5 s (2000 rows/s)"
        );
    }
}
