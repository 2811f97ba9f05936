//! `etpo experiment`'s progress: one bar over every run of the experiment and one for the run in
//! flight. Both are drawn by this process from the run's `steps.jsonl` (each `etpo run` is
//! started with `--no-progress` and its messages are printed above the bars), so one process
//! owns the terminal. The log is only read here, never repaired: its writer is the run.

use std::io::{BufRead, BufReader, IsTerminal};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use etpo::experiment::StepRecord;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The experiment's bars.
pub struct Progress {
    multi: MultiProgress,
    overall: ProgressBar,
    hidden: bool,
}

impl Progress {
    /// `total` environment steps over every run, `done` of them already logged; `hidden` with
    /// `--no-progress` or when stderr is not a terminal (then only the runs' lines are printed).
    pub fn new(total: u64, done: u64, no_progress: bool) -> Progress {
        let hidden = no_progress || !std::io::stderr().is_terminal();
        let multi = MultiProgress::new();
        if hidden {
            multi.set_draw_target(ProgressDrawTarget::hidden());
        }
        let overall = multi.add(ProgressBar::new(total));
        overall.set_style(style("{prefix:>12.bold} [{bar:30}] {pos}/{len} steps ({elapsed} so far, ETA {eta})"));
        overall.set_prefix("experiment");
        overall.set_position(done);
        overall.reset_eta();
        Progress { multi, overall, hidden }
    }

    /// Prints a line above the bars (to stderr).
    pub fn say(&self, line: &str) {
        print_above(&self.multi, self.hidden, line);
    }

    /// Runs `cmd`, an `etpo run` that logs to `steps` and ends after `budget` steps, with a bar
    /// of its own; its stderr is printed above the bars, prefixed by `label`.
    pub fn run(&self, label: &str, cmd: &mut Command, steps: &Path, budget: u64) -> anyhow::Result<ExitStatus> {
        let bar = self.multi.add(ProgressBar::new(budget));
        bar.set_style(style("{prefix:>12.bold} [{bar:30}] {pos}/{len} {msg} (ETA {eta})"));
        bar.set_prefix("this run");
        let before = self.overall.position();
        let logged = Logged::read(steps);
        bar.set_position(logged.steps);
        bar.reset_eta();
        let mut child = cmd.arg("--no-progress").stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
        let stderr = child.stderr.take().context("the run's stderr")?;
        let printer = {
            let (multi, hidden, label) = (self.multi.clone(), self.hidden, label.to_string());
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    print_above(&multi, hidden, &format!("{label}: {line}"));
                }
            })
        };
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            let now = Logged::read(steps);
            bar.set_position(now.steps);
            bar.set_message(now.message());
            self.overall.set_position(before + now.steps.saturating_sub(logged.steps));
            std::thread::sleep(Duration::from_millis(500));
        };
        let _ = printer.join();
        let end = Logged::read(steps);
        self.overall.set_position(before + end.steps.saturating_sub(logged.steps));
        bar.finish_and_clear();
        self.multi.remove(&bar);
        Ok(status)
    }

    pub fn finish(&self) {
        self.overall.finish_and_clear();
    }
}

/// A line to stderr, above the bars unless they are hidden.
fn print_above(multi: &MultiProgress, hidden: bool, line: &str) {
    if hidden {
        eprintln!("{line}");
    } else {
        multi.suspend(|| eprintln!("{line}"));
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
}

/// What a run's log says so far: its complete lines, read without repairing a partial last one.
#[derive(Debug, Default, PartialEq)]
struct Logged {
    steps: u64,
    best: Option<f64>,
    /// Rewards of the last 16 steps.
    recent: Vec<f64>,
}

impl Logged {
    fn read(path: &Path) -> Logged {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        let mut out = Logged::default();
        for line in complete.lines().filter(|l| !l.trim().is_empty()) {
            out.steps += 1;
            if let Ok(r) = serde_json::from_str::<StepRecord>(line) {
                out.best = Some(out.best.map_or(r.reward, |b: f64| b.max(r.reward)));
                out.recent.push(r.reward);
                if out.recent.len() > 16 {
                    out.recent.remove(0);
                }
            }
        }
        out
    }

    fn message(&self) -> String {
        let best = self.best.map_or("–".into(), |b| format!("{b:.3}"));
        if self.recent.is_empty() {
            return format!("best {best}");
        }
        let mean = self.recent.iter().sum::<f64>() / self.recent.len() as f64;
        format!("best {best}, last {} steps {mean:+.3}", self.recent.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_is_read_up_to_its_last_complete_line_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("steps.jsonl");
        let line = |reward: f64| {
            format!(
                "{{\"spec\":\"s\",\"seed\":0,\"episode\":0,\"step\":0,\"env_step\":1,\"prompt_sha256\":\"\",\"generation\":\"\",\"action\":\"\",\"reward\":{reward},\"ran\":true,\"terminated\":false,\"truncated\":false,\"error\":\"\",\"wall_s\":0,\"cpu_s\":0,\"peak_rss_mb\":0,\"gen_s\":0}}\n"
            )
        };
        let text = format!("{}{}{}", line(0.5), line(-1.0), &line(0.9)[..20]);
        std::fs::write(&path, &text).unwrap();
        let logged = Logged::read(&path);
        assert_eq!(logged, Logged { steps: 2, best: Some(0.5), recent: vec![0.5, -1.0] });
        assert_eq!(logged.message(), "best 0.500, last 2 steps -0.250");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "the partial line is the writer's to repair");
        assert_eq!(Logged::read(&dir.path().join("none.jsonl")), Logged::default());
    }
}
